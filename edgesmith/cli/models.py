"""``edgesmith inspect`` and ``edgesmith export``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgesmith.cli.app import app
from edgesmith.cli.common import CACHE_DIR, JSON_OUT, RUNS_DIR, console, print_json
from edgesmith.cli.shortcut import run_one_pass
from edgesmith.errors import BadInput


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument("minilm", help="Model folder, .onnx file, or 'minilm'."),
    as_json: bool = JSON_OUT,
) -> None:
    """Parameters, size, layers, heads, FFN sizes and lineage of a model."""
    from edgesmith.artifacts import load
    from edgesmith.inspection import describe

    info = describe(load(model))
    if as_json:
        print_json(info)
        return
    table = Table(title=f"{info['name']} ({info['kind']}, {info['task']})", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in ("architecture", "format", "parameters", "size_bytes", "hidden_size", "layers", "weight_sparsity",
                "opset", "precision", "nodes", "num_attention_heads", "content_hash"):
        if info.get(key) is not None:
            value = info[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("inputs", ", ".join(info["inputs"]))
    table.add_row("outputs", ", ".join(info["outputs"]))
    if info.get("attention"):
        table.add_row("heads per layer", " ".join(str(a["heads"]) for a in info["attention"]))
    if info.get("ffn"):
        table.add_row("FFN per layer", " ".join(str(f["ffn"]) for f in info["ffn"]))
    if info.get("op_types"):
        table.add_row("top ops", ", ".join(f"{k}×{v}" for k, v in list(info["op_types"].items())[:8]))
    table.add_row("lineage", " → ".join(s["pass"] for s in info["lineage"]) or "(source)")
    console.print(table)


@app.command("export")
def export_command(
    model: str = typer.Argument("minilm", help="Model folder or 'minilm'."),
    to: str = typer.Option("onnx", "--to", help="Target format: onnx."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    atol: float = typer.Option(1e-3, "--atol", help="Largest allowed max abs difference in validation."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Copy the exported folder here."),
    runs_dir: Path = RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Export to ONNX (dynamic batch and sequence), validated against the source on probe inputs."""
    if to != "onnx":
        raise BadInput(f"--to {to}: only 'onnx' is supported by this version")
    options = {"atol": atol, **({"opset": opset} if opset else {})}
    run_one_pass(model, "export", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json)
