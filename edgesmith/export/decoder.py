"""Export a Hugging Face causal LM to a KV-cached ONNX decoder, validated token for token.

One graph does prefill and decode (the "edgesmith" layout, the input and output names ORT GenAI
and Optimum use): ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (0 = left
padding), ``position_ids`` [batch, seq], ``logits_to_keep`` (int64 scalar) and
``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim] in; ``logits`` and
``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim] out. Batch, sequence and past
length are dynamic; a prefill passes a past of length 0.

``logits_to_keep`` has Hugging Face's meaning: 0 keeps every position (perplexity, KL divergence),
N keeps the last N (generation asks for 1, so the LM head does not run over the whole prompt:
SmolLM2's 128-token prefill in ONNX Runtime takes 239 ms so, 271 ms with every position). It is
recorded as
``meta["decoder"]["logits"] = "selectable"`` (the input's name in ``meta["decoder"]["logits_input"]``).
It is optional: an initializer of its name holds the default 0, so a consumer that does not feed it
(Optimum's ``ORTModelForCausalLM``) gets every position's logits; ONNX Runtime lists it among
``get_overridable_initializers()``, not ``get_inputs()``. The folder also loads in Optimum
(transformers 4): the tokenizer config names a class transformers 4 has (``tokenizer_class.py``).

How: ``torch.onnx.export(dynamo=True)`` of a wrapper that turns the flat past tensors into a
transformers ``DynamicCache`` (one plain ``DynamicLayer`` per layer, no sliding window, so the
present is always past + seq long) and the cache back into flat presents, with eager attention
(under dynamo, SDPA gives wrong values on left-padded positions; FIELD-NOTES § Export). The LM
head is wrapped so that it sees only the last ``logits_to_keep`` positions; that count is read in
the graph (``.item()``, an unbacked size), so one graph serves both uses. The legacy TorchScript
exporter would trace that count as a constant; dynamo exports every family tested soundly
(tiny Llama-GQA, Qwen2, Qwen3, GPT-2, Gemma 3 with a sliding window shorter than the probe:
logits max abs diff <= 4e-7, 32/32 greedy tokens equal), so it is the only exporter used.
SmolLM2-135M (30 layers): export 98 s on the shared 2-core machine at load ~6.6, 238 s at load
~10 (the TorchScript exporter takes 18 s but cannot keep ``logits_to_keep`` and stores the tied LM
head twice, 652 against 542 MB), prefill max abs diff 8.9e-5, 32/32 greedy tokens equal on 3 left-padded
prompts (decode max abs diff 8.2e-5).

ONNX Runtime GenAI's model builder writes a faster graph (GroupQueryAttention, fused QKV and
norms: 15.0 against 12.6 tokens/s FP32 through the same session; built in 18 s) but it is not used:
it has no position_ids input (GroupQueryAttention applies the rotary embedding from the mask's row
sums), and on a left-padded batch its padded rows are wrong (max abs diff 29-32 on SmolLM2, 0.6 on a tiny Llama;
unpadded rows match to 1.5e-4), and it refuses a checkpoint without a tokenizer.

Validation (:func:`validate_decoder`) runs a batch of prompts of different lengths, left padded,
through PyTorch and ONNX Runtime: every real position's prefill logits, then ``steps`` greedy tokens
through each runtime's own KV-cache loop, which must agree token for token with logits within
``atol``. A breach raises :class:`~edgesmith.errors.ValidationFailed` (exit 3) naming the first
diverging step, and :func:`export_decoder` builds in a temporary folder, so nothing is left
behind.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import META_FILE, ONNX_FILE, OnnxModel, TorchModel
from edgesmith.errors import BadInput, EdgesmithError, ValidationFailed, first_line
from edgesmith.export.graph import quiet_exporter, root_cause, write_companions
from edgesmith.onnx_graph.lm_head import keep_all_logits_by_default
from edgesmith.runtimes.decoder import LOGITS_TO_KEEP
from edgesmith.runtimes.generation import left_pad, load_decoder, open_decoder
from edgesmith.runtimes.torch import eos_ids_of
from edgesmith.storage import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

LAYOUT = "edgesmith"
#: greedy steps compared token for token after the prefill
DEFAULT_STEPS = 32
#: max abs diff of logits allowed between PyTorch and ONNX Runtime (FP32 both): 11x SmolLM2's
#: largest measured difference (8.9e-5); tiny models stay below 1e-6
DEFAULT_ATOL = 1e-3
#: prompt lengths of the random-id probe (a checkpoint without a tokenizer)
RANDOM_PROBE_LENGTHS = (5, 12, 19)
#: at most this many tokens per probe prompt
PROBE_MAX_TOKENS = 48
#: example shapes the graph is traced with: (batch, seq, past); none may be 0 or 1, or
#: torch.export specialises the axis
TRACE_SHAPE = (2, 5, 3)
#: single-file ONNX up to this many weight bytes (protobuf's 2 GB limit), external data above
MAX_SINGLE_FILE_BYTES = 1_900_000_000


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------


def export_decoder(model: TorchModel, out_folder: str | Path, *, opset: int | None = None,
                   atol: float = DEFAULT_ATOL, steps: int = DEFAULT_STEPS, probe: Any = None,
                   threads: int | None = None) -> OnnxModel:
    """Export ``model`` into ``out_folder`` (replaced atomically) and validate it; nothing is
    written when validation fails. ``probe``: a tokenizer, rows of token ids of different lengths
    (a list of lists), or None for the model's tokenizer (random ids within the vocabulary when it
    has none)."""
    out_folder = Path(out_folder)
    with atomic_dir(out_folder) as tmp:
        candidate = write_decoder(model, tmp, opset=opset, atol=atol, steps=steps, probe=probe, threads=threads)
        write_json_atomic(tmp / META_FILE, candidate._meta_json())
    candidate.folder = out_folder
    return candidate


def write_decoder(model: TorchModel, folder: Path, *, opset: int | None = None, atol: float = DEFAULT_ATOL,
                  steps: int = DEFAULT_STEPS, probe: Any = None, threads: int | None = None) -> OnnxModel:
    """Write the graph and its companions (config, generation config, tokenizer) into ``folder``
    and validate them; returns the OnnxModel (``meta["decoder"]``, ``meta["validation"]``). On a
    failure the caller removes ``folder`` (the export pass's scratch folder, or atomic_dir's)."""
    if model.task != "text-generation" or not model.is_huggingface:
        raise BadInput(f"{model.name}: decoder export needs a Hugging Face causal LM (task text-generation), "
                       f"got a {model.task} {type(model.module).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = prepare_decoder(model)
    shape = cache_shape(module)
    t0 = time.perf_counter()
    export_decoder_graph(module, folder / ONNX_FILE, shape, opset=opset, label=model.name)
    export_s = time.perf_counter() - t0
    write_decoder_companions(model, folder)
    meta = {**copy.deepcopy(model.meta), **graph_meta(model, folder / ONNX_FILE),
            "decoder": decoder_record(model, shape), "export_seconds": round(export_s, 2)}
    candidate = OnnxModel(task="text-generation", name=model.name, lineage=copy.deepcopy(model.lineage), meta=meta,
                          folder=folder)
    result = validate_decoder(model, candidate, probe, steps=steps, atol=atol, threads=threads)
    candidate.meta["validation"] = result
    log.info("exported %s as a KV-cached ONNX decoder in %.1f s: prefill max abs diff %.2e, %d greedy steps equal "
             "(decode max abs diff %.2e)", model.name, export_s, result["prefill_max_abs"], result["steps"],
             result["decode_max_abs"])
    return candidate


def write_decoder_companions(model: TorchModel, folder: Path) -> None:
    """Config, tokenizer (with its chat template, its class named so that transformers 4 loads it
    too) and generation config beside the graph."""
    write_companions(model, folder)
    generation_config = getattr(model.module, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))


def prepare_decoder(model: TorchModel):
    """A deep copy in eval mode with eager attention (the input module is left as it was)."""
    module = copy.deepcopy(model.module).eval()
    try:
        module.set_attn_implementation("eager")
    except (ValueError, ImportError, AttributeError) as exc:
        raise BadInput(f"{model.name}: cannot switch to eager attention for export ({first_line(exc)})") from exc
    return module


def cache_shape(module) -> dict[str, Any]:
    """Layers, KV heads and head size as the module's cache really holds them (one tiny forward)."""
    import torch
    from transformers import DynamicCache

    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.inference_mode():
        out = module(input_ids=ids, cache=DynamicCache(), use_cache=True)
    layers = out.cache.layers
    heads = {int(layer.keys.shape[1]) for layer in layers}
    dims = {int(layer.keys.shape[3]) for layer in layers} | {int(layer.values.shape[3]) for layer in layers}
    if len(heads) != 1 or len(dims) != 1:
        raise BadInput(f"{type(module).__name__}: layers differ in KV heads {sorted(heads)} or head size {sorted(dims)}; "
                       "the decoder layout needs one shape for every layer")
    return {"num_layers": len(layers), "num_kv_heads": heads.pop(), "head_dim": dims.pop(),
            "dtype": next(module.parameters()).dtype}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    pasts = [f"past_key_values.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]
    presents = [f"present.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", LOGITS_TO_KEEP, *pasts], ["logits", *presents]


def decoder_wrapper(module):
    """The module with flat inputs and outputs (the layout above), ready for torch.export."""
    import torch
    from transformers import DynamicCache

    head = module.get_output_embeddings()
    if head is None:
        raise BadInput(f"{type(module).__name__} has no output embeddings (LM head); it is not a causal LM")

    class LastPositions(torch.nn.Module):
        """The LM head on the last ``keep`` positions only (0: all), ``keep`` set per call."""

        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner
            self.keep = None

        def forward(self, hidden):
            if self.keep is not None:
                seq = hidden.shape[1]
                # (seq - keep) % seq is 0 for keep 0 (all) and keep seq, else seq - keep: no branch
                start = (seq - self.keep) % seq
                hidden = hidden.narrow(1, start, seq - start)
            return self.inner(hidden)

    sliced = LastPositions(head)
    module.set_output_embeddings(sliced)

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
            keep = logits_to_keep.item()
            torch._check(keep >= 0)
            torch._check(keep <= input_ids.shape[1])
            sliced.keep = keep
            cache = DynamicCache(list(zip(past[0::2], past[1::2])))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True)
            sliced.keep = None
            flat = []
            for layer in out.cache.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return Flat().eval()


def export_decoder_graph(module, path: Path, shape: dict[str, Any], *, opset: int | None, label: str) -> None:
    """torch.onnx.export (dynamo) of :func:`decoder_wrapper`, then the full onnx checker."""
    import onnx
    import torch

    batch, seq, past = TRACE_SHAPE
    layers, heads, dim = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
    vocab = int(module.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    pasts = tuple(torch.randn((batch, heads, past, dim), generator=gen).to(shape["dtype"]) for _ in range(2 * layers))
    example = (ids, mask, positions, torch.tensor(1, dtype=torch.long), *pasts)
    d_batch, d_seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    d_total, d_past = torch.export.Dim("total_sequence"), torch.export.Dim("past_sequence")
    dynamic = ({0: d_batch, 1: d_seq}, {0: d_batch, 1: d_total}, {0: d_batch, 1: d_seq}, None,
               tuple({0: d_batch, 2: d_past} for _ in pasts))
    inputs, outputs = io_names(layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    options: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    wrapper = decoder_wrapper(module)
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=dynamic, external_data=weight_bytes > MAX_SINGLE_FILE_BYTES,
                              verbose=False, report=False, **options)
    except Exception as exc:  # the exporter raises many types; the user gets its reason in one line
        raise BadInput(f"decoder export of {label} to ONNX failed: {root_cause(exc)} "
                       "(--debug shows the exporter's trace)") from exc
    graph = onnx.load(str(path), load_external_data=False)  # tensors in model.onnx.data stay where they are
    keep_all_logits_by_default(graph.graph, LOGITS_TO_KEEP)
    onnx.save(graph, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several checker/inference error types
        raise EdgesmithError(f"decoder export of {label}: the ONNX graph fails onnx.checker ({first_line(exc)})") from exc


def graph_meta(model: TorchModel, path: Path) -> dict[str, Any]:
    import onnx
    import torch

    graph = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"model_type": getattr(model.config, "model_type", None), "opset": opset,
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})", "attention": "eager",
            "source_hash": model.content_hash()}


def decoder_record(model: TorchModel, shape: dict[str, Any]) -> dict[str, Any]:
    """``meta["decoder"]``: what a runtime needs to drive the graph without the PyTorch model."""
    config = model.config.get_text_config(decoder=True)
    tokenizer = model.tokenizer
    eos = eos_ids_of(model.module) or ([int(tokenizer.eos_token_id)] if getattr(tokenizer, "eos_token_id", None)
                                       is not None else [])
    pad = getattr(config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    return {"layout": LAYOUT, "num_layers": shape["num_layers"], "num_kv_heads": shape["num_kv_heads"],
            "head_dim": shape["head_dim"], "vocab_size": int(config.vocab_size),
            "max_positions": getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
            "eos_token_ids": eos, "bos_token_id": bos, "pad_token_id": pad, "logits": "selectable",
            "logits_input": LOGITS_TO_KEEP, "cache_dtype": str(shape["dtype"]).removeprefix("torch.")}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def probe_batch(model: TorchModel, probe: Any = None, *, steps: int = DEFAULT_STEPS) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompts of different lengths, left padded: (input_ids, attention_mask, where they came from).

    ``probe`` may be a tokenizer, rows of token ids, or None (the model's tokenizer, else random
    ids within the vocabulary, seeded)."""
    config = model.config.get_text_config(decoder=True)
    vocab = int(config.vocab_size)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096
    longest = max(4, min(PROBE_MAX_TOKENS, int(limit) - steps - 1))
    tokenizer = probe if probe is not None and hasattr(probe, "encode") else (model.tokenizer if probe is None else None)
    if probe is not None and tokenizer is None:
        rows = [list(map(int, r)) for r in probe]
        if len(rows) < 2 or len({len(r) for r in rows}) < 2:
            raise BadInput("probe ids need at least two rows of different lengths (left padding must be exercised)")
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise BadInput(f"probe ids must lie within the vocabulary (0..{vocab - 1})")
        source = "given ids"
    elif tokenizer is not None:
        from edgesmith.data import builtin_corpus

        texts = builtin_corpus(limit=12)
        prompts = [texts[0], " ".join(texts[1:4]), " ".join(texts[4:12])]
        rows = [tokenizer(p)["input_ids"][:longest] for p in prompts]
        rows = [[int(t) for t in r if int(t) < vocab] for r in rows]
        source = "tokenizer"
    else:
        rng = np.random.default_rng(0)
        rows = [rng.integers(0, vocab, size=min(n, longest)).tolist() for n in RANDOM_PROBE_LENGTHS]
        source = "random ids"
    rows = distinct_lengths(rows, longest)
    pad = getattr(config, "pad_token_id", None)
    ids, mask = left_pad(rows, int(pad) if pad is not None and 0 <= pad < vocab else 0)
    return ids, mask, source


def distinct_lengths(rows: list[list[int]], longest: int) -> list[list[int]]:
    """Rows cut to spread, strictly different lengths (about a third, two thirds and all of
    ``longest``), so the batch really has left padding of different widths."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [list(r) for r in rows]
    limit = longest
    for rank, i in reversed(list(enumerate(order))):
        cap = min(limit, max(1, longest * (rank + 1) // len(rows)))
        out[i] = out[i][:cap]
        limit = len(out[i]) - 1
    if any(not r for r in out):
        raise BadInput("probe prompts are too short to give rows of different lengths; give longer probe prompts")
    return out


def validate_decoder(torch_model: TorchModel, onnx_model: OnnxModel | str | Path, probe: Any = None, *,
                     steps: int = DEFAULT_STEPS, atol: float = DEFAULT_ATOL, threads: int | None = None,
                     runtime: str | None = None) -> dict:
    """PyTorch against ONNX Runtime on a left-padded batch: prefill logits on every real position,
    then ``steps`` greedy tokens through each runtime's own KV-cache loop. Tokens must agree step
    for step and logits stay within ``atol``; a flip between two tokens whose reference logits are
    closer than the logits' measured difference (a tie within rounding) ends that row's comparison
    instead of failing. Raises :class:`ValidationFailed` with the numbers and the first diverging
    step; returns the measurements. ``runtime`` runs the candidate (default: ONNX Runtime)."""
    if not isinstance(onnx_model, OnnxModel):
        folder = Path(onnx_model)
        meta = json.loads((folder / META_FILE).read_text()).get("meta", {}) if (folder / META_FILE).exists() else {}
        onnx_model = OnnxModel(task="text-generation", name=folder.name, folder=folder, meta=meta)
    ids, mask, source = probe_batch(torch_model, probe, steps=steps)
    label = f"decoder export of {torch_model.name}"
    reference = load_decoder(torch_model, threads=threads)
    candidate = open_decoder(onnx_model, runtime, threads=threads)[1]
    try:
        ref_all = reference.logits(ids, mask)
        cand_all = _run_candidate(candidate.logits, label, ids, mask)
        if ref_all.shape != cand_all.shape:
            raise ValidationFailed(f"{label}: ONNX logits have shape {cand_all.shape}, PyTorch {ref_all.shape}")
        real = mask.astype(bool)
        prefill = float(np.abs(ref_all - cand_all)[real].max())
        if not prefill <= atol:
            per_position = np.where(real, np.nan_to_num(np.abs(ref_all - cand_all), nan=np.inf).max(axis=-1), -1.0)
            row, pos = np.unravel_index(int(per_position.argmax()), per_position.shape)
            raise ValidationFailed(f"{label} fails validation: prefill logits max abs diff {prefill:.3g} > atol {atol:g} "
                                   f"(row {row}, position {pos}, batch {ids.shape[0]} left-padded prompts of "
                                   f"{', '.join(str(int(n)) for n in mask.sum(axis=1))} tokens)")
        decode = compare_greedy(reference, candidate, ids, mask, steps=steps, atol=atol, label=label)
        rows_ref, rows_cand = ref_all[real].astype(np.float64), cand_all[real].astype(np.float64)
        cosines = (rows_ref * rows_cand).sum(-1) / np.clip(
            np.linalg.norm(rows_ref, axis=-1) * np.linalg.norm(rows_cand, axis=-1), 1e-12, None)
    finally:
        reference.close()
        candidate.close()
    return {"probe": source, "batch": int(ids.shape[0]), "prompt_tokens": [int(n) for n in mask.sum(axis=1)],
            "prefill_max_abs": prefill, "atol": atol, **decode, "providers": candidate.providers,
            # the names every export reports: max abs diff and the lowest cosine of a position's logits
            "max_abs": prefill, "min_cosine": float(cosines.min())}


def compare_greedy(reference, candidate, ids: np.ndarray, mask: np.ndarray, *, steps: int, atol: float,
                   label: str) -> dict:
    """Both sessions' own greedy loops, step by step (see :func:`validate_decoder`)."""
    batch = ids.shape[0]
    active = np.ones(batch, dtype=bool)
    ties: list[dict] = []
    worst = 0.0
    equal = np.zeros(batch, dtype=int)
    ref_logits = reference.prefill(ids, mask)
    cand_logits = _run_candidate(candidate.prefill, label, ids, mask)
    for step in range(steps):
        diff = np.abs(ref_logits - cand_logits).max(axis=-1)
        ref_next = ref_logits.argmax(axis=-1)
        cand_next = cand_logits.argmax(axis=-1)
        for row in np.flatnonzero(active):
            if not diff[row] <= atol:
                raise ValidationFailed(f"{label} fails validation: logits max abs diff {diff[row]:.3g} > atol {atol:g} "
                                       f"at greedy step {step} (row {row}); tokens were equal until then")
            worst = max(worst, float(diff[row]))
            if ref_next[row] != cand_next[row]:
                top = np.sort(ref_logits[row])[-2:]
                margin = float(top[1] - top[0])
                gap = float(ref_logits[row, ref_next[row]] - ref_logits[row, cand_next[row]])
                if gap <= 2 * diff[row]:
                    ties.append({"row": int(row), "step": step, "margin": margin})
                    active[row] = False
                    continue
                raise ValidationFailed(f"{label} fails validation: greedy tokens diverge at step {step} (row {row}: "
                                       f"PyTorch {int(ref_next[row])}, ONNX {int(cand_next[row])}, reference margin "
                                       f"{gap:.3g}, logits max abs diff {diff[row]:.3g})")
            equal[row] += 1
        if step + 1 < steps:
            ref_logits = reference.step(ref_next)
            cand_logits = _run_candidate(candidate.step, label, cand_next, step=step + 1)
    return {"steps": steps, "tokens_equal": [int(n) for n in equal], "decode_max_abs": worst, "ties": ties}


def _run_candidate(call, label: str, *args: Any, step: int = 0) -> np.ndarray:
    """A call into the ONNX session; a graph that fails to run fails validation (exit 3)."""
    try:
        return call(*args)
    except EdgesmithError:
        raise
    except Exception as exc:  # ONNX Runtime raises its own types for a graph that cannot run
        raise ValidationFailed(f"{label} fails validation: ONNX Runtime cannot run the graph at "
                               f"{'prefill' if step == 0 else f'greedy step {step}'} ({first_line(exc)})") from exc
