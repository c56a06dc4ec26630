"""llama.cpp's 32-element block formats as codes and scales, in torch and as GGUF bytes.

A weight row of K elements is K/32 blocks; each block stores one fp16 scale ``d`` and 32 codes:

| format | value of code q | codes | bytes per block | note |
|---|---|---|---|---|
| Q4_0   | d · (q − 8)             | 0..15  | 18 | repacked into 8×8 interleaved blocks at load on x86 AVX2+ (fast) |
| IQ4_NL | d · KVALUES[q]          | 0..15  | 18 | a non-uniform grid; repacked like Q4_0 |
| Q8_0   | d · q                   | −127..127 | 34 | the near-lossless fallback for sensitive tensors |

A :class:`BlockQuant` holds the scales (fp16 values, [rows, K/32]) and the codes ([rows, K]) of one
tensor, so what a quantizer chose (by scale search, GPTQ or quantization-aware training) is written
byte for byte: :func:`pack` lays it out as llama.cpp reads it (4-bit codes: byte j of a block holds
element j in its low nibble and element j + 16 in its high nibble; the same layout as gguf-py's
quantizers, checked against its dequantizers in the tests). :func:`dequantize` is the float value
llama.cpp computes, and :func:`fake_quant` the same in torch with straight-through gradients for the
weights and (LSQ-style) for the scales: training sees exactly the values the file will hold.

Layer L1: numpy and torch only (and gguf-py's type table for the ggml type ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
#: IQ4_NL's 16 levels (llama.cpp's kvalues_iq4nl)
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: the formats here -> (ggml type name, code range lo, hi)
FORMATS: dict[str, tuple[str, int, int]] = {"q4_0": ("Q4_0", -8, 7), "iq4_nl": ("IQ4_NL", 0, 15),
                                            "q8_0": ("Q8_0", -127, 127)}


def check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"block format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def levels(fmt: str) -> torch.Tensor:
    """The values a code stands for, before the scale: Q4_0 −8..7, IQ4_NL KVALUES, Q8_0 −127..127."""
    if fmt == "iq4_nl":
        return torch.tensor(KVALUES, dtype=torch.float32)
    _, lo, hi = FORMATS[fmt]
    return torch.arange(lo, hi + 1, dtype=torch.float32)


@dataclass
class BlockQuant:
    """One tensor in a block format: ``scales`` float16 [rows, K/32], ``codes`` int [rows, K]
    (signed values for Q4_0/Q8_0, level indices 0..15 for IQ4_NL)."""

    fmt: str
    scales: np.ndarray
    codes: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def permuted_rows(self, permute) -> BlockQuant:
        """The same blocks with rows reordered by ``permute`` (a function of a [rows, ...] array)."""
        return BlockQuant(self.fmt, permute(self.scales), permute(self.codes))


def codes_for(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The code of every element given per-block ``scales`` ([rows, K/32], used as fp16): the
    nearest level (round half to even for the uniform grids), clamped to the format's range."""
    rows, k = weight.shape
    d = scales.to(torch.float16).to(torch.float32).reshape(rows, k // BLOCK, 1)
    x = weight.reshape(rows, k // BLOCK, BLOCK) / torch.where(d == 0, torch.ones_like(d), d)
    x = torch.where(d == 0, torch.zeros_like(x), x)
    if fmt == "iq4_nl":
        table = levels(fmt).to(weight.device)
        # nearest of 16 levels: midpoints between sorted levels
        mid = (table[1:] + table[:-1]) / 2
        q = torch.bucketize(x.contiguous(), mid)
    else:
        _, lo, hi = FORMATS[fmt]
        q = torch.clamp(torch.round(x), lo, hi)
    return q.reshape(rows, k).to(torch.int64 if fmt == "iq4_nl" else torch.float32)


def values_of(codes: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """d · level(code): what llama.cpp computes from the block."""
    rows, k = codes.shape
    d = scales.to(torch.float16).to(torch.float32).reshape(rows, k // BLOCK, 1)
    level = levels(fmt).to(codes.device)[codes] if fmt == "iq4_nl" else codes.float()
    return (d * level.reshape(rows, k // BLOCK, BLOCK)).reshape(rows, k)


class _RoundScale(torch.autograd.Function):
    """fp16 rounding of the scales with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quant(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The dequantized weight, differentiable: straight-through for the codes (the gradient of the
    value passes to the weight unchanged inside the grid, to the scale as in LSQ)."""
    rows, k = weight.shape
    d = _RoundScale.apply(scales).reshape(rows, k // BLOCK, 1)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    x = weight.reshape(rows, k // BLOCK, BLOCK) / safe
    with torch.no_grad():
        q = codes_for(weight.detach(), scales.detach(), fmt).reshape(rows, k // BLOCK, BLOCK)
        level = levels(fmt).to(weight.device)[q] if fmt == "iq4_nl" else q
        lo, hi = float(levels(fmt)[0]), float(levels(fmt)[-1])
        inside = (x >= lo - 0.5) & (x <= hi + 0.5)
    # value = d · level, with d(value)/d(weight) = 1 inside the grid and 0 where clamped
    straight = torch.where(inside, x, x.detach())
    value = d * level + d * (straight - straight.detach())  # the second term is exactly 0 in the forward pass
    return torch.where(d == 0, torch.zeros_like(value), value).reshape(rows, k)


def from_torch(fmt: str, weight: torch.Tensor, scales: torch.Tensor) -> BlockQuant:
    """A :class:`BlockQuant` of ``weight`` at ``scales`` (both torch, [rows, K] and [rows, K/32])."""
    with torch.no_grad():
        codes = codes_for(weight.detach().float(), scales.detach().float(), fmt)
    dtype = np.uint8 if fmt == "iq4_nl" else np.int8
    return BlockQuant(fmt, scales.detach().float().numpy().astype(np.float16), codes.numpy().astype(dtype))


def dequantize(bq: BlockQuant) -> np.ndarray:
    """float32 [rows, K]: d · level(code), as llama.cpp computes it."""
    codes = torch.from_numpy(bq.codes.astype(np.int64))
    return values_of(codes if bq.fmt == "iq4_nl" else codes.float(), torch.from_numpy(bq.scales.astype(np.float32)),
                     bq.fmt).numpy()


def pack(bq: BlockQuant) -> np.ndarray:
    """The GGUF bytes of ``bq``: uint8 [rows, K/32 · bytes per block], llama.cpp's layout."""
    rows, k = bq.codes.shape
    nb = k // BLOCK
    d = bq.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)  # [rows, nb, 2]
    codes = bq.codes.reshape(rows, nb, BLOCK)
    if bq.fmt == "q8_0":
        qs = codes.astype(np.int8).view(np.uint8)
    else:
        nibbles = (codes.astype(np.int16) + (8 if bq.fmt == "q4_0" else 0)).astype(np.uint8)
        qs = nibbles[..., :BLOCK // 2] | (nibbles[..., BLOCK // 2:] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def ggml_type(fmt: str):
    import gguf

    return gguf.GGMLQuantizationType[FORMATS[fmt][0]]
