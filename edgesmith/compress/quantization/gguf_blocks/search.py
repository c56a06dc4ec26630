"""Choosing block scales (and codes) for llama.cpp's 4-bit formats from calibration statistics.

- :func:`collect_statistics` runs calibration batches through the FP32 model and keeps, for every
  block linear, the importance of each input column (mean x², what llama.cpp's ``llama-imatrix``
  records) and, for GPTQ, the input's second moment H = XᵀX / n.
- :func:`search_scales` is activation-aware scale search per block (AWQ's and llama.cpp's imatrix
  idea): among candidate scales around the block's max/level, the one that minimises the
  importance-weighted error Σ h·(w − d·q)², then a weighted least-squares refit of d for the chosen
  codes, twice.
- :func:`gptq` adds error feedback across columns (GPTQ, Frantar et al. 2023): columns are quantized
  in order and each one's error is pushed onto the columns not yet quantized through the inverse
  Hessian's Cholesky factor. The block scales are searched once, up front, on the original weights
  (GPTQ's "static groups": one vectorised search per tensor instead of one per block, measured the
  difference between the two as small next to the error feedback itself).

Every function takes and returns torch tensors on the CPU; the codes follow from (weight, scales)
by :func:`edgesmith.gguf.blocks.codes_for`, so the scales and the (updated) weight are the result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from edgesmith.gguf.blocks import BLOCK, codes_for, levels, values_of

log = logging.getLogger(__name__)

#: candidate scales tried per block, as fractions of the reference max/level scale
_GRID = torch.linspace(0.85, 1.15, 11)


def block_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linears (attention and MLP projections) by module path: what is written
    in the 4-bit format. The token embedding and the head are left to the writer (Q8_0)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}" and m.in_features % BLOCK == 0}


@torch.no_grad()
def collect_statistics(module: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, hessian: bool = False
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """{linear: {"importance": mean x² per input column [K], "hessian": XᵀX / n [K, K] (when asked)}}
    over the real (unmasked) tokens of ``batches``."""
    linears = block_linears(module)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_mod, inputs):
            x = inputs[0].detach().float()
            keep = mask_holder["mask"].reshape(-1) > 0
            x = x.reshape(-1, x.shape[-1])[keep]
            entry = stats.setdefault(name, {"importance": torch.zeros(x.shape[-1])})
            entry["importance"] += (x * x).sum(0)
            if hessian:
                entry.setdefault("hessian", torch.zeros(x.shape[-1], x.shape[-1]))
                entry["hessian"] += x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            mask_holder["mask"] = batch["attention_mask"]
            module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    for name, entry in stats.items():
        n = max(counts[name], 1)
        for key in entry:
            entry[key] /= n
    return stats


def reference_scales(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """llama.cpp's own choice without an imatrix: the block's signed absolute maximum over the
    level at the grid's end it must map to (Q4_0: max/−8, IQ4_NL: max/−127, Q8_0: |max|/127)."""
    rows, k = weight.shape
    blocks = weight.reshape(rows, k // BLOCK, BLOCK)
    if fmt == "q8_0":
        return blocks.abs().amax(-1) / 127.0
    idx = blocks.abs().argmax(-1, keepdim=True)
    signed_max = torch.gather(blocks, -1, idx).squeeze(-1)
    return signed_max / float(levels(fmt)[0])


def _block_error(weight: torch.Tensor, scales: torch.Tensor, importance: torch.Tensor, fmt: str) -> torch.Tensor:
    """Σ h·(w − value)² per block, [rows, K/32]."""
    rows, k = weight.shape
    q = codes_for(weight, scales, fmt)
    err = (weight - values_of(q, scales, fmt)) ** 2 * importance.reshape(1, k)
    return err.reshape(rows, k // BLOCK, BLOCK).sum(-1)


def search_scales(weight: torch.Tensor, importance: torch.Tensor | None, fmt: str, *, refits: int = 2
                  ) -> torch.Tensor:
    """Per-block scales [rows, K/32] minimising the importance-weighted error (see the module doc)."""
    weight = weight.detach().float()
    rows, k = weight.shape
    h = (importance.detach().float() if importance is not None else torch.ones(k)).clamp_min(1e-12)
    h = h / h.mean()
    base = reference_scales(weight, fmt)
    best, best_err = base.clone(), _block_error(weight, base, h, fmt)
    for factor in _GRID:
        cand = base * float(factor)
        err = _block_error(weight, cand, h, fmt)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    for _ in range(refits):  # weighted least squares: d = Σ h·w·l / Σ h·l² for the chosen levels l
        q = codes_for(weight, best, fmt)
        lv = levels(fmt)[q] if fmt == "iq4_nl" else q
        wb = weight.reshape(rows, k // BLOCK, BLOCK)
        lb = lv.reshape(rows, k // BLOCK, BLOCK)
        hb = h.reshape(1, k // BLOCK, BLOCK)
        den = (hb * lb * lb).sum(-1)
        cand = torch.where(den > 0, (hb * wb * lb).sum(-1) / den.clamp_min(1e-20), best)
        err = _block_error(weight, cand, h, fmt)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def gptq(weight: torch.Tensor, hessian: torch.Tensor, importance: torch.Tensor | None, fmt: str, *,
         damp: float = 0.01, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, scales): GPTQ with error feedback in the block format. The updated weight
    quantizes (by its scales) to codes whose error the later columns have absorbed."""
    w = weight.detach().float().clone()
    rows, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.diag(h).mean()
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except RuntimeError:  # not positive definite even after damping: fall back to the scale search alone
        log.warning("GPTQ: Hessian not positive definite; using the scale search alone for this tensor")
        return weight.detach().float(), search_scales(weight, importance, fmt)
    scales = search_scales(w, importance, fmt)
    d16 = scales.to(torch.float16).to(torch.float32)  # [rows, K/32], as the file stores them
    inv = torch.where(d16 == 0, torch.zeros_like(d16), 1.0 / torch.where(d16 == 0, torch.ones_like(d16), d16))
    table = levels(fmt)
    mids = (table[1:] + table[:-1]) / 2
    lo, hi = float(table[0]), float(table[-1])
    for start in range(0, k, group):
        end = min(start + group, k)
        w1 = w[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            b = (start + i) // BLOCK
            x = w1[:, i] * inv[:, b]
            level = table[torch.bucketize(x, mids)] if fmt == "iq4_nl" else torch.clamp(torch.round(x), lo, hi)
            value = d16[:, b] * level
            e = (w1[:, i] - value) / h1[i, i]
            w1[:, i + 1:] -= torch.outer(e, h1[i, i + 1:])
            w1[:, i] = value
            err1[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w, scales
