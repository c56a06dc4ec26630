"""Decoder fidelity: how far a candidate causal LM's next-token distributions are from a reference's.

What a compressed decoder loses shows first in its next-token distributions, long before greedy
text changes (ORT GenAI's RTN INT4 of SmolLM2 left the source's greedy output after 21 tokens;
FIELD-NOTES § Decoders). So the measure is, on held-out text, per scored token:

- ``kld``: KL(reference || candidate) of the next-token distributions, in nats, mean over tokens;
- ``top1``: how often both put the same token first;
- ``perplexity`` / ``perplexity_reference``: exp of the mean negative log-likelihood of the real
  next token under each model;
- ``tokens``: how many positions were scored.

The texts: the shipped corpus (``builtin:wordnet``, 31,002 sentences) is split once, here, by
position. Sentences ``[HELDOUT_START, end)`` (the last 1,002) are the held-out evaluation slice;
:func:`calibration_texts` hands out only sentences before ``HELDOUT_START``, so nothing a
quantizer calibrates or searches on is ever scored. Consecutive held-out sentences are joined into
passages of about ``passage_tokens`` tokens (default 8 passages of ~64 tokens, ~520 scored tokens),
which run batched with left padding and an attention mask: seconds for a tiny model, 4-10 s per
model for SmolLM2-135M on 2 shared cores (ONNX Runtime; 540 scored tokens, FP32 perplexity 159).

Logits come from callables ``fn(input_ids, attention_mask) -> logits [batch, seq, vocab]`` so one
scorer serves every runtime: :func:`session_logits` is a decoder session's ``logits`` (the session
generation runs on, opened by :func:`edgesmith.runtimes.generation.open_decoder`), whatever runtime
runs it; :func:`torch_logits`, :func:`onnx_logits` and :func:`gguf_logits` name it per artifact kind.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith.artifacts import GGUF_FILE, Artifact, GgufModel, OnnxModel, TorchModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.decoder import RIGHT_PADDED, positions_from_mask

log = logging.getLogger(__name__)

#: ``fn(input_ids int64 [b, s], attention_mask int64 [b, s]) -> float logits [b, s, vocab]``
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: sentences of the shipped corpus from this index on are held out: scored, never calibrated on
HELDOUT_START = 30_000
#: defaults of the evaluation set (8 passages of ~64 tokens, batch 4: ~520 scored tokens)
PASSAGES = 8
PASSAGE_TOKENS = 64
BATCH_SIZE = 4
#: rows of the vocabulary-wide softmax computed at once (bounded memory for 150k-token vocabularies)
ROW_CHUNK = 64
#: graph inputs of the decoder layout
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
LOGITS_TO_KEEP = ("logits_to_keep", "num_logits_to_keep")
#: a corpus sentence without one of these gets a full stop before the next is joined on
SENTENCE_ENDS = (".", "!", "?", '"', "'", ")")


# ---------------------------------------------------------------------------------------------
# Texts and token batches
# ---------------------------------------------------------------------------------------------


def heldout_texts(limit: int | None = None) -> list[str]:
    """Sentences of the held-out slice of the shipped corpus, in order (at most ``limit``)."""
    from edgesmith.data import builtin_corpus

    return builtin_corpus(limit=limit, offset=HELDOUT_START)


def calibration_texts(limit: int, offset: int = 0) -> list[str]:
    """Sentences ``[offset, offset + limit)`` of the shipped corpus for calibration or searches;
    never from the held-out slice."""
    from edgesmith.data import builtin_corpus

    if offset < 0 or limit < 1 or offset + limit > HELDOUT_START:
        raise BadInput(f"calibration texts come from the first {HELDOUT_START} corpus sentences "
                       f"(asked for {limit} from {offset}); ask for fewer")
    return builtin_corpus(limit=limit, offset=offset)


@dataclass
class TokenBatch:
    """Token ids and attention mask of a padded batch (1 = real token)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def scored(self) -> int:
        """Positions whose next token is real and scored."""
        return int((self.attention_mask[:, :-1] * self.attention_mask[:, 1:]).sum())


def passages(tokenizer, texts: Sequence[str], *, count: int = PASSAGES,
             tokens: int = PASSAGE_TOKENS) -> list[list[int]]:
    """Join consecutive ``texts`` (each ended with a full stop) into ``count`` passages of at least
    ``tokens`` token ids each (the tokenizer's special tokens included; a passage stops after the
    sentence that reaches the length, at most 2 x ``tokens``, so lengths differ and batches need
    padding)."""
    if tokenizer is None:
        raise BadInput("decoder evaluation needs the model's tokenizer; put the tokenizer files "
                       "(tokenizer.json, tokenizer_config.json) in the model folder")
    if count < 1 or tokens < 2:
        raise BadInput(f"need at least one passage of at least 2 tokens (got {count} x {tokens})")
    result: list[list[int]] = []
    current: list[str] = []
    for text in texts:
        text = text.strip()
        current.append(text if text.endswith(SENTENCE_ENDS) else text + ".")
        ids = tokenizer(" ".join(current))["input_ids"]
        if len(ids) >= tokens:
            result.append(list(ids)[: 2 * tokens])
            current = []
            if len(result) == count:
                return result
    raise BadInput(f"{len(texts)} texts make only {len(result)} passages of {tokens} tokens; "
                   "give more texts or ask for fewer/shorter passages")


def pad_batches(sequences: Sequence[Sequence[int]], *, batch_size: int = BATCH_SIZE, pad_id: int = 0,
                padding_side: str = "left") -> list[TokenBatch]:
    """Batches of token id sequences, padded to the longest in each batch on ``padding_side``."""
    if padding_side not in ("left", "right"):
        raise BadInput(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if batch_size < 1:
        raise BadInput(f"batch_size must be at least 1 (got {batch_size})")
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start:start + batch_size]
        width = max(len(s) for s in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for row, seq in enumerate(group):
            span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            ids[row, span] = seq
            mask[row, span] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def heldout_batches(tokenizer, *, count: int = PASSAGES, tokens: int = PASSAGE_TOKENS,
                    batch_size: int = BATCH_SIZE, padding_side: str = "left") -> list[TokenBatch]:
    """The evaluation set: ``count`` held-out passages of ~``tokens`` tokens, padded in batches."""
    texts = heldout_texts()
    seqs = passages(tokenizer, texts, count=count, tokens=tokens)
    return pad_batches(seqs, batch_size=batch_size, pad_id=pad_id_of(tokenizer), padding_side=padding_side)


def calibration_batches(tokenizer, *, count: int, tokens: int, batch_size: int = 1, offset: int = 0,
                        padding_side: str = "left") -> list[TokenBatch]:
    """Token batches from the calibration side of the corpus (before the held-out slice)."""
    budget = min(HELDOUT_START - offset, max(64, count * tokens))
    seqs = passages(tokenizer, calibration_texts(budget, offset), count=count, tokens=tokens)
    return pad_batches(seqs, batch_size=batch_size, pad_id=pad_id_of(tokenizer), padding_side=padding_side)


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """``cumsum(mask) - 1`` clipped at 0: real tokens count from 0 after left padding (HF generate)."""
    return positions_from_mask(attention_mask)


# ---------------------------------------------------------------------------------------------
# Logits from models
# ---------------------------------------------------------------------------------------------


def session_logits(model: Artifact, *, runtime: str | None = None, threads: int | None = None,
                   **options: Any) -> LogitsFn:
    """Every position's logits of ``model`` through its decoder session (:func:`~edgesmith.runtimes.
    generation.open_decoder`, on ``runtime`` or the artifact's own): the logits generation runs on.
    A session that takes fewer rows at once than a batch holds (``MAX_BATCH``) scores row by row."""
    from edgesmith.runtimes.generation import open_decoder

    _, session = open_decoder(model, runtime, threads=threads, **options)
    rows_at_once = session.MAX_BATCH

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if rows_at_once is None or input_ids.shape[0] <= rows_at_once:
            return session.logits(input_ids, attention_mask)
        return np.concatenate([session.logits(input_ids[i:i + rows_at_once], attention_mask[i:i + rows_at_once])
                               for i in range(0, input_ids.shape[0], rows_at_once)], axis=0)

    run.session = session  # type: ignore[attr-defined]  # kept alive with the callable
    return run


def torch_logits(model: TorchModel) -> LogitsFn:
    """Logits of a Hugging Face causal LM (its PyTorch decoder session: no cache, position ids from the mask)."""
    return session_logits(model)


@dataclass
class DecoderInputs:
    """How to feed a decoder graph: its input names and, for the KV-cache inputs, dtype and shape."""

    names: list[str]
    past: dict[str, tuple[np.dtype, int, int]] = field(default_factory=dict)  # name -> (dtype, kv_heads, head_dim)
    int32: set[str] = field(default_factory=set)

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Prefill feeds with an empty cache (past_seq = 0)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        batch = input_ids.shape[0]
        values: dict[str, np.ndarray] = {}
        for name in self.names:
            if name == "input_ids":
                value = input_ids
            elif name == "attention_mask":
                value = attention_mask
            elif name == "position_ids":
                value = position_ids(attention_mask)
            elif name in LOGITS_TO_KEEP:
                value = np.array(0, dtype=np.int64)  # HF convention: 0 keeps the logits of every position
            else:
                dtype, heads, head_dim = self.past[name]
                value = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
            values[name] = value.astype(np.int32) if name in self.int32 else value
        return values


def decoder_inputs(graph_inputs: Sequence[Any], meta: dict | None = None, *, where: str = "model") -> DecoderInputs:
    """Read the inputs of a decoder graph (onnxruntime ``NodeArg``s: ``name``, ``type``, ``shape``).

    KV-cache inputs take their head count and head size from the graph's static dims, else from
    ``meta["decoder"]`` (``num_kv_heads``, ``head_dim``). An input outside the layout is a BadInput.
    """
    decoder = (meta or {}).get("decoder") or {}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}
    result = DecoderInputs(names=[i.name for i in graph_inputs])
    if "input_ids" not in result.names:
        raise BadInput(f"{where}: the graph has no input_ids input (inputs: {', '.join(result.names)}); "
                       "give a decoder ONNX in the edgesmith layout")
    for arg in graph_inputs:
        name = arg.name
        if name in ("input_ids", "attention_mask", "position_ids", *LOGITS_TO_KEEP):
            if arg.type == "tensor(int32)":
                result.int32.add(name)
            continue
        if not PAST_INPUT.match(name):
            raise BadInput(f"{where}: graph input {name!r} is not part of the decoder layout "
                           "(input_ids, attention_mask, position_ids, past_key_values.N.key/value)")
        if arg.type not in types:
            raise BadInput(f"{where}: KV-cache input {name} has type {arg.type}; expected float or float16")
        shape = list(arg.shape)
        heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else decoder.get("num_kv_heads")
        head_dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else decoder.get("head_dim")
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise BadInput(f"{where}: KV-cache input {name} has no static head count/size and edgesmith.json has "
                           "no meta.decoder num_kv_heads/head_dim; re-export the decoder with edgesmith")
        result.past[name] = (np.dtype(types[arg.type]), heads, head_dim)
    return result


@dataclass
class _GraphInput:
    """The parts of an onnxruntime NodeArg that :func:`decoder_inputs` reads, from a graph proto."""

    name: str
    type: str
    shape: list[Any]


def decoder_inputs_from_graph(graph, meta: dict | None = None, *, where: str = "model") -> DecoderInputs:
    """:func:`decoder_inputs` for an ONNX ``GraphProto`` (no session needed)."""
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
             TensorProto.BFLOAT16: "tensor(bfloat16)", TensorProto.INT64: "tensor(int64)",
             TensorProto.INT32: "tensor(int32)"}
    weights = {i.name for i in graph.initializer}
    args = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        args.append(_GraphInput(value.name, names.get(tensor.elem_type, f"tensor({tensor.elem_type})"), shape))
    return decoder_inputs(args, meta, where=where)


def onnx_logits(model: OnnxModel, *, threads: int | None = None, provider: str = "cpu") -> LogitsFn:
    """Logits of a decoder ONNX graph (its ONNX Runtime decoder session, an empty KV cache; a graph
    that is only right on unpadded rows has each row's real tokens moved to the front and back)."""
    return session_logits(model, threads=threads, provider=provider)


def unpadded_only(model: Any) -> bool:
    """A decoder graph that is only right on unpadded or right-padded rows (``meta["decoder"]
    ["padding"]`` in :data:`RIGHT_PADDED`: ORT GenAI folders, edgesmith.export.decoder_genai)."""
    return isinstance(model, OnnxModel) and ((model.meta or {}).get("decoder") or {}).get("padding") in RIGHT_PADDED


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_logits(model: GgufModel, runtime: str = "auto", *, threads: int | None = None) -> tuple[LogitsFn, str]:
    """A logits callable for a GGUF artifact and the name of what computes it: its own runtime's
    session (llama.cpp, one row at a time) unless ``runtime`` is ``"transformers"`` or, for
    ``"auto"``, llama-cpp-python is not installed; then transformers reading the file back (its
    weights dequantized: the weights' rounding only, not llama.cpp's 8-bit activations)."""
    if runtime != "transformers" and (runtime != "auto" or llamacpp_available()):
        return session_logits(model, threads=threads), "llama.cpp"
    import torch
    import transformers

    module = transformers.AutoModelForCausalLM.from_pretrained(str(model.folder), gguf_file=GGUF_FILE,
                                                               dtype=torch.float32).eval()
    return torch_logits(TorchModel(task="text-generation", module=module, tokenizer=model.tokenizer)), "transformers"


def logits_fn(model: Artifact | LogitsFn, **options: Any) -> LogitsFn:
    """A logits callable for an artifact (TorchModel or decoder OnnxModel), or the callable itself."""
    if isinstance(model, TorchModel):
        return torch_logits(model)
    if isinstance(model, OnnxModel):
        return onnx_logits(model, **options)
    if isinstance(model, GgufModel):
        return gguf_logits(model, threads=options.get("threads"))[0]
    if callable(model):
        return model
    raise BadInput(f"cannot score a {getattr(model, 'kind', type(model).__name__)} model as a decoder; "
                   "give a torch or ONNX causal LM")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))


def _scored_rows(batch: TokenBatch, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit rows of the scored positions (next token real) and their targets."""
    if logits.shape[:2] != batch.input_ids.shape:
        raise BadInput(f"logits of shape {list(logits.shape)} for a batch of {list(batch.input_ids.shape)} tokens")
    keep = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).astype(bool)
    return logits[:, :-1][keep], batch.input_ids[:, 1:][keep]


@dataclass
class Reference:
    """The reference model's logits on a fixed set of batches (scored rows only, float32), computed
    once and compared with any number of candidates (the accuracy-aware search scores dozens).
    Both sides go through the same float64 log-softmax, so identical logits give KL exactly 0."""

    batches: list[TokenBatch]
    rows: list[np.ndarray]  # float32 logits [scored, vocab] per batch
    targets: list[np.ndarray]
    nll: float

    @classmethod
    def build(cls, fn: LogitsFn, batches: list[TokenBatch]) -> Reference:
        rows_all, targets, nll, count = [], [], 0.0, 0
        for batch in batches:
            rows, target = _scored_rows(batch, fn(batch.input_ids, batch.attention_mask))
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            for i in range(0, len(rows), ROW_CHUNK):
                lp = _log_softmax(rows[i:i + ROW_CHUNK])
                nll -= float(np.take_along_axis(lp, target[i:i + ROW_CHUNK, None], axis=1).sum())
            rows_all.append(rows)
            targets.append(target)
            count += len(target)
        if count == 0:
            raise BadInput("no position to score: every sequence is shorter than 2 real tokens")
        return cls(batches, rows_all, targets, nll / count)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.targets)

    def compare(self, fn: LogitsFn) -> dict[str, float]:
        """kld (reference || candidate, mean nats/token), top1, perplexity of both, tokens."""
        kld = agree = nll = 0.0
        for batch, ref_rows, target in zip(self.batches, self.rows, self.targets):
            rows, _ = _scored_rows(batch, fn(batch.input_ids, batch.attention_mask))
            if rows.shape[-1] != ref_rows.shape[-1]:
                raise BadInput(f"candidate vocabulary {rows.shape[-1]} differs from the reference's {ref_rows.shape[-1]}")
            rows = rows.astype(np.float32, copy=False)
            for i in range(0, len(rows), ROW_CHUNK):
                cand = _log_softmax(rows[i:i + ROW_CHUNK])
                ref = _log_softmax(ref_rows[i:i + ROW_CHUNK])
                kld += float((np.exp(ref) * (ref - cand)).sum())
                agree += float((ref.argmax(-1) == cand.argmax(-1)).sum())
                nll -= float(np.take_along_axis(cand, target[i:i + ROW_CHUNK, None], axis=1).sum())
        n = self.tokens
        if not np.isfinite(kld):
            raise BadInput("the candidate's logits are not finite (NaN/inf); the model is broken")
        return {"kld": max(kld / n, 0.0), "top1": agree / n, "perplexity": float(np.exp(nll / n)),
                "perplexity_reference": float(np.exp(self.nll)), "tokens": n}


def lm_fidelity(candidate: Artifact | LogitsFn, reference: Artifact | LogitsFn, *, tokenizer=None,
                batches: list[TokenBatch] | None = None, passages_count: int = PASSAGES,
                passage_tokens: int = PASSAGE_TOKENS, batch_size: int = BATCH_SIZE,
                padding_side: str = "left", threads: int | None = None) -> dict[str, float]:
    """Decoder fidelity of ``candidate`` against ``reference`` on held-out corpus text.

    Either may be a TorchModel, a decoder OnnxModel or a logits callable; ``tokenizer`` defaults to
    the candidate's or the reference's. Returns ``{"kld", "top1", "perplexity",
    "perplexity_reference", "tokens"}``."""
    if batches is None:
        tokenizer = tokenizer or getattr(candidate, "tokenizer", None) or getattr(reference, "tokenizer", None)
        if any(unpadded_only(m) for m in (candidate, reference)):
            padding_side = "right"  # ORT GenAI builder graphs: wrong on left-padded rows, right on right-padded
        batches = heldout_batches(tokenizer, count=passages_count, tokens=passage_tokens, batch_size=batch_size,
                                  padding_side=padding_side)
    options = {"threads": threads} if threads else {}
    ref = Reference.build(logits_fn(reference, **(options if isinstance(reference, OnnxModel) else {})), batches)
    result = ref.compare(logits_fn(candidate, **(options if isinstance(candidate, OnnxModel) else {})))
    log.info("decoder fidelity on %d held-out tokens: KL %.4g, top-1 %.4f, perplexity %.3f (reference %.3f)",
             result["tokens"], result["kld"], result["top1"], result["perplexity"], result["perplexity_reference"])
    return result
