"""A Hugging Face tokenizer as GGUF tokenizer metadata (what llama.cpp reads to tokenize).

llama.cpp's byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) is the token strings in
id order, a type per token (normal, control for special added tokens, user-defined for the other
added tokens, unused for ids the tokenizer does not fill), the merges as ``"left right"`` strings,
the special token ids, whether a BOS token is prepended, and the chat template.

``tokenizer.ggml.pre`` names the pre-tokenizer (the regex that splits text before BPE): llama.cpp
knows it by name only. A model that came from a GGUF keeps its file's name (read from the origin
file); otherwise the caller names it, or it is ``default`` (GPT-2's split; digits are grouped,
which differs from, e.g., SmolLM's one-digit split), and the report says so.

Only byte-level BPE tokenizers are written (Llama 3, Qwen, SmolLM, GPT-2, Mistral's newer models);
SentencePiece vocabularies need scores from the ``.model`` file and are refused with one line.

Layer L1: imports edgesmith.errors and edgesmith.gguf.file, plus gguf.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput
from edgesmith.gguf.file import open_gguf

log = logging.getLogger(__name__)

DEFAULT_PRE = "default"


@dataclass
class Vocab:
    """What :func:`add_vocab` writes; ``notes`` say what was guessed."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]
    add_bos: bool
    chat_template: str | None
    pre: str
    notes: list[str] = field(default_factory=list)


def _backend_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInput(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one: "
                       "save the model's tokenizer.json beside it")
    return json.loads(backend.to_str())


def origin_pre(path: str | Path | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF a model was converted from, if the file is still there."""
    if not path or not Path(path).is_file():
        return None
    try:
        pre = open_gguf(path).field("tokenizer.ggml.pre")
    except BadInput as exc:
        log.warning("could not read tokenizer.ggml.pre (%s)", exc)
        return None
    return None if pre is None else str(pre)


def build_vocab(tokenizer, vocab_size: int, *, pre: str | None = None, origin: str | Path | None = None) -> Vocab:
    """The GGUF vocabulary of a fast byte-level BPE tokenizer, ``vocab_size`` rows (the model's)."""
    import gguf

    if tokenizer is None:
        raise BadInput("GGUF export needs the model's tokenizer (llama.cpp tokenizes from the file): save it beside "
                       "the model with tokenizer.save_pretrained")
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise BadInput(f"GGUF export writes byte-level BPE tokenizers only; this one is {model.get('type')!r}"
                       f"{'' if _byte_level(spec) else ' without byte-level pre-tokenization'} "
                       "(SentencePiece vocabularies: convert with llama.cpp's convert_hf_to_gguf.py)")
    by_id = {int(i): s for s, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise BadInput(f"the tokenizer has token id {max(by_id)} but the model's vocabulary has {vocab_size} rows; "
                       "they do not belong together")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            special[key] = value
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = bool(probe) and "bos" in special and probe[0] == special["bos"]
    notes = []
    chosen = pre or origin_pre(origin)
    if chosen is None:
        chosen = DEFAULT_PRE
        notes.append("tokenizer.ggml.pre is 'default' (GPT-2's split): name the pre-tokenizer with tokenizer_pre "
                     "if the model's differs (llama.cpp knows it by name)")
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(tokens=tokens, types=types, merges=merges, special=special, add_bos=add_bos,
                 chat_template=template if isinstance(template, str) else None, pre=chosen, notes=notes)


def _byte_level(spec: dict[str, Any]) -> bool:
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "ByteLevel" in text


def add_vocab(writer, vocab: Vocab) -> None:
    """Write the vocabulary's keys with a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, value in vocab.special.items():
        adders[key](value)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
