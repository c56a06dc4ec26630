"""The one results writer: ``bench/results/STEM.json`` (the raw document) and ``STEM.md`` (its table),
both written atomically, and the ``--render-only`` path that rebuilds the Markdown from the JSON.

A benchmark gives a document (a dict that JSON can hold, with ``command`` and ``machine`` keys) and a
``render(doc) -> str``; BENCHMARKS.md then picks up ``STEM.md`` (``benchmarks_md.RESULT_ORDER``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"

Render = Callable[[Any], str]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a result, as a reader reruns it from the repository root."""
    words = sys.argv[1:] if argv is None else argv
    return " ".join([f".venv/bin/python bench/{script}", *map(shlex.quote, words)]).strip()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_text(path: Path, text: str) -> Path:
    """``text`` into ``path`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def paths(stem: str | Path, results_dir: Path = RESULTS) -> tuple[Path, Path]:
    """(json, md) for a stem (``"quantize"``) or for a path given on the command line (its suffix dropped)."""
    base = Path(stem)
    base = base if base.parent != Path(".") else results_dir / base
    base = base.with_suffix("") if base.suffix in (".json", ".md") else base
    return base.with_suffix(".json"), base.with_suffix(".md")


def write(stem: str | Path, doc: Any, render: Render | None, *, results_dir: Path = RESULTS,
          indent: int = 1) -> tuple[Path, Path | None]:
    """Write ``doc`` as JSON and ``render(doc)`` as Markdown; returns the two paths (md None without render)."""
    json_path, md_path = paths(stem, results_dir)
    text = None if render is None else render(doc).rstrip("\n") + "\n"  # a render that fails writes nothing
    write_text(json_path, json.dumps(doc, indent=indent, default=str) + "\n")
    if text is None:
        return json_path, None
    write_text(md_path, text)
    return json_path, md_path


def read(stem: str | Path, results_dir: Path = RESULTS) -> dict[str, Any]:
    json_path, _ = paths(stem, results_dir)
    if not json_path.exists():
        raise SystemExit(f"{json_path} does not exist: run the benchmark first (without --render-only)")
    return json.loads(json_path.read_text(encoding="utf-8"))


def render_only(stem: str | Path, render: Render, results_dir: Path = RESULTS) -> Path:
    """Rebuild ``STEM.md`` from ``STEM.json``; measures nothing."""
    _, md_path = paths(stem, results_dir)
    return write_text(md_path, render(read(stem, results_dir)).rstrip("\n") + "\n")
