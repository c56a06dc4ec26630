"""Torch-side dynamic INT8 for users who deploy with PyTorch: torchao on every ``nn.Linear``.

``torch.ao.quantization`` is deprecated; torchao's ``quantize_`` with
``Int8DynamicActivationInt8WeightConfig`` is its successor (int8 weights per channel, activations
quantized per token at run time). The result is a TorchModel that runs in PyTorch only: torchao's
tensor subclasses do not export to ONNX, so its meta says ``exportable: false`` with the reason,
and the pass refuses cleanly (exit 2, with the install command) where torchao is not installed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.passes import Context, Pass, PassConfig, register

log = logging.getLogger(__name__)

FIDELITY_TEXTS = 64


def torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def int8_config():
    """torchao's dynamic int8 config (the class in current releases, the function in older ones)."""
    import torchao.quantization as tq

    if hasattr(tq, "Int8DynamicActivationInt8WeightConfig"):
        return tq.Int8DynamicActivationInt8WeightConfig()
    return tq.int8_dynamic_activation_int8_weight()


class TorchQuantizeConfig(PassConfig):
    """``min_cosine``: the quantized module's pooled outputs must keep this cosine to the input's."""

    min_cosine: float = 0.95


@register
class TorchQuantizePass(Pass):
    """TorchModel -> TorchModel with int8 dynamic ``nn.Linear`` layers (torchao); not exportable."""

    name = "quantize-torch"
    config_class = TorchQuantizeConfig
    accepts = (TorchModel,)
    returns = TorchModel
    description = "dynamic INT8 of nn.Linear in PyTorch (torchao); runs in PyTorch only, not exportable to ONNX"
    uses = frozenset({"data"})

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, TorchModel)
        cfg: TorchQuantizeConfig = self.config  # type: ignore[assignment]
        if not torchao_available():
            raise BadInput("quantize-torch needs torchao: pip install torchao (or quantize the ONNX export with "
                           "the quantize pass)")
        import torch
        from torchao.quantization import quantize_

        module = copy.deepcopy(artifact.module).eval()
        linears = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)]
        if not linears:
            raise BadInput(f"{artifact.name} has no nn.Linear layers to quantize")
        quantize_(module, int8_config())
        out = artifact.derive(module=module)
        out.meta["precision"] = "int8-dynamic-torchao"
        out.meta["exportable"] = False
        out.meta["not_exportable_reason"] = "torchao int8 tensor subclasses run in PyTorch only; export the float model"
        report: dict[str, Any] = {"quantized_linears": len(linears), "precision": out.meta["precision"],
                                  "exportable": False}
        if artifact.task in ("feature-extraction", "sequence-classification") and artifact.tokenizer is not None:
            from edgesmith.quality import evaluate

            texts = ctx.corpus(FIDELITY_TEXTS)
            metrics = evaluate(out, artifact, texts, k=min(10, len(texts) - 1))
            report["fidelity"] = {k: round(v, 6) for k, v in metrics.items()}
            worst = metrics.get("cosine_min", metrics.get("logits_cosine", 1.0))
            if not worst >= cfg.min_cosine:
                raise ValidationFailed(f"quantize-torch of {artifact.name}: min cosine {worst:.4f} < {cfg.min_cosine:g}")
        ctx.report.update(report)
        return out
