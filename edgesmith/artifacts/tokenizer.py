"""The tokenizer saved beside a model: which files make one, loading it, and naming the damaged file."""

from __future__ import annotations

import json
from pathlib import Path

from edgesmith.errors import BadInput, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files (read from the names only)."""
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    folders = [path / f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if (path / f).is_dir()]
    if folders:
        raise BadInput(f"{folders[0]}: is a folder, not a tokenizer file; save the tokenizer again "
                       "(tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # tokenizers and transformers raise many types for a damaged file
        raise BadInput(f"{damaged_tokenizer_file(path)}: cannot load the tokenizer ({first_line(exc, 160)}); "
                       "save it again (tokenizer.save_pretrained)") from exc


def damaged_tokenizer_file(folder: Path) -> Path | str:
    """The tokenizer file of ``folder`` that does not read as JSON (or is not a file), else all of them."""
    present = [folder / f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if (folder / f).exists()]
    for f in present:
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            else:
                f.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return f
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:  # the Rust library's own exception type
            return folder / "tokenizer.json"
    return ", ".join(str(f) for f in present)
