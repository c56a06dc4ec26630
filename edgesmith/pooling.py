"""Mask-mean pooling of token vectors (sentence-transformers' pooling): one implementation for
numpy arrays and torch tensors, used by quality metrics, pruning checks, distillation and early exit."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of ``hidden``'s token vectors ([batch, seq, dim]) where ``mask`` ([batch, seq]) is 1.

    numpy in, numpy out (computed in float64); torch in, torch out (in ``hidden``'s dtype, so
    gradients flow). A row whose mask is all zeros pools to zeros."""
    if isinstance(hidden, np.ndarray):
        weights = np.asarray(mask).astype(np.float64)[..., None]
        summed = (hidden.astype(np.float64) * weights).sum(axis=1)
        return summed / np.clip(weights.sum(axis=1), 1e-9, None)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)
