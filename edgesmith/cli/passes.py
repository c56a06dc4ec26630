"""``edgesmith prune`` and ``edgesmith quantize``: one-pass shortcuts."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.app import app
from edgesmith.cli.common import CACHE_DIR, JSON_OUT, RUNS_DIR
from edgesmith.cli.shortcut import run_one_pass

OUTPUT = typer.Option(None, "--output", "-o", help="Copy the result to this folder.")


@app.command("prune")
def prune_command(
    model: str = typer.Argument("minilm", help="Model folder, or 'minilm' for the packaged default."),
    heads: float = typer.Option(0.0, "--heads", help="Fraction of attention heads removed in each layer."),
    ffn: float = typer.Option(0.0, "--ffn", help="Fraction of FFN channels removed in each layer."),
    importance: str = typer.Option("l2", "--importance", help="Importance criterion: l1, l2, random."),
    round_to: int = typer.Option(8, "--round-to", help="Round pruned FFN sizes to a multiple of this."),
    output: Path | None = OUTPUT,
    runs_dir: Path = RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Structured pruning of attention heads and FFN channels (torch-pruning DepGraph)."""
    run_one_pass(model, "prune", {"heads": heads, "ffn": ffn, "importance": importance, "round_to": round_to},
                 output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json)


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(..., help="ONNX model: an .onnx file or an edgesmith ONNX folder."),
    mode: str = typer.Option("dynamic", "--mode", help="Quantization mode: dynamic."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Per-channel weight scales (default)."),
    output: Path | None = OUTPUT,
    runs_dir: Path = RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """INT8 quantization of an ONNX model with ONNX Runtime's quantizer."""
    run_one_pass(model, "quantize", {"mode": mode, "per_channel": per_channel}, output=output, runs_dir=runs_dir,
                 cache_dir=cache_dir, as_json=as_json)
