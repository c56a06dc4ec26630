"""The one checked GGUF reader (edgesmith.gguf.file): a good file opens; a missing, empty, foreign,
too new, truncated or misaligned one is one line of BadInput naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith.errors import BadInput
from edgesmith.gguf.file import GGUF_MAGIC, check_gguf_header, open_gguf

ALIGNMENT = 64


def _write(path, *, alignment: int = ALIGNMENT):
    """Three 16-float tensors (64 bytes each, so each starts on a 64-byte boundary)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(alignment)
    writer.add_name("tiny")
    for i in range(3):
        writer.add_tensor(f"t{i}", np.full(16, i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bad(path, match: str):
    with pytest.raises(BadInput, match=match) as err:
        open_gguf(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_good_file_opens(tmp_path):
    opened = open_gguf(_write(tmp_path / "good.gguf"))
    assert opened.size == (tmp_path / "good.gguf").stat().st_size
    assert opened.tensor_types() == {"t0": "F32", "t1": "F32", "t2": "F32"}
    assert opened.field("general.name") == "tiny" and opened.field("missing.key", 7) == 7
    assert opened.array_length("missing.key") is None
    assert np.array_equal(np.asarray(opened.tensors[2].data), np.full(16, 2, dtype=np.float32))


def test_header_checks(tmp_path):
    _bad(tmp_path / "missing.gguf", "not found")
    (tmp_path / "folder.gguf").mkdir()
    _bad(tmp_path / "folder.gguf", "not a file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _bad(tmp_path / "empty.gguf", "empty file")
    (tmp_path / "text.gguf").write_bytes(b"hello, world")
    _bad(tmp_path / "text.gguf", "not a GGUF file")
    (tmp_path / "new.gguf").write_bytes(GGUF_MAGIC + (99).to_bytes(4, "little") + bytes(64))
    _bad(tmp_path / "new.gguf", "GGUF version 99")
    assert check_gguf_header(_write(tmp_path / "good.gguf")) > 0


def test_truncated_and_misaligned_files(tmp_path):
    data = _write(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-32])
    _bad(tmp_path / "cut.gguf", "truncated")
    (tmp_path / "header.gguf").write_bytes(data[:40])
    _bad(tmp_path / "header.gguf", "corrupt or truncated")
    # the same bytes claiming a 128-byte alignment: the second tensor's data (64 bytes in) is off it
    key = b"general.alignment"
    at = data.index(key) + len(key) + 4  # past the key and its value type (uint32)
    assert int.from_bytes(data[at:at + 4], "little") == ALIGNMENT
    (tmp_path / "misaligned.gguf").write_bytes(data[:at] + (128).to_bytes(4, "little") + data[at + 4:] + bytes(128))
    _bad(tmp_path / "misaligned.gguf", "not on the file's 128-byte alignment")
