"""A Hugging Face causal LM as a GGUF file that llama.cpp runs (GGUF out).

The ``gguf`` package writes the file (``GGUFWriter``), names the tensors (its ``TensorNameMap``, the
table llama.cpp's own converter uses) and quantizes the blocks (``gguf.quants``: Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1 in numpy); K-quants (Q4_K_M, Q5_K_M, Q6_K, ...) go through llama.cpp's own quantizer
(llama-cpp-python's ``llama_model_quantize``) from an F32 file written first. What is written:

- the architecture's hyper-parameters (``{arch}.block_count``, ``embedding_length``,
  ``feed_forward_length``, ``attention.head_count(_kv)``, ``attention.key_length`` / ``value_length``
  = head_dim, so a head-pruned Llama whose heads × head_dim differs from the hidden size loads;
  ``rope.freq_base``, ``rope.dimension_count``, ``attention.layer_norm_rms_epsilon``,
  ``context_length``, ``vocab_size``), ``general.file_type`` and ``general.quantization_version``;
- the tokenizer (:mod:`edgesmith.gguf.vocab`) with its chat template;
- every weight: 1-D tensors (norms, biases) in F32; 2-D weights in the chosen type, the token
  embedding (and an untied output head) in ``embeddings`` (default Q8_0 under a 4- or 5-bit type,
  as llama.cpp's shipped files keep it); a weight whose rows are not a whole number of blocks is
  written in F16 and listed in the report. A tied output head is not written (llama.cpp reuses
  ``token_embd``).
- Llama-family q/k projections are permuted the way llama.cpp's converter does (its RoPE pairs
  dimensions i and i + d/2 differently from Hugging Face's rotate_half layout); transformers undoes
  the permutation when it reads the file, so F32 out and back in is exact (tested).

Refused with one line: architectures outside :data:`ARCHITECTURES`, RoPE scaling other than none,
per-layer sizes that differ (global pruning allocation: llama.cpp's llama graph takes one size for
every layer), and quant types neither the ``gguf`` package nor an installed llama.cpp provides.

Layer L1: imports edgesmith.errors, storage and gguf.vocab, plus gguf, numpy and torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BadInput, no_space, no_space_cause
from edgesmith.faults import point
from edgesmith.gguf.file import open_gguf
from edgesmith.gguf.vocab import add_vocab, build_vocab

log = logging.getLogger(__name__)

#: Hugging Face model_type -> (llama.cpp architecture, q/k rows permuted for llama.cpp's RoPE)
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                              "qwen2": ("qwen2", False)}
#: quant types the gguf package writes itself -> (GGMLQuantizationType name, LlamaFileType name)
NUMPY_QUANTS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
#: quant types only llama.cpp's quantizer makes -> its LLAMA_FTYPE_* constant name in llama_cpp
LLAMACPP_QUANTS: dict[str, str] = {
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}
#: file types of formats whose blocks a quantizer hands in ready (edgesmith.gguf.blocks; gguf-quantize)
BLOCK_FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "iq4_nl": "MOSTLY_IQ4_NL"}
QUANTS = tuple(NUMPY_QUANTS) + tuple(LLAMACPP_QUANTS)
LLAMACPP_INSTALL = "pip install 'edgesmith[llamacpp]'"


@dataclass
class Hyper:
    """The sizes llama.cpp needs, read from a Hugging Face config."""

    arch: str
    permute: bool
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool


def _rope(config) -> tuple[float, dict[str, Any] | None]:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5: rope_theta moved in here
        kind = params.get("rope_type", "default")
        return float(params["rope_theta"]), None if kind == "default" else params
    scaling = getattr(config, "rope_scaling", None)
    theta = getattr(config, "rope_theta", 10000.0)
    return float(theta), scaling if scaling and scaling.get("rope_type", scaling.get("type")) != "default" else None


def hyper_of(config, structure: dict | None = None) -> Hyper:
    """The model's sizes, or BadInput naming what llama.cpp's graph cannot take."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise BadInput(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}; "
                       "for others use llama.cpp's convert_hf_to_gguf.py")
    if structure:
        raise BadInput("GGUF export needs the same sizes in every layer (llama.cpp's graph takes one head count and "
                       "one FFN width), and this model's layers differ; prune with allocation: uniform")
    theta, scaling = _rope(config)
    if scaling is not None:
        raise BadInput(f"GGUF export writes plain RoPE only; this model uses {scaling.get('rope_type') or scaling} "
                       "scaling (convert it with llama.cpp's convert_hf_to_gguf.py)")
    arch, permute = ARCHITECTURES[model_type]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return Hyper(arch=arch, permute=permute, layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
                 ffn=int(config.intermediate_size), heads=heads,
                 kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim,
                 context=int(getattr(config, "max_position_embeddings", 2048)), vocab=int(config.vocab_size),
                 eps=float(config.rms_norm_eps), rope_theta=theta, tied=bool(getattr(config, "tie_word_embeddings",
                                                                                     False)))


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a q or k projection of ``heads`` heads: within each head, the
    first and second halves of the rows interleave (row i and i + d/2 become neighbours)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def _block_size(qtype) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[qtype][0]


def _tensor_type(gguf_name: str, array: np.ndarray, quant: str, embeddings: str) -> str:
    if array.ndim < 2:
        return "f32"
    if gguf_name in ("token_embd.weight", "output.weight"):
        return embeddings
    return quant


def _encode(array: np.ndarray, kind: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw dtype or None, the type written): a row that is not whole blocks falls back to F16."""
    from gguf import quants

    if kind == "f32":
        return array.astype(np.float32), None, "F32"
    if kind == "f16":
        return array.astype(np.float16), None, "F16"
    qtype = _qtype(NUMPY_QUANTS[kind][0])
    if array.shape[-1] % _block_size(qtype):
        return array.astype(np.float16), None, "F16"
    return quants.quantize(array.astype(np.float32), qtype), qtype, qtype.name


def default_embeddings(quant: str) -> str:
    """The token embedding's type under ``quant``: Q8_0 under 4/5-bit types (and K-quants), else ``quant``."""
    if quant in LLAMACPP_QUANTS or quant.startswith(("q4", "q5")):
        return "q8_0"
    return quant


def write_gguf(module, tokenizer, path: str | Path, *, quant: str = "f16", embeddings: str | None = None,
               structure: dict | None = None, name: str = "model", tokenizer_pre: str | None = None,
               origin: str | Path | None = None, blocks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``module`` (a Hugging Face causal LM) and ``tokenizer`` to the GGUF file ``path``.

    ``blocks`` ({parameter name: :class:`edgesmith.gguf.blocks.BlockQuant`}) are written byte for
    byte instead of quantizing those parameters here (their rows permuted as the others'); with
    blocks, ``quant`` names the file type (``q4_0`` or ``iq4_nl``) and every other 2-D weight but the
    embedding is written at Q8_0.

    Returns a report: architecture, quant, every tensor's written type (counts), F16 fallbacks, the
    tokenizer's pre-tokenizer name and the notes on anything guessed. The file appears only when
    it is complete (written beside it, then renamed).
    """
    quant = quant.lower()
    if quant not in QUANTS:
        raise BadInput(f"GGUF quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    embeddings = (embeddings or default_embeddings(quant)).lower()
    if embeddings not in NUMPY_QUANTS:
        raise BadInput(f"GGUF embeddings type {embeddings!r} is not supported; choose one of {', '.join(NUMPY_QUANTS)}")
    hyper = hyper_of(module.config, structure)
    _check_k_quant_rows(quant, hyper)
    vocab = build_vocab(tokenizer, hyper.vocab, pre=tokenizer_pre, origin=origin)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if blocks is not None:
            if quant not in BLOCK_FILE_TYPES:
                raise BadInput(f"GGUF with ready blocks: file type {quant!r} is not one of {', '.join(BLOCK_FILE_TYPES)}")
            types, fallbacks = _write(module, hyper, vocab, tmp, "q8_0", embeddings, name, blocks=blocks,
                                      file_type=BLOCK_FILE_TYPES[quant])
        elif quant in LLAMACPP_QUANTS:
            ftype = _llamacpp_ftype(quant)
            f32 = path.with_name(f".{path.name}.{os.getpid()}.f32.tmp")
            try:
                types, fallbacks = _write(module, hyper, vocab, f32, "f32", "f32", name)
                _llamacpp_quantize(f32, tmp, ftype)
            finally:
                f32.unlink(missing_ok=True)
            types = _types_in(tmp)
        else:
            types, fallbacks = _write(module, hyper, vocab, tmp, quant, embeddings, name)
        point(f"commit:{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if no_space_cause(exc) is not None:
            raise no_space(path.parent, exc) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "architecture": hyper.arch, "quant": quant,
            "embeddings": embeddings if quant not in LLAMACPP_QUANTS or blocks is not None else "llama.cpp's choice",
            "tensor_types": dict(sorted(Counter(types.values()).items())),
            "f16_fallbacks": fallbacks, "tokenizer_pre": vocab.pre, "notes": vocab.notes,
            "size_bytes": path.stat().st_size, "layers": hyper.layers, "tied_embeddings": hyper.tied}


#: K-quants pack super-blocks of 256 weights of a row
K_QUANT_ROW = 256


def _check_k_quant_rows(quant: str, hyper: Hyper) -> None:
    """K-quants need rows that are whole 256-weight super-blocks; llama.cpp's quantizer would
    otherwise write the narrower tensors in another type without saying so (SmolLM2's 576-wide rows
    fell back to Q5_0 in a Q4_K_M file)."""
    if not (quant in LLAMACPP_QUANTS and "_k" in quant):
        return
    widths = {"hidden size": hyper.hidden, "FFN width": hyper.ffn, "attention width": hyper.heads * hyper.head_dim}
    ragged = {name: w for name, w in widths.items() if w % K_QUANT_ROW}
    if ragged:
        name, width = next(iter(ragged.items()))
        raise BadInput(f"GGUF {quant}: K-quants pack rows in blocks of {K_QUANT_ROW}, and this model's {name} is {width}; "
                       "choose q4_0 or iq4_nl (32-wide blocks; edgesmith quantize MODEL --to gguf keeps their fidelity), "
                       "q8_0, or q4_1")


def gguf_tensors(module, hyper: Hyper) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every weight in llama.cpp's layout (q/k permuted, tied head left out)."""
    return [(gguf_name, array) for _, gguf_name, array, _ in _named_tensors(module, hyper)]


def _named_tensors(module, hyper: Hyper) -> list[tuple[str, str, np.ndarray, Any]]:
    """(HF name, GGUF name, float32 array in llama.cpp's layout, the row permutation applied or None)."""
    import functools

    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == hyper.arch)
    names = gguf.get_tensor_name_map(arch, hyper.layers)
    out = []
    for hf_name, tensor in module.state_dict().items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".original_inv_freq")):
            continue
        if hf_name == "lm_head.weight" and hyper.tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BadInput(f"GGUF export: no llama.cpp name for the parameter {hf_name!r} of this {hyper.arch} model")
        array = tensor.detach().to("cpu").float().numpy()
        permute = None
        if hyper.permute and hf_name.endswith("q_proj.weight"):
            permute = functools.partial(permute_rows, heads=hyper.heads)
        elif hyper.permute and hf_name.endswith("k_proj.weight"):
            permute = functools.partial(permute_rows, heads=hyper.kv_heads)
        out.append((hf_name, gguf_name, array if permute is None else permute(array), permute))
    return out


def _write(module, hyper: Hyper, vocab, path: Path, quant: str, embeddings: str, name: str, *,
           blocks: dict[str, Any] | None = None, file_type: str | None = None) -> tuple[dict[str, str], list[str]]:
    import gguf

    from edgesmith.gguf.blocks import ggml_type, pack

    writer = gguf.GGUFWriter(str(path), hyper.arch)
    writer.add_name(name)
    writer.add_context_length(hyper.context)
    writer.add_embedding_length(hyper.hidden)
    writer.add_block_count(hyper.layers)
    writer.add_feed_forward_length(hyper.ffn)
    writer.add_head_count(hyper.heads)
    writer.add_head_count_kv(hyper.kv_heads)
    writer.add_key_length(hyper.head_dim)
    writer.add_value_length(hyper.head_dim)
    writer.add_rope_dimension_count(hyper.head_dim)
    writer.add_rope_freq_base(hyper.rope_theta)
    writer.add_layer_norm_rms_eps(hyper.eps)
    writer.add_vocab_size(hyper.vocab)
    writer.add_file_type(int(gguf.LlamaFileType[file_type or NUMPY_QUANTS[quant][1]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab)
    types, fallbacks = {}, []
    for hf_name, gguf_name, array, permute in _named_tensors(module, hyper):
        if blocks and hf_name in blocks:
            bq = blocks[hf_name] if permute is None else blocks[hf_name].permuted_rows(permute)
            if bq.shape != array.shape:
                raise BadInput(f"GGUF blocks for {hf_name}: shape {bq.shape} is not the weight's {array.shape}")
            types[gguf_name] = ggml_type(bq.fmt).name
            writer.add_tensor(gguf_name, pack(bq), raw_dtype=ggml_type(bq.fmt))
            continue
        kind = _tensor_type(gguf_name, array, quant, embeddings)
        data, raw, written = _encode(array, kind)
        if written == "F16" and kind not in ("f16",):
            fallbacks.append(gguf_name)
        types[gguf_name] = written
        if raw is None:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return types, fallbacks


def _types_in(path: Path) -> dict[str, str]:
    return open_gguf(path).tensor_types()


def _llamacpp_ftype(quant: str) -> int:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BadInput(f"GGUF quant {quant!r} is made by llama.cpp's quantizer, which is not installed: "
                       f"{LLAMACPP_INSTALL} (or choose q8_0, q4_0 or q4_1)") from exc
    return int(getattr(llama_cpp, LLAMACPP_QUANTS[quant]))


def _llamacpp_quantize(source: Path, target: Path, ftype: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with contextlib.suppress(AttributeError):
        params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.exists():
        raise BadInput(f"llama.cpp's quantizer failed on {source.name} (status {status}); see its log above")
