"""Export of an early-exit model's ONNX segments, and their validation segment by segment against PyTorch.

Each segment is exported with the dynamo exporter (dynamic batch and sequence, onnx checker
passed); each ONNX segment is then fed the PyTorch segment's own inputs, on padded batches of real
sentences."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from edgesmith.early_exit.network import ExitNetwork, Segment, segment_io
from edgesmith.errors import BadInput, ValidationFailed

SEGMENT_FILE = "segment-{:02d}.onnx"
PROBE_BATCHES = (1, 3)
PROBE_SEQ_LENGTHS = (48,)


def export_segments(net: ExitNetwork, folder: Path, *, input_names: list[str], output: str, example: tuple,
                    opset: int | None, label: str) -> list[dict[str, Any]]:
    """Each segment to ``folder/segment-NN.onnx`` (dynamic batch and sequence, onnx checker passed)."""
    import onnx

    from edgesmith.errors import first_line
    from edgesmith.export.graph import quiet_exporter, root_cause

    records = []
    feeds = dict(zip(input_names, example))
    hidden = None
    for i, (start, end) in enumerate(net.segments()):
        inputs, outputs = segment_io(net, i, input_names, output)
        segment = Segment(net, i, inputs).eval()
        args = tuple(feeds[n] for n in input_names) if i == 0 else (hidden, feeds["attention_mask"])
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = (tuple({0: batch, 1: seq} for _ in inputs),)
        path = folder / SEGMENT_FILE.format(i)
        options: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
        try:
            with quiet_exporter(), torch.no_grad():
                torch.onnx.export(segment, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                                  dynamic_shapes=dynamic, external_data=False, verbose=False, report=False, **options)
        except Exception as exc:  # the exporter raises many types
            raise BadInput(f"export of {label} segment {i} (layers {start + 1}-{end}) failed: {root_cause(exc)}") from exc
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # several checker error types
            raise ValidationFailed(f"{label} segment {i}: the ONNX graph fails onnx.checker ({first_line(exc)})") from exc
        with torch.no_grad():
            out = segment(*args)
        hidden = out[0] if isinstance(out, tuple) else None
        records.append({"file": path.name, "layers": [start, end], "exit_layer": end, "inputs": inputs,
                        "outputs": outputs})
    return records


def validate_segments(net: ExitNetwork, folder: Path, segments: list[dict[str, Any]], tokenizer, texts: list[str],
                      *, input_names: list[str], atol: float, min_cosine: float, label: str) -> list[dict[str, Any]]:
    """Each ONNX segment against its PyTorch segment, fed the same (PyTorch) inputs, on padded
    batches of real sentences; :class:`ValidationFailed` naming the segment when one is off."""
    import onnxruntime as ort

    from edgesmith.validation import measure, probe_feeds

    probes = probe_feeds(tokenizer, texts, input_names, batches=PROBE_BATCHES, seq_lengths=PROBE_SEQ_LENGTHS,
                         left_padding=False)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(folder / s["file"]), so, providers=["CPUExecutionProvider"]) for s in segments]
    torch_segments = [Segment(net, i, s["inputs"]).eval() for i, s in enumerate(segments)]
    worst = [{"segment": i, "max_abs": 0.0, "min_cosine": 1.0} for i in range(len(segments))]
    for desc, feeds in probes:
        mask = feeds["attention_mask"]
        current = {n: feeds[n] for n in input_names}
        for i, (seg, sess, tseg) in enumerate(zip(segments, sessions, torch_segments)):
            with torch.no_grad():
                ref = tseg(*[torch.from_numpy(current[n]) for n in seg["inputs"]])
            refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            cands = sess.run(seg["outputs"], {n: current[n] for n in seg["inputs"]})
            for r, c in zip(refs, cands):
                m = measure(r, c, mask)
                worst[i]["max_abs"] = max(worst[i]["max_abs"], m["max_abs"]) if not math.isnan(m["max_abs"]) else math.nan
                worst[i]["min_cosine"] = min(worst[i]["min_cosine"], m["min_cosine"])
            if len(refs) == 2:
                current = {"hidden_in": refs[0], "attention_mask": mask}
    for w, seg in zip(worst, segments):
        w["layers"] = seg["layers"]
        if not (w["max_abs"] <= atol and w["min_cosine"] >= min_cosine):
            raise ValidationFailed(f"{label}: ONNX segment {w['segment']} (layers {seg['layers'][0] + 1}-"
                                   f"{seg['layers'][1]}) differs from PyTorch: max abs diff {w['max_abs']:.3g} "
                                   f"(atol {atol:g}), min cosine {w['min_cosine']:.6f} (floor {min_cosine:g})")
    return worst
