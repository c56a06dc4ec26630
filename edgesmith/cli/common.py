"""Options and printing shared by the CLI verbs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

# piped or logged output (CI, `make demo | tee`) gets room for the comparison table instead of 80 columns
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)

RUNS_DIR = typer.Option(Path("runs"), "--runs-dir", help="Where run folders are written.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Step cache (default: $EDGESMITH_CACHE or ~/.cache/edgesmith).")
JSON_OUT = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))
