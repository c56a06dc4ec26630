"""Calibration for static INT8: activation ranges from the user's texts, in bounded memory.

ONNX Runtime's calibrators run an augmented graph (every tensor to calibrate made a graph output)
over a :class:`CalibrationDataReader`. Given the whole data set at once, their histogram methods
keep every batch's intermediate outputs until the end (onnxruntime #10503: > 256 GB for BERT
percentile calibration). Here the texts are read lazily from the file, tokenized one batch at a
time, and handed to the calibrator in chunks of ``chunk_batches`` batches: after each chunk the
calibrator folds what it saw into its running ranges (MinMax) or histograms (entropy,
percentile) and drops the outputs. So at most one chunk of activations and one batch of text rows
is held at once, however large the file.

The ranges are written to ORT's calibration cache (JSON), from which ``quantize_static`` can
quantize any subset of nodes again without running calibration twice (the accuracy-aware search
does exactly that).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BadInput
from edgesmith.inputs import tokenize

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")


def iter_calibration_texts(path: str | Path, *, text_field: str = "text", limit: int | None = None,
                           offset: int = 0) -> Iterator[str]:
    """Texts of a local data file (jsonl, csv, tsv, parquet, txt) or ``builtin:wordnet``, one at a
    time: the file is streamed, never read whole."""
    from edgesmith.data import BUILTIN, _iter_rows, builtin_path

    name = str(path)
    file = builtin_path(name) if name.startswith("builtin:") or name in BUILTIN else Path(path).expanduser()
    if not file.exists():
        raise BadInput(f"calibration file {file} not found; give a local .jsonl, .csv, .parquet or .txt file, "
                       "or builtin:wordnet")
    want = None if limit is None else offset + limit
    for i, (text, _) in enumerate(_iter_rows(file, text_field, None, want)):
        if i >= offset and text.strip():
            yield text


class TextCalibrationReader:
    """A CalibrationDataReader over an iterable of texts: one tokenized batch per ``get_next``.

    ``held`` counts the text rows this reader holds right now (the batch being tokenized) and
    ``peak_held`` the most it ever held at once; ``rows`` and ``batches`` what it has handed out.
    With ``chunk_batches``, ``get_next`` returns None after that many batches and resumes where it
    stopped on the call after that (see :meth:`chunks`), which is how the calibrator is kept from
    accumulating the whole data set.
    """

    def __init__(self, texts: Iterable[str], tokenizer, input_names: list[str], *, batch_size: int = 8,
                 seq: int = 128, chunk_batches: int | None = None):
        if batch_size < 1 or seq < 1:
            raise BadInput(f"calibration batch size and sequence length must be at least 1 (got {batch_size}, {seq})")
        self._texts = iter(texts)
        self.tokenizer = tokenizer
        self.input_names = list(input_names)
        self.batch_size = batch_size
        self.seq = seq
        self.chunk_batches = chunk_batches
        self.held = 0
        self.peak_held = 0
        self.rows = 0
        self.batches = 0
        self._in_chunk = 0
        self._exhausted = False

    # ORT's CalibrationDataReader protocol ----------------------------------------------------
    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._exhausted:
            return None
        if self.chunk_batches is not None and self._in_chunk >= self.chunk_batches:
            self._in_chunk = 0
            return None
        rows: list[str] = []
        for text in self._texts:
            rows.append(text)
            self.held = len(rows)
            self.peak_held = max(self.peak_held, self.held)
            if len(rows) == self.batch_size:
                break
        if not rows:
            self._exhausted = True
            self.held = 0
            return None
        feeds = tokenize(self.tokenizer, rows, input_names=self.input_names, seq=self.seq)
        self.rows += len(rows)
        self.batches += 1
        self._in_chunk += 1
        self.held = 0
        return feeds

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds

    def rewind(self) -> None:  # part of ORT's reader protocol; a stream is read once
        raise BadInput("a calibration stream is read once; make a new reader to calibrate again")

    # chunking ---------------------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        return self._exhausted


def ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in METHODS:
        raise BadInput(f"unknown calibration method '{method}'; use one of: {', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibrate(model_path: Path, reader: TextCalibrationReader, cache_path: Path, *, method: str = "minmax",
              op_types: list[str] | None = None, symmetric: bool = False, percentile: float = 99.999,
              workdir: Path) -> dict[str, Any]:
    """Run ORT's calibrator for ``method`` over ``reader`` chunk by chunk and save the activation
    ranges to ``cache_path`` (ORT's calibration cache). Returns what was done (batches, rows,
    the most rows and batches held at once, tensors calibrated, seconds)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    started = time.perf_counter()
    options: dict[str, Any] = {"symmetric": symmetric}
    if method == "percentile":
        options["percentile"] = percentile
    calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=ort_method(method), providers=["CPUExecutionProvider"],
                                   extra_options=options)
    printed = io.StringIO()  # ORT's calibrators print their progress to stdout
    try:
        with contextlib.redirect_stdout(printed):
            chunks = collect_in_chunks(calibrator, reader)
            ranges = calibrator.compute_data()
    except BadInput:
        raise
    except Exception as exc:  # ORT's calibrators raise bare exceptions
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"ONNX Runtime's {method} calibration failed on this graph ({reason})") from exc
    finally:
        del calibrator
        if printed.getvalue().strip():
            log.debug("calibrator output:\n%s", printed.getvalue())
    save_tensors_data(ranges, cache_path)
    seconds = time.perf_counter() - started
    log.info("calibrated %d tensors (%s) on %d texts in %d batches, %.1f s", len(ranges.data), method, reader.rows,
             reader.batches, seconds)
    return {"method": method, "texts": reader.rows, "batches": reader.batches, "chunks": chunks,
            "chunk_batches": reader.chunk_batches, "batch_size": reader.batch_size, "seq": reader.seq,
            "peak_rows_held": reader.peak_held, "tensors": len(ranges.data), "seconds": round(seconds, 3)}


def collect_in_chunks(calibrator, reader: TextCalibrationReader) -> int:
    """Feed the calibrator one chunk at a time: ``collect_data`` reads until the reader says None
    (the end of a chunk), folds the chunk's outputs into its running ranges or histograms and
    drops them. Returns the number of chunks."""
    chunks = 0
    while True:
        before = reader.batches
        try:
            calibrator.collect_data(reader)
        except ValueError as exc:
            if "No data is collected" not in str(exc):
                raise
            if before == 0:
                raise BadInput("no calibration texts: give a calibration file with at least one text") from exc
            break  # the stream ended exactly at a chunk boundary
        if reader.batches > before:
            chunks += 1
        if reader.exhausted:
            return chunks
    return chunks
