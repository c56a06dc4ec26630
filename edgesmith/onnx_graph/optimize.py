"""Graph optimization with ONNX Runtime's transformer optimizer, given the model's real shape.

``onnxruntime.transformers.optimizer.optimize_model`` fuses attention, LayerNorm, GELU and bias
patterns into ORT's contrib ops. Its attention fusion takes ``num_heads`` and ``hidden_size`` as
given: handed the unpruned values for a head-pruned model it fuses anyway and the graph outputs
wrong values without an error (FIELD-NOTES: cosine 0.93). So the values come from the
artifact's meta, which export records from the modules themselves (``num_attention_heads`` and
``hidden_size`` = heads x head_dim), and the optimized graph is validated against its input
before anything else uses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from edgesmith.artifacts import ONNX_FILE, OnnxModel, copy_companions
from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

#: ORT optimizer model types edgesmith passes on (the BERT fusions serve BERT-like encoders)
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "electra": "bert",
               "gpt2": "gpt2", "bart": "bart", "t5": "t5"}

#: the fusions that can be chosen one by one, and the ORT ``FusionOptions`` flags each turns on
#: (the flags not named by any chosen fusion are turned off)
FUSIONS = {
    "layer_norm": ("enable_layer_norm",),
    "gelu": ("enable_gelu",),
    "skip_layer_norm": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "bias_gelu": ("enable_bias_gelu",),
    "attention": ("enable_attention",),
    "embed_layer_norm": ("enable_embed_layer_norm",),
}


def fusion_options(model_type: str, fusions: list[str] | None):
    """ORT ``FusionOptions`` with only ``fusions`` on (None: ORT's defaults, every fusion)."""
    if fusions is None:
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions

    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown:
        raise BadInput(f"unknown fusion(s) {', '.join(unknown)}; choose from {', '.join(FUSIONS)}")
    options = FusionOptions(model_type)
    for name, flags in FUSIONS.items():
        for flag in flags:
            setattr(options, flag, name in fusions)
    return options


def attention_shape(model: OnnxModel) -> tuple[int, int]:
    """(num_heads, hidden_size) of the attention as the artifact's meta records it."""
    heads, width = model.meta.get("num_attention_heads"), model.meta.get("hidden_size")
    if isinstance(heads, list) or isinstance(width, list):
        raise BadInput(f"{model.name}: its layers have different head counts ({heads}); ORT's transformer optimizer "
                       "takes one value for all layers: quantize without optimize")
    if not isinstance(heads, int) or not isinstance(width, int) or heads < 1 or width < 1:
        raise BadInput(f"{model.name}: no num_attention_heads/hidden_size in its edgesmith.json (export records them); "
                       "re-export it with edgesmith, or quantize without optimize")
    return heads, width


def optimizer_model_type(model: OnnxModel) -> str:
    kind = str(model.meta.get("model_type") or "bert").lower()
    if kind not in MODEL_TYPES:
        raise BadInput(f"{model.name}: ORT's transformer optimizer has no fusions for model type '{kind}'; "
                       f"quantize without optimize (known: {', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[kind]


def optimize_graph(model: OnnxModel, output: Path, fusions: list[str] | None = None) -> dict[str, Any]:
    """Write ``model``'s graph optimized by ORT's transformer optimizer to ``output``.

    ``fusions``: only these fusions (names of :data:`FUSIONS`), or None for all of ORT's.
    Returns the fused-op counts and the values given. Only offline fusions (opt_level 0) are
    applied, so the file stays runnable on any execution provider; ORT applies its own
    provider-specific optimizations at session start.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    heads, width = attention_shape(model)
    model_type = optimizer_model_type(model)
    captured = io.StringIO()
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(captured):
            optimized = optimize_model(str(model.path), model_type=model_type, num_heads=heads, hidden_size=width,
                                       opt_level=0, use_gpu=False,
                                       optimization_options=fusion_options(model_type, fusions))
    except Exception as exc:  # the optimizer raises assorted errors on graphs it cannot read
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"ORT's transformer optimizer failed on {model.name} ({reason}); quantize without optimize") from exc
    finally:
        quiet.setLevel(level)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    optimized.save_model_to_file(str(output), use_external_data_format=False)
    log.info("optimized %s (num_heads=%d, hidden_size=%d): %s", model.name, heads, width, fused or "nothing fused")
    info: dict[str, Any] = {"model_type": model_type, "num_heads": heads, "hidden_size": width, "fused": fused}
    if fusions is not None:
        info["fusions"] = list(fusions)
    return info


def optimized_copy(model: OnnxModel, folder: Path, fusions: list[str] | None = None) -> tuple[OnnxModel, dict[str, Any]]:
    """An OnnxModel in ``folder`` holding the optimized graph and the input's companion files."""
    folder.mkdir(parents=True, exist_ok=True)
    info = optimize_graph(model, folder / ONNX_FILE) if fusions is None else \
        optimize_graph(model, folder / ONNX_FILE, fusions=fusions)
    copy_companions(model.folder, folder)
    out = OnnxModel(task=model.task, name=model.name, lineage=list(model.lineage), meta=dict(model.meta), folder=folder)
    return out, info
