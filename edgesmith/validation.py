"""Validation: a transformed or exported model against its reference on padded probe inputs (max
abs difference on real positions, cosine of pooled rows), failing with
:class:`~edgesmith.errors.ValidationFailed` (exit 3) instead of warning. The export, quantize,
TensorRT and early-exit passes all validate through it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.inputs import attention_mask_of, tokenize

log = logging.getLogger(__name__)

#: probe batch sizes and fixed sequence lengths (each batch is also padded to its longest text)
DEFAULT_BATCHES = (1, 3)
DEFAULT_SEQ_LENGTHS = (48,)
#: sentences of the corpus used to build probe texts
PROBE_POOL = 256
#: sentences joined into one "paragraph" probe text, so that probes reach longer sequences
PARAGRAPH_SIZES = (3, 6)



def probe_texts(texts: Sequence[str]) -> list[str]:
    """Real sentences plus short paragraphs of joined sentences, sorted by length."""
    pool = [t for t in dict.fromkeys(texts) if t.strip()]
    if not pool:
        raise BadInput("no texts to probe the models with; give data with at least one text")
    joined = [" ".join(pool[i:i + size]) for size in PARAGRAPH_SIZES for i in range(0, len(pool) - size + 1, size)]
    return sorted(pool + joined, key=len)


def pick_batch(pool: Sequence[str], batch: int, shift: int) -> list[str]:
    """``batch`` texts spread across the length range (so a batch has padded positions)."""
    n = len(pool)
    return [pool[(int((j + 0.5) * n / batch) + shift) % n] for j in range(batch)]


def probe_feeds(tokenizer, texts: Sequence[str], input_names: Sequence[str], *, batches: Sequence[int],
                seq_lengths: Sequence[int], left_padding: bool) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """The probes: (description, feeds) for each batch size × (longest, each fixed length) ×
    padding sides."""
    pool = probe_texts(texts)
    sides = ["right", "left"] if left_padding else [tokenizer.padding_side or "right"]
    probes = []
    shift = 0
    for batch in batches:
        if batch < 1:
            raise BadInput(f"probe batch size must be at least 1, got {batch}")
        for seq in [None, *seq_lengths]:
            rows = pick_batch(pool, batch, shift)
            shift += 7
            for side in sides:
                tok = copy.copy(tokenizer)
                tok.padding_side = side
                feeds = tokenize(tok, rows, input_names=list(input_names), seq=seq)
                mask = attention_mask_of(feeds)
                desc = {"batch": int(mask.shape[0]), "seq": int(mask.shape[1]), "padding": side,
                        "padded_positions": int(mask.size - mask.sum())}
                probes.append((desc, feeds))
    return probes


def config_limits(*artifacts: Artifact) -> dict[str, int | None]:
    """``vocab_size``, ``max_positions`` and ``pad_token_id`` from the first artifact whose config
    says them: a TorchModel's config, else the ``config.json`` beside a folder artifact's files."""
    import json

    found: dict[str, int | None] = {"vocab_size": None, "max_positions": None, "pad_token_id": None}
    for art in artifacts:
        config = getattr(art, "config", None)
        values: dict[str, Any] = {}
        if config is not None:
            values = {k: getattr(config, k, None) for k in ("vocab_size", "max_position_embeddings", "n_positions",
                                                            "pad_token_id")}
        elif getattr(art, "folder", None) is not None and (art.folder / "config.json").is_file():
            try:
                values = json.loads((art.folder / "config.json").read_text())
            except (OSError, ValueError):
                values = {}
            values = values if isinstance(values, dict) else {}
        positions = values.get("max_position_embeddings") or values.get("n_positions")
        for key, value in (("vocab_size", values.get("vocab_size")), ("max_positions", positions),
                           ("pad_token_id", values.get("pad_token_id"))):
            if found[key] is None and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                found[key] = value
    return found


def id_feeds(rng: np.random.Generator, lengths: Sequence[int], seq: int, input_names: Sequence[str], *,
             vocab_size: int, side: str = "right", pad_token_id: int | None = None) -> dict[str, np.ndarray]:
    """One batch of random token ids within the vocabulary (rows of ``lengths`` real tokens, padded
    to ``seq`` on ``side``): model inputs made from the config when there is no tokenizer."""
    batch = len(lengths)
    low = min(5, vocab_size - 1)  # keep clear of the usual special ids
    ids = np.full((batch, seq), pad_token_id if pad_token_id is not None and pad_token_id < vocab_size else 0,
                  dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, length in enumerate(lengths):
        length = max(1, min(int(length), seq))
        cols = slice(0, length) if side == "right" else slice(seq - length, seq)
        ids[row, cols] = rng.integers(low, vocab_size, size=length)
        mask[row, cols] = 1
    feeds = {}
    for name in input_names:
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(ids)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(seq), ids.shape).astype(np.int64)
        else:
            raise BadInput(f"the model needs an input named '{name}', which token-id probes cannot make; "
                           "save a tokenizer beside the model (tokenizer.save_pretrained)")
    return feeds


#: length of a "padded to the longest row" probe made from the config (no tokenizer)
ID_PROBE_LONGEST = 24


def id_probe_feeds(limits: dict[str, int | None], input_names: Sequence[str], *, batches: Sequence[int],
                   seq_lengths: Sequence[int], left_padding: bool, seed: int = 0
                   ) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """The probes of :func:`probe_feeds` (same batch sizes, lengths and padding sides) made of random
    token ids within the config's vocabulary, for a model saved without a tokenizer."""
    vocab = limits.get("vocab_size")
    if not vocab or vocab < 2:
        raise BadInput("no tokenizer and no vocab_size in the config to make probe inputs from; save a tokenizer "
                       "beside the model (tokenizer.save_pretrained)")
    cap = max(2, (limits.get("max_positions") or 4096) - 2)  # RoBERTa-like position offsets take 2
    rng = np.random.default_rng(seed)
    sides = ["right", "left"] if left_padding else ["right"]
    probes = []
    for batch in batches:
        if batch < 1:
            raise BadInput(f"probe batch size must be at least 1, got {batch}")
        for fixed in [None, *seq_lengths]:
            seq = min(fixed or ID_PROBE_LONGEST, cap)
            lengths = [max(1, round(seq * (j + 1) / batch)) for j in range(batch)]  # the longest row fills seq
            for side in sides:
                feeds = id_feeds(rng, lengths, seq, input_names, vocab_size=vocab, side=side,
                                 pad_token_id=limits.get("pad_token_id"))
                mask = attention_mask_of(feeds)
                probes.append(({"batch": batch, "seq": seq, "padding": side,
                                "padded_positions": int(mask.size - mask.sum())}, feeds))
    return probes


def _pick_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return outputs[name] if name in outputs else next(iter(outputs.values()))


def measure(ref: np.ndarray, cand: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Max/mean abs diff over non-padded positions and min cosine of mask-mean-pooled rows.

    ``(batch, seq, ...)`` outputs are masked and pooled; ``(batch, classes)`` outputs (logits of a
    classifier) are compared as they are.
    """
    ref = ref.astype(np.float64)
    cand = cand.astype(np.float64)
    diff = np.abs(ref - cand)
    if ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        kept = diff[keep]
        weights = mask.reshape(mask.shape + (1,) * (ref.ndim - 2)).astype(np.float64)
        axes = (1,)
        counts = np.maximum(weights.sum(axis=1), 1.0)
        ref_rows = ((ref * weights).sum(axis=axes) / counts).reshape(ref.shape[0], -1)
        cand_rows = ((cand * weights).sum(axis=axes) / counts).reshape(ref.shape[0], -1)
    else:
        kept = diff.reshape(-1)
        ref_rows = ref.reshape(ref.shape[0], -1)
        cand_rows = cand.reshape(cand.shape[0], -1)
    norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(cand_rows, axis=1)
    cosine = (ref_rows * cand_rows).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"max_abs": float(kept.max()) if kept.size else 0.0,
            "mean_abs": float(kept.mean()) if kept.size else 0.0,
            "min_cosine": float(cosine.min()),
            "values": int(kept.size)}


def compare_outputs(reference: Artifact, candidate: Artifact, *, texts: list[str] | None = None,
                    batches: Sequence[int] = DEFAULT_BATCHES, seq_lengths: Sequence[int] = DEFAULT_SEQ_LENGTHS,
                    left_padding: bool | None = None, tokenizer: Any = None, threads: int | None = None,
                    accept: Callable[[dict], bool] | None = None) -> dict:
    """Run both artifacts on the same probe inputs and measure how far the candidate is.

    Each artifact runs on its default runtime (torch for a TorchModel, ONNX Runtime for an
    OnnxModel). ``texts`` default to the shipped WordNet corpus; with no tokenizer anywhere the probes
    are random token ids within the config's vocabulary (:func:`id_probe_feeds`); ``left_padding`` defaults to
    True for text-generation. ``accept`` (given a probe's description: batch, seq, padding) keeps
    only the probes a candidate can run, such as the shapes a TensorRT engine was built for. Returns ``max_abs`` and ``mean_abs`` over non-padded positions,
    ``min_cosine`` of mask-mean-pooled rows, the output compared, and the same per probe.
    """
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    tokenizer = tokenizer or reference.tokenizer or candidate.tokenizer
    if left_padding is None:
        left_padding = reference.task == "text-generation"
    names = list(dict.fromkeys([*reference.input_names, *candidate.input_names]))
    output = reference.output_names[0]
    if tokenizer is None:  # a checkpoint saved without its tokenizer: token ids from the config
        probes = id_probe_feeds(config_limits(reference, candidate), names, batches=batches,
                                seq_lengths=seq_lengths, left_padding=left_padding)
    else:
        if texts is None:
            from edgesmith.data import builtin_corpus

            texts = builtin_corpus(limit=PROBE_POOL)
        probes = probe_feeds(tokenizer, texts, names, batches=batches, seq_lengths=seq_lengths,
                             left_padding=left_padding)
    if accept is not None:
        probes = [(desc, feeds) for desc, feeds in probes if accept(desc)]
        if not probes:
            raise BadInput(f"no probe input of {candidate.name} lies within the shapes it accepts; widen its shapes")
    ref_session = get_runtime(default_runtime_for(reference)).load(reference, threads=threads)
    cand_session = get_runtime(default_runtime_for(candidate)).load(candidate, threads=threads)
    results = []
    try:
        for desc, feeds in probes:
            ref = _pick_output(ref_session.run(feeds), output)
            cand = _pick_output(cand_session.run(feeds), output)
            if ref.shape != cand.shape:
                raise ValidationFailed(f"{candidate.name} gives output shape {cand.shape} where {reference.name} "
                                       f"gives {ref.shape} on probe batch={desc['batch']} seq={desc['seq']}")
            results.append({**desc, **measure(ref, cand, attention_mask_of(feeds))})
    finally:
        ref_session.close()
        cand_session.close()
    return summarize(results, output)


def summarize(probes: list[dict], output: str) -> dict:
    values = sum(p["values"] for p in probes)
    mean_abs = sum(p["mean_abs"] * p["values"] for p in probes) / max(values, 1)
    return {
        "output": output,
        "max_abs": float(np.max([p["max_abs"] for p in probes])),  # NaN propagates
        "mean_abs": mean_abs,
        "min_cosine": float(np.min([p["min_cosine"] for p in probes])),
        "probes": probes,
    }


def _where(probe: dict) -> str:
    return f"probe batch={probe['batch']} seq={probe['seq']} ({probe['padding']} padding)"


def validate(reference: Artifact, candidate: Artifact, atol: float = 1e-3, min_cosine: float = 0.9999, *,
             label: str = "export", **kw: Any) -> dict:
    """:func:`compare_outputs`, then :class:`ValidationFailed` (one line with the numbers) when
    the max abs diff exceeds ``atol`` or a pooled row's cosine falls below ``min_cosine``.
    NaN counts as a failure. Returns the comparison when it holds."""
    result = compare_outputs(reference, candidate, **kw)
    problems = []
    worst_abs = max(result["probes"], key=lambda p: _nan_high(p["max_abs"]))
    if not result["max_abs"] <= atol:
        problems.append(f"max abs diff {worst_abs['max_abs']:.3g} > atol {atol:g} on {_where(worst_abs)}")
    worst_cos = min(result["probes"], key=lambda p: _nan_low(p["min_cosine"]))
    if not result["min_cosine"] >= min_cosine:
        problems.append(f"min cosine {worst_cos['min_cosine']:.6f} < {min_cosine:g} on {_where(worst_cos)}")
    if problems:
        raise ValidationFailed(f"{label} of {reference.name} fails validation: " + "; ".join(problems)
                               + f" (mean abs diff {result['mean_abs']:.3g} over {len(result['probes'])} probes)")
    return result


def _nan_high(value: float) -> float:
    return float("inf") if np.isnan(value) else value


def _nan_low(value: float) -> float:
    return float("-inf") if np.isnan(value) else value
