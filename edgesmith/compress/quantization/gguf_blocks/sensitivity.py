"""Mixed precision by measured sensitivity: what each tensor alone costs in the 4-bit format.

For every block linear, its weight is replaced by its quantized values (all others left in FP32)
and the KL of the next-token distributions to the FP32 model is measured on calibration text. The
tensors that cost most stay at Q8_0: the ``keep`` costliest, or as many as it takes for the summed
cost of the rest to fall within ``budget`` (per-tensor KLs add up roughly while each is small).
"""

from __future__ import annotations

import logging

import torch

from edgesmith.compress.quantization.gguf_blocks.search import block_linears
from edgesmith.compress.quantization.gguf_blocks.texts import mean_kl
from edgesmith.gguf.blocks import codes_for, values_of

log = logging.getLogger(__name__)


@torch.no_grad()
def tensor_sensitivity(module, plan: dict[str, tuple[str, torch.Tensor, torch.Tensor]],
                       batches: list[dict[str, torch.Tensor]], *, progress: bool = False) -> dict[str, float]:
    """{linear path: KL to FP32 when only it is quantized as ``plan`` says}."""
    linears = block_linears(module)
    module.eval()
    reference = [module(**b).logits for b in batches]
    out: dict[str, float] = {}
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]tensor sensitivity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       transient=True)
        task = bar.add_task("tensors", total=len(plan))
        bar.start()
    try:
        for path, (fmt, weight, scales) in plan.items():
            linear = linears[path]
            saved = linear.weight.detach().clone()
            linear.weight.copy_(values_of(codes_for(weight, scales, fmt), scales, fmt))
            try:
                kls = [float(mean_kl(module(**b).logits, ref, b["attention_mask"])) for b, ref in
                       zip(batches, reference, strict=True)]
            finally:
                linear.weight.copy_(saved)
            out[path] = sum(kls) / len(kls)
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    return out


def choose_q8(sensitivity: dict[str, float], *, keep: int = 0, budget: float | None = None) -> list[str]:
    """The tensors to keep at Q8_0, costliest first."""
    ranked = sorted(sensitivity, key=lambda p: -sensitivity[p])
    chosen = ranked[:keep]
    if budget is not None:
        rest = sum(sensitivity[p] for p in ranked[len(chosen):])
        for path in ranked[len(chosen):]:
            if rest <= budget:
                break
            chosen.append(path)
            rest -= sensitivity[path]
    log.info("kept at Q8_0: %d tensors (%s)", len(chosen), ", ".join(chosen[:6]) + (" ..." if len(chosen) > 6 else ""))
    return chosen
