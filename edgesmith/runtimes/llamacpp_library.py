"""llama.cpp's library as edgesmith uses it: importing llama-cpp-python (one line when it is
missing or does not load), its build, model handles, and :class:`GgufTokenizer`, llama.cpp's own
tokenizer of a GGUF file (a vocab-only load, no weights), called like a Hugging Face tokenizer.

Nothing here imports llama-cpp-python until a handle or tokenizer is made.
"""

from __future__ import annotations

import ctypes
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput

NAME = "llamacpp"
INSTALL = "pip install edgesmith[llamacpp]"
_LLAMA_LOGGER = "llama-cpp-python"
_backend_ready = False


def import_llama_cpp():
    """The ``llama_cpp`` module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise BadInput(f"runtime '{NAME}' needs llama-cpp-python, which is not installed here: {INSTALL}") from None
    except OSError as exc:  # the package is there but its compiled library does not load
        raise BadInput(f"runtime '{NAME}': llama-cpp-python is installed but its library does not load "
                       f"({str(exc).splitlines()[0][:200]}); reinstall it: {INSTALL}") from None
    global _backend_ready
    if not _backend_ready:
        # llama.cpp logs every tensor it loads to stderr; keep errors only (its logger's level)
        logging.getLogger(_LLAMA_LOGGER).setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def build_info() -> dict[str, Any]:
    """llama-cpp-python's version and llama.cpp's compiled features (``llama_print_system_info``)."""
    llama_cpp = import_llama_cpp()
    return {"llama_cpp_python": metadata.version("llama-cpp-python"),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


# ---------------------------------------------------------------------------------------------


def _load_model(llama_cpp, path: Path, *, vocab_only: bool = False):
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BadInput(f"{path}: llama.cpp cannot load this GGUF (an architecture or tensor type this llama.cpp "
                       "does not know, or a damaged file); upgrade llama-cpp-python or re-export the model")
    return model


def _usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says), llama.cpp's default here."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _meta_str(llama_cpp, model, key: str) -> str | None:
    """A GGUF metadata value as text (None when the key is absent)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


def _model_desc(llama_cpp, model) -> str:
    """llama.cpp's one-line description of a loaded model: architecture, size, file type."""
    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, buf, len(buf))
    return buf.value.decode(errors="replace")


def training_context(path: Path) -> int | None:
    """The context the model was trained for (``{arch}.context_length``), from a vocab-only load;
    None when the file does not say."""
    llama_cpp = import_llama_cpp()
    model = _load_model(llama_cpp, path, vocab_only=True)  # a vocab-only load has no hparams, only the keys
    try:
        arch = _meta_str(llama_cpp, model, "general.architecture")
        value = _meta_str(llama_cpp, model, f"{arch}.context_length") if arch else None
    finally:
        llama_cpp.llama_model_free(model)
    try:
        n = int(value) if value is not None else 0
    except ValueError:
        n = 0
    return n if n > 0 else None


class GgufTokenizer:
    """llama.cpp's tokenizer of a GGUF file (a vocab-only load), called like a Hugging Face
    tokenizer: ``tok(text)["input_ids"]`` adds BOS where the file says to; ``decode(ids)``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._model = None
        self._vocab = None

    def _ensure(self):
        if self._vocab is None:
            llama_cpp = import_llama_cpp()
            self._llama = llama_cpp
            self._model = _load_model(llama_cpp, self.path, vocab_only=True)
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        return self._llama, self._vocab

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = False) -> list[int]:
        llama_cpp, vocab = self._ensure()
        data = text.encode("utf-8")
        room = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), out, room, add_special_tokens, parse_special)
            if n >= 0:
                return [int(t) for t in out[:n]]
            room = -n

    @property
    def chat_template(self) -> str | None:
        """The file's ``tokenizer.chat_template``, or None."""
        llama_cpp, _ = self._ensure()
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def _special_text(self, token: int) -> str:
        return "" if token == self._llama.LLAMA_TOKEN_NULL else self.decode([token])

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            **_: Any) -> list[int] | str:
        """The file's chat template rendered as transformers renders it (a sandboxed Jinja
        environment, trim_blocks/lstrip_blocks), tokenized with its special tokens parsed."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.chat_template
        if not template:
            raise BadInput(f"{self.path}: the GGUF has no chat template; give the prompt as plain text (--no-chat)")
        llama_cpp, vocab = self._ensure()

        def raise_exception(message: str) -> None:
            raise BadInput(f"{self.path}: the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(int(llama_cpp.llama_vocab_bos(vocab))),
            eos_token=self._special_text(int(llama_cpp.llama_vocab_eos(vocab))))
        return self.encode(text, add_special_tokens=False, parse_special=True) if tokenize else text

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False, **_: Any) -> str:
        llama_cpp, vocab = self._ensure()
        pieces = b""
        buf = ctypes.create_string_buffer(256)
        for token in ids:
            n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            if n < 0:  # a longer piece: -n bytes are needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            pieces += buf.raw[:max(n, 0)]
        return pieces.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._model is not None:
            self._llama.llama_model_free(self._model)
        self._model = self._vocab = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# ---------------------------------------------------------------------------------------------
