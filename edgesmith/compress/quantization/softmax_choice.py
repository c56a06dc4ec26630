"""The Softmax floor as a measured choice (the quantize pass's ``softmax_floor`` set to ``auto``).

Flooring the attention Softmax's inputs (:mod:`edgesmith.onnx_graph.softmax`) keeps padded keys out
of ONNX Runtime's slow exp path. That made the INT8 MiniLM 1.26x faster on an Intel Xeon (AVX-512,
AMX) and 0.94-0.97x as fast on an AMD EPYC (AVX-512), where the three extra nodes cost more than the
exp they spare. So ``auto`` decides on the machine the pass runs on: it times the quantized graph
without and with the floor, in ONNX Runtime on the CPU with its default threads, at the shapes users
send:

- batch 1, unpadded (one text at its own length);
- batch 8, padded to the longest text of the batch;
- batch 1 padded to 128 tokens (fixed-shape serving, and the benchmarks' table).

The two graphs run in interleaved rounds (a block of runs each, the order rotating), and each
shape's speedup is :func:`edgesmith.stats.paired_speedup` of the rounds with its 95 % interval. The
floor is kept when it is faster with confidence (interval above 1) at one shape at least and slower
with confidence (interval below 1) at none. The record names the machine (CPU model, ISA), both
timings at every shape and the decision; the pass keeps it in its report and the artifact's meta.

ONNX Runtime's ``session.set_denormal_as_zero`` is not a property of the graph (the session that
runs it must set it), so it is not part of this choice; on the Xeon it changed nothing (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edgesmith.artifacts import ONNX_FILE, OnnxModel
from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

#: (label, batch, padded length or None for padded to the longest row)
SHAPES: tuple[tuple[str, int, int | None], ...] = (
    ("batch 1, unpadded", 1, None),
    ("batch 8, padded to the longest", 8, None),
    ("batch 1, padded to 128", 1, 128),
)
ROUNDS = 8
BLOCK = 5
#: distinct input batches per shape (texts of different lengths), cycled through by each block
INPUT_BATCHES = 4
RULE = ("kept when faster with 95 % confidence at one shape at least and slower with confidence at none "
        "(paired rounds, median of the per-round ratios)")


def keep_floor(verdicts: list[str]) -> bool:
    """The rule: at least one shape "faster" and none "slower" (see :func:`edgesmith.stats.verdict_of`)."""
    return "faster" in verdicts and "slower" not in verdicts


def machine_record() -> dict[str, Any]:
    """The machine a decision was measured on: CPU model, ISA and cores (the device agent's functions)."""
    from edgesmith.profiling.agent import cpu_model, isa_flags, isa_summary

    flags = isa_flags()
    return {"cpu_model": cpu_model(), "isa": isa_summary(flags), "isa_flags": flags, "cores": os.cpu_count()}


def shape_feeds(tokenizer, input_names: list[str], texts: list[str]) -> list[tuple[str, int, int | None, list]]:
    """(label, batch, padded length, feeds) for every shape of :data:`SHAPES`, from ``texts``."""
    from edgesmith.inputs import tokenize

    pool = [t for t in texts if t and t.strip()]
    if not pool:
        raise BadInput("softmax_floor: auto needs texts to time the graph on; give the run some data")
    out = []
    for label, batch, seq in SHAPES:
        feeds = []
        for b in range(INPUT_BATCHES):
            rows = [pool[(b * batch + i) % len(pool)] for i in range(batch)]
            feeds.append(tokenize(tokenizer, rows, input_names=input_names, seq=seq))
        out.append((label, batch, seq, feeds))
    return out


def choose_softmax_floor(graph: Path, parent: OnnxModel, texts: list[str], work: Path, *, floor: float,
                         rounds: int = ROUNDS, block: int = BLOCK) -> dict[str, Any]:
    """Time the graph at ``graph`` without and with the Softmax floor (a floored copy written under
    ``work``) and decide. Returns the record; its ``floor`` is the floor to apply, or None."""
    import onnx

    from edgesmith.onnx_graph.softmax import floor_softmax_inputs

    record: dict[str, Any] = {"setting": "auto", "candidate": floor, "machine": machine_record(), "rule": RULE}
    model = onnx.load(str(graph))
    rewritten = floor_softmax_inputs(model, floor)["rewritten"]
    if not rewritten:
        return {**record, "floor": None, "decision": "no floor: the graph has no last-axis float Softmax"}
    floored_dir = work / "softmax-floored"
    floored_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(floored_dir / ONNX_FILE))
    del model
    candidates = {"without": OnnxModel(task=parent.task, name=f"{parent.name} (no floor)", folder=graph.parent),
                  "with": OnnxModel(task=parent.task, name=f"{parent.name} (floor)", folder=floored_dir)}
    shapes = time_both(candidates, parent.tokenizer, texts, rounds=rounds, block=block)
    keep = keep_floor([s["verdict"] for s in shapes])
    decision = (f"floor {floor:g} kept" if keep else "no floor") + f" (measured on {record['machine']['cpu_model']}, "
    decision += f"{record['machine']['isa']})"
    log.info("softmax_floor auto: %s; %s", decision,
             "; ".join(f"{s['shape']}: {s['speedup']:.3f}x [{s['speedup_ci'][0]:.3f}-{s['speedup_ci'][1]:.3f}]"
                       for s in shapes))
    import onnxruntime as ort

    return {**record, "floor": floor if keep else None, "decision": decision, "softmax_nodes": rewritten,
            "rounds": rounds, "block": block, "runtime": f"onnxruntime {ort.__version__} CPU, its default threads",
            "shapes": shapes}


def time_both(candidates: dict[str, OnnxModel], tokenizer, texts: list[str], *, rounds: int,
              block: int) -> list[dict[str, Any]]:
    """Per shape: both graphs in ``rounds`` interleaved rounds of ``block`` runs (order rotating),
    their medians and the paired speedup of the floored graph over the plain one."""
    from edgesmith.profiling import measure
    from edgesmith.runtimes.base import default_runtime_for, get_runtime
    from edgesmith.stats import paired_speedup, verdict_of

    runtime = get_runtime(default_runtime_for(candidates["without"]))
    sessions = {name: runtime.load(model) for name, model in candidates.items()}
    try:
        out = []
        for label, batch, seq, feeds in shape_feeds(tokenizer, sessions["without"].input_names, texts):
            blocks: dict[str, list[list[float]]] = {name: [] for name in sessions}
            for name, session in sessions.items():
                measure(session, feeds, warmup=3, iterations=1)
            for r in range(rounds):
                order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
                for name in order:
                    blocks[name].append(measure(sessions[name], feeds, warmup=0, iterations=block))
            speedup, low, high = paired_speedup(blocks["without"], blocks["with"])
            tokens = [int(f["input_ids"].shape[1]) for f in feeds]
            out.append({"shape": label, "batch": batch, "tokens": tokens if seq is None else seq,
                        "without_floor_ms": _median(blocks["without"]), "with_floor_ms": _median(blocks["with"]),
                        "speedup": round(speedup, 3), "speedup_ci": [round(low, 3), round(high, 3)],
                        "verdict": verdict_of(low, high)})
        return out
    finally:
        for session in sessions.values():
            session.close()


def _median(blocks: list[list[float]]) -> float:
    import numpy as np

    return round(float(np.median([x for b in blocks for x in b])), 3)
