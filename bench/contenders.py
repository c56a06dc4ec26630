"""The contenders of the top-level benchmark and how each one is produced.

- PyTorch FP32 eager: the source model as edgesmith loads it (the user's starting point).
- Hugging Face Optimum: produced by ``optimum_side.py`` inside its own venv, timed here.
- edgesmith: one recipe per row, each run through the real pipeline in a fresh cache folder, so
  the recorded wall time is what producing the artifact costs from scratch. A row whose pass does
  not exist (or does not support what the row needs) says "not built yet" instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.artifacts import Artifact, OnnxModel

log = logging.getLogger("bench.contenders")

OK, NOT_BUILT, FAILED, SKIPPED = "ok", "not built yet", "failed", "skipped"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json")


@dataclass
class Contender:
    key: str
    label: str
    family: str  # "pytorch" | "optimum" | "edgesmith"
    status: str = OK
    note: str = ""
    artifact: Artifact | None = None
    produce_seconds: float | None = None
    steps: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    quality: dict[str, float] = field(default_factory=dict)

    @property
    def measurable(self) -> bool:
        return self.status == OK and self.artifact is not None


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def size_on_disk(artifact: Artifact) -> int:
    """Bytes of the weights as stored: the ONNX file(s), else the parameters and buffers."""
    if isinstance(artifact, OnnxModel):
        return artifact.size_bytes()
    from edgesmith.profiling import artifact_size_bytes

    return artifact_size_bytes(artifact)


def torch_size_on_disk(model_dir: Path, artifact: Artifact) -> int:
    """The source folder's safetensors files (what a user ships), else the tensors' bytes."""
    files = list(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if files:
        return sum(f.stat().st_size for f in files)
    return size_on_disk(artifact)


# ---------------------------------------------------------------------------------------------
# edgesmith rows
# ---------------------------------------------------------------------------------------------


@dataclass
class EdgesmithRow:
    key: str
    label: str
    steps: list[dict[str, Any]]
    requires: str | None = None  # why the row is "not built yet", or None when it can run


def pass_names() -> set[str]:
    from edgesmith.passes import available_passes

    return set(available_passes())


def static_accuracy_aware_supported() -> bool:
    """Does the quantize pass take ``mode: static`` together with a ``max_drop`` gate?"""
    from edgesmith.passes import available_passes

    quantize = available_passes().get("quantize")
    if quantize is None:
        return False
    fields = quantize.config_class.model_fields
    if "mode" not in fields or "max_drop" not in fields:
        return False
    return "static" in typing.get_args(fields["mode"].annotation)


#: the dynamic INT8 row's quantize options (the Softmax-floor comparison builds on the same):
#: keep_node_metadata false: the exporter's per-node provenance (~0.3 MB of text) is not shipped
DYNAMIC_INT8: dict[str, Any] = {"mode": "dynamic", "per_channel": True, "quantize_embeddings": True,
                                "keep_node_metadata": False}

#: the ORT fusions the fused INT8 row applies before quantizing (bench/results/int8_graph.md: kept only
#: where they paid on this CPU)
FUSED_INT8 = ["layer_norm", "gelu", "skip_layer_norm", "bias_gelu"]


def edgesmith_rows(*, quick: bool, prune_heads: float, prune_ffn: float, distill_steps: int,
                   max_drop: float) -> list[EdgesmithRow]:
    """The edgesmith recipes (steps), each marked with what it still lacks, if anything.

    Every dynamic INT8 row quantizes the word embeddings too (``quantize_embeddings``: the 30522 × 384
    table is 47 of MiniLM's 91 MB) and drops the exporter's node metadata, so edgesmith's INT8 artifacts
    are no larger than Optimum's; static mode keeps them float (the quantize pass does not quantize
    embeddings in static mode)."""
    names = pass_names()
    export = {"export": {}}
    dynamic = {"quantize": dict(DYNAMIC_INT8)}
    fused = {"quantize": {**dynamic["quantize"], "optimize": True, "fusions": list(FUSED_INT8)}}
    # padded attention keys out of ORT's slow exp path (bench/results/int8_graph.md)
    softmax = {"quantize": {**dynamic["quantize"], "softmax_floor": -80.0}}
    static = {"quantize": {"mode": "static", "per_channel": True, "max_drop": {"cosine": max_drop},
                           "gate_against": "source"}}
    if quick:
        static["quantize"].update({"calibration_samples": 16, "calibration_batch": 4, "calibration_seq": 32,
                                   "eval_texts": 16})
    distill: dict[str, Any] = {"data": "builtin:wordnet", "limit": 16000, "steps": distill_steps, "max_length": 64,
                               "eval_every": max(25, distill_steps // 4), "checkpoint_every": None}
    if quick:
        distill.update({"limit": 120, "eval_texts": 20, "batch_size": 8, "max_length": 32, "eval_every": 1})
    rows = [
        EdgesmithRow("es-fp32", "edgesmith ONNX FP32", [export]),
        EdgesmithRow("es-int8-dynamic", "edgesmith INT8 dynamic per-channel (8-bit embeddings)", [export, dynamic]),
        EdgesmithRow("es-int8-softmax", "edgesmith INT8 dynamic per-channel + floored softmax inputs",
                     [export, softmax]),
        EdgesmithRow("es-int8-fused", "edgesmith fused (SkipLayerNorm, BiasGelu) + INT8 dynamic per-channel",
                     [export, fused]),
        EdgesmithRow("es-int8-static-aa", f"edgesmith INT8 static, accuracy-aware (cosine drop ≤ {max_drop:g})",
                     [export, static],
                     None if static_accuracy_aware_supported() else
                     "the quantize pass has no static mode with a max_drop gate"),
        EdgesmithRow("es-pruned-distilled-int8",
                     f"edgesmith pruned (heads {prune_heads:g}, FFN {prune_ffn:g}) + distilled + INT8",
                     [{"prune": {"heads": prune_heads, "ffn": prune_ffn}}, {"distill": distill}, export, dynamic],
                     None if {"prune", "distill"} <= names else "no 'distill' pass yet"),
        EdgesmithRow("es-early-exit-int8", "edgesmith early exit + INT8",
                     # encoder exits (agreement of consecutive exit embeddings) calibrated to cosine >= 0.99,
                     # then every segment INT8; trained on rows kept apart from the evaluation rows
                     [{"early-exit": {"data": "builtin:wordnet", "offset": 1000, "limit": 6000, "budget": "cosine=0.99",
                                      "steps": 300, "max_length": 64}},
                      {"quantize-segments": {}}],
                     None if "early-exit" in names else "no 'early-exit' pass yet"),
    ]
    return rows


def _describe(step: dict[str, Any]) -> str:
    (name, options), = step.items()
    shown = {k: v for k, v in options.items() if k not in ("checkpoint_every", "eval_every")}
    return name if not shown else f"{name} {json.dumps(shown, separators=(',', ':'))}"


def run_edgesmith_row(row: EdgesmithRow, *, model: str, work: Path, data_limit: int) -> Contender:
    """Run the row's recipe through the pipeline in a fresh cache; the last step's output is the artifact."""
    from edgesmith.pipeline import run

    contender = Contender(row.key, row.label, "edgesmith", steps=[_describe(s) for s in row.steps])
    if row.requires:
        contender.status, contender.note = NOT_BUILT, row.requires
        return contender
    cache = work / "cache" / row.key
    shutil.rmtree(cache, ignore_errors=True)
    recipe = {"name": f"bench-{row.key}", "model": model,
              "data": {"path": "builtin:wordnet", "limit": data_limit},
              "steps": row.steps, "evaluate": {"enabled": False}, "profile": None}
    started = time.perf_counter()
    try:
        result = run(recipe, runs_dir=work / "runs", cache_dir=cache, progress=False)
    except Exception as exc:  # the row reports the failure; the benchmark goes on
        log.exception("edgesmith row %s failed", row.key)
        contender.status, contender.note = FAILED, _first_line(exc)
        contender.produce_seconds = time.perf_counter() - started
        return contender
    steps = result.manifest["steps"]
    contender.produce_seconds = float(sum(s["seconds"] for s in steps))
    contender.artifact = result.artifacts[steps[-1]["id"]]
    contender.size_bytes = size_on_disk(contender.artifact)
    contender.note = _row_note(steps)
    return contender


def _row_note(steps: list[dict[str, Any]]) -> str:
    """What the passes reported that a reader of the row needs (float fallbacks, distill result)."""
    notes = []
    for step in steps:
        report = step.get("report") or {}
        fallback = report.get("fallback")
        if isinstance(fallback, dict) and "float_nodes" in fallback:
            notes.append(f"{len(fallback['float_nodes'])} node(s) returned to float by the search")
        floats = report.get("float", {}).get("count") if isinstance(report.get("float"), dict) else None
        if floats and step["pass"] == "quantize":
            notes.append("float: " + ", ".join(f"{op} {n}" for op, n in sorted(floats.items())))
        if step["pass"] == "distill" and "cosine_after" in report:
            notes.append(f"distill held-out cosine {report.get('cosine_before', float('nan')):.3f} → "
                         f"{report['cosine_after']:.3f}")
    return "; ".join(notes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Optimum rows
# ---------------------------------------------------------------------------------------------

OPTIMUM_LABELS = {
    "fp32": "Optimum ONNX FP32 (optimum-onnx export)",
    "o2": "Optimum O2 (ORTOptimizer)",
    "int8-o2": "Optimum O2 + dynamic INT8 (ORTQuantizer)",
    "int8-fp32": "Optimum dynamic INT8 (ORTQuantizer, on the plain export)",
}


def optimum_wrapper(folder: Path, file_name: str, dest: Path, name: str) -> OnnxModel:
    """An OnnxModel folder around one of Optimum's files (hard-linked as model.onnx + tokenizer)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "model.onnx"
    target.unlink(missing_ok=True)
    try:
        target.hardlink_to(folder / file_name)
    except OSError:
        shutil.copy2(folder / file_name, target)
    data = folder / f"{file_name}_data"
    if data.exists():
        shutil.copy2(data, dest / data.name)
    for f in TOKENIZER_FILES:
        if (folder / f).exists():
            shutil.copy2(folder / f, dest / f)
    return OnnxModel(task="feature-extraction", name=name, folder=dest)


def run_optimum(python: Path, side_script: Path, model_dir: Path, work: Path, timeout_s: int) -> tuple[list[Contender], dict]:
    """Run ``optimum_side.py produce`` in the Optimum venv; one contender per variant or failure."""
    out = work / "optimum"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([str(python), str(side_script), "produce", str(model_dir), str(out)],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    wall = time.perf_counter() - started
    (work / "optimum-side.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        failed = Contender("optimum", "Hugging Face Optimum", "optimum", FAILED, f"optimum_side.py failed: {tail[:240]}")
        return [failed], {"wall_seconds": wall, "error": tail}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    contenders = []
    for key, variant in result["variants"].items():
        art = optimum_wrapper(Path(variant["folder"]), variant["file"], out / "wrapped" / key, f"optimum-{key}")
        contenders.append(Contender(f"optimum-{key}", OPTIMUM_LABELS.get(key, f"Optimum {key}"), "optimum",
                                    artifact=art, produce_seconds=variant["seconds"], steps=variant["steps"],
                                    size_bytes=art.size_bytes()))
    for key, error in result.get("errors", {}).items():
        contenders.append(Contender(f"optimum-{key}", OPTIMUM_LABELS.get(key, f"Optimum {key}"), "optimum",
                                    FAILED, error))
    return contenders, result
