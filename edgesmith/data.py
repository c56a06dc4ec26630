"""Text and label data from local files: jsonl, csv, parquet, plain text, or a saved ``datasets`` folder.

Nothing is downloaded. ``builtin:wordnet`` (or ``wordnet``) names the corpus that ships with
edgesmith: 31,002 example sentences of general English from WordNet 3.0, each with its synset's
lexicographer category as a label (licence in ``edgesmith/corpus/WORDNET-LICENSE.txt``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput, dangling_link, first_line

BUILTIN = {"wordnet": "wordnet-examples.jsonl"}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class TextData:
    texts: list[str]
    labels: list[Any] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, holdout: float = 0.2) -> tuple[TextData, TextData]:
        """Deterministic split: the last ``holdout`` fraction is held out."""
        cut = max(1, int(len(self.texts) * (1 - holdout)))
        labels = self.labels
        return (TextData(self.texts[:cut], labels[:cut] if labels else None, self.source),
                TextData(self.texts[cut:], labels[cut:] if labels else None, self.source))


def builtin_path(name: str) -> Path:
    key = name.removeprefix("builtin:")
    if key not in BUILTIN:
        raise BadInput(f"unknown built-in data set '{name}'; built-in: {', '.join('builtin:' + k for k in BUILTIN)}")
    return Path(str(resources.files("edgesmith.corpus").joinpath(BUILTIN[key])))


def builtin_corpus(limit: int | None = None, offset: int = 0) -> list[str]:
    return load_texts("builtin:wordnet", limit=limit, offset=offset).texts


def load_texts(path: str | Path, *, text_field: str = "text", label_field: str | None = None,
               limit: int | None = None, offset: int = 0) -> TextData:
    """Read texts (and labels when ``label_field`` is given) from a local file.

    Reads only as many rows as needed (``offset`` + ``limit``); a missing field or an empty file
    is a :class:`BadInput` naming the file and the field.
    """
    name = str(path)
    if name.startswith("builtin:") or name in BUILTIN:
        path = builtin_path(name)
    path = Path(path).expanduser()
    if not path.exists():
        if dangling_link(path):
            raise dangling_link(path)
        raise BadInput(f"data file {path} not found; give a local .jsonl, .csv, .parquet or .txt file, or builtin:wordnet")
    want = None if limit is None else offset + limit
    rows = list(_iter_rows(path, text_field, label_field, want))
    if not rows:
        raise BadInput(f"{path}: no rows; give a file with at least one '{text_field}'")
    rows = rows[offset:want]
    if not rows:
        raise BadInput(f"{path}: no rows after skipping the first {offset}")
    texts = [r[0] for r in rows]
    labels = [r[1] for r in rows] if label_field else None
    return TextData(texts, labels, str(path))


def _iter_rows(path: Path, text_field: str, label_field: str | None, want: int | None):
    """(text, label) rows of a data file; a file that is not UTF-8 text or cannot be read is a BadInput."""
    try:
        yield from _read_rows(path, text_field, label_field, want)
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    except (OSError, csv.Error) as exc:
        raise BadInput(f"{path}: cannot read it ({exc}); give a local .jsonl, .csv, .parquet or .txt file") from exc


def _read_rows(path: Path, text_field: str, label_field: str | None, want: int | None):
    if path.is_dir() and path.suffix.lower() in SUFFIXES:
        raise BadInput(f"{path}: is a folder, not a {path.suffix} file; give the data file (or a saved datasets "
                       "folder)")
    if path.is_dir():
        yield from _iter_records(_datasets_folder(path), path, text_field, label_field, want)
        return
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadInput(f"{path}: unknown data format '{suffix}'; use one of {', '.join(SUFFIXES)}")
    if suffix == ".txt":
        if label_field:
            raise BadInput(f"{path}: a .txt file has no fields, so no '{label_field}'; use jsonl or csv for labelled data")
        count = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line, None
                    count += 1
                    if want is not None and count >= want:
                        return
        return
    if suffix in (".jsonl", ".json"):
        records = _jsonl(path)
    elif suffix in (".csv", ".tsv"):
        records = _csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        records = _parquet(path, [f for f in (text_field, label_field) if f])
    yield from _iter_records(records, path, text_field, label_field, want)


def _iter_records(records, path: Path, text_field: str, label_field: str | None, want: int | None):
    count = 0
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise BadInput(f"{path}:{lineno}: a row is not an object with fields")
        if text_field not in rec:
            fields = ", ".join(sorted(map(str, rec))) or "none"
            raise BadInput(f"{path}:{lineno}: no field '{text_field}' (fields there: {fields}); set text_field")
        if label_field and label_field not in rec:
            fields = ", ".join(sorted(map(str, rec))) or "none"
            raise BadInput(f"{path}:{lineno}: no field '{label_field}' (fields there: {fields}); set label_field")
        text = rec[text_field]
        if not isinstance(text, str):
            raise BadInput(f"{path}:{lineno}: field '{text_field}' is not text")
        yield text, (rec[label_field] if label_field else None)
        count += 1
        if want is not None and count >= want:
            return


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg}); one JSON object per line") from exc


def _csv(path: Path, delimiter: str):
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.DictReader(fh, delimiter=delimiter), 2):
            yield lineno, row


def _parquet(path: Path, columns: list[str]):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise BadInput(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from exc
    import pyarrow as pa

    try:
        table = pq.ParquetFile(path)
        names = set(table.schema_arrow.names)
    except pa.ArrowException as exc:  # empty, cut short or not parquet at all: pyarrow's own error types
        raise BadInput(f"{path}: not a readable parquet file ({first_line(exc, 160)}); write it again") from exc
    for col in columns:
        if col not in names:
            raise BadInput(f"{path}: no field '{col}' (fields there: {', '.join(sorted(names))})")
    row = 0
    batches = table.iter_batches(columns=columns, batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as exc:  # a damaged page further in
            raise BadInput(f"{path}: not a readable parquet file after row {row} ({first_line(exc, 160)}); "
                           "write it again") from exc
        if batch is None:
            return
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _datasets_folder(path: Path):
    try:
        import datasets
    except ImportError as exc:
        raise BadInput(f"{path}: a saved datasets folder needs the datasets package: pip install datasets") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise BadInput(f"{path}: not a saved datasets folder ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    for i, rec in enumerate(ds, 1):
        yield i, rec


def pass_texts(ctx_texts: list[str] | None, ctx_labels: list[Any] | None, *, data: str | None, text_field: str,
               label_field: str | None, limit: int | None, offset: int, needed_by: str) -> tuple[list[str], list[Any] | None]:
    """The texts (and labels) a training pass uses: its own ``data`` file when given, else the run's data."""
    if data is not None:
        loaded = load_texts(data, text_field=text_field, label_field=label_field, limit=limit, offset=offset)
        return loaded.texts, loaded.labels
    if not ctx_texts:
        raise BadInput(f"{needed_by} needs texts: give data=<file or builtin:wordnet> "
                       f"(edgesmith {needed_by} MODEL --data FILE), or a recipe with data")
    texts = list(ctx_texts[:limit] if limit else ctx_texts)
    labels = list(ctx_labels[: len(texts)]) if ctx_labels else None
    return texts, labels
