"""One checked way to open a GGUF file: magic, version, truncation and alignment checked once.

:func:`check_gguf_header` reads the first eight bytes only (exists, is a file, not empty, the
GGUF magic, a format version the ``gguf`` package reads): what a caller needs before it hands the
file to llama.cpp or looks it up in a cache. :func:`open_gguf` adds gguf's own parser (which
refuses a bad alignment value and duplicate tensors) and checks that every tensor's data starts on
the file's alignment and ends inside the file. Either raises :class:`~edgesmith.errors.BadInput`:
one line that names the file and what to do. Every GGUF reader in edgesmith goes through here.

Layer L1: imports edgesmith.errors, plus gguf.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput, first_line

GGUF_MAGIC = b"GGUF"
#: the newest GGUF format version the gguf package's reader handles (gguf.GGUF_VERSION)
GGUF_MAX_VERSION = 3


@dataclass
class GgufFile:
    """A parsed, checked GGUF file: its ``path``, ``size`` in bytes and gguf's ``reader``."""

    path: Path
    size: int
    reader: Any

    @property
    def tensors(self) -> list[Any]:
        return self.reader.tensors

    def field(self, key: str, default: Any = None) -> Any:
        """A header field's value, or ``default`` when it is missing or unreadable."""
        found = self.reader.get_field(key)
        if found is None:
            return default
        try:
            return found.contents()
        except Exception:  # an unreadable value is as good as a missing one for a header summary
            return default

    def array_length(self, key: str) -> int | None:
        """How many entries an array field holds (without decoding them), or None when it is missing."""
        found = self.reader.get_field(key)
        return None if found is None else len(found.data)

    def tensor_types(self) -> dict[str, str]:
        """Each tensor's GGML type name (``Q4_1``, ``F32``...), by tensor name."""
        return {t.name: t.tensor_type.name for t in self.reader.tensors}


def check_gguf_header(path: str | Path) -> int:
    """The file's size, after the checks that need no parsing (exists, not empty, magic, version)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: GGUF file not found; check the path")
    if not path.is_file():
        raise BadInput(f"{path}: not a file; give a .gguf file")
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{path}: empty file, not a GGUF model; re-download or re-export it")
    with open(path, "rb") as fh:
        magic, version = fh.read(4), fh.read(4)
    if magic != GGUF_MAGIC:
        raise BadInput(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                       "give a llama.cpp .gguf model")
    if len(version) == 4 and int.from_bytes(version, "little") > GGUF_MAX_VERSION:
        raise BadInput(f"{path}: GGUF version {int.from_bytes(version, 'little')}, newer than the {GGUF_MAX_VERSION} "
                       "this edgesmith reads; update the gguf package (pip install -U gguf) or re-export the file")
    return size


def open_gguf(path: str | Path) -> GgufFile:
    """``path`` parsed by gguf's reader after every check; BadInput (one line, naming the file) otherwise."""
    import gguf

    path = Path(path)
    size = check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError... on damaged bytes
        raise BadInput(f"{path}: corrupt or truncated GGUF file ({size} bytes; gguf's reader failed: "
                       f"{first_line(exc, 160)}); re-download or re-export it") from exc
    alignment = int(reader.alignment)
    for tensor in reader.tensors:
        start = int(tensor.data_offset)
        end = start + int(tensor.n_bytes)
        if end > size:
            raise BadInput(f"{path}: truncated GGUF file (tensor {tensor.name} ends at byte {end}, "
                           f"the file has {size}); re-download or re-export it")
        if (start - int(reader.data_offset)) % alignment:
            raise BadInput(f"{path}: corrupt GGUF file (tensor {tensor.name}'s data at byte {start} is not on the "
                           f"file's {alignment}-byte alignment); re-download or re-export it")
    return GgufFile(path, size, reader)
