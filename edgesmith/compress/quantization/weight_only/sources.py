"""Sources of ready blocks: weights already quantized in a file, repacked into MatMulNBits as they are.

Not a qparams algorithm (:mod:`.methods`): nothing is chosen, the file decides bits and blocks,
so ``bits``, ``block``, ``symmetric`` and the accuracy-aware search do not apply. Today's one
source is a GGUF file (:mod:`edgesmith.gguf.repack`): the model must be the FP32 one transformers
dequantized from that file, whose path it records in ``meta["gguf"]["path"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgesmith.errors import BadInput

#: the options a source's file decides (refused when given with a source)
FIXED_BY_SOURCE = ("bits", "block", "symmetric", "max_kld", "fallback")


@dataclass(frozen=True)
class BlockSource:
    """Where ready blocks come from: ``name`` (the ``method`` value), ``label`` (the file's kind, for
    messages), ``file_option`` (the config field naming the file), ``recorded_file(meta)`` (the file a model loaded from one records),
    ``mode`` (the report's mode) and ``repack`` (:func:`repack_gguf`'s signature)."""

    name: str
    label: str
    file_option: str
    help: str
    mode: str
    recorded_file: Callable[[dict], str | None]
    repack: Callable[..., tuple[Any, dict[str, str], str]]


def _gguf_recorded(meta: dict) -> str | None:
    return ((meta or {}).get("gguf") or {}).get("path")


def repack_gguf(original, path: str, candidates, excluded: list[str], *, accuracy_level: int, embedding: bool,
                report: dict[str, Any]) -> tuple[Any, dict[str, str], str]:
    """The GGUF's own blocks, repacked exactly: the graph, each candidate's precision, the embedding's."""
    from edgesmith.gguf.repack import PRECISION, repack

    quantized, info = repack(original, path, accuracy_level=accuracy_level, embedding=embedding, exclude=set(excluded))
    report["gguf"] = {"file": str(path), "types": info["types"], "permuted": info["permuted"],
                      "blocksum_branches": info["blocksum_branches"], "not_matched": info["float"]}
    matched = info["matched"]
    if candidates.nodes and not any(n in matched for n in candidates.nodes):
        raise BadInput(f"{path}: none of the graph's {len(candidates.nodes)} MatMul weights equals a tensor of this "
                       "GGUF (the repack matches values, not names); export that GGUF itself (edgesmith export "
                       f"{path} --to genai, or --to onnx) and quantize that folder with --method gguf")
    precisions = {n: PRECISION[matched[n]["type"]] if n in matched else "float" for n in candidates.nodes}
    table = "float"
    if candidates.embedding and candidates.embedding in matched:
        table = PRECISION[matched[candidates.embedding]["type"]]
    return quantized, precisions, table


#: the sources of ready blocks, by the name ``method`` takes
SOURCES: dict[str, BlockSource] = {s.name: s for s in (
    BlockSource("gguf", "GGUF", "gguf_file", "the GGUF's own 4-bit blocks repacked exactly", "gguf-repack", _gguf_recorded,
                repack_gguf),
)}
