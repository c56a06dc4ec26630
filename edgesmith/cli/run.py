"""``edgesmith run RECIPE``: run a recipe end to end."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgesmith.cli.common import CACHE_DIR, JSON_OUT, RUNS_DIR, console, err_console, print_json
from edgesmith.cli.root import app


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML or JSON), e.g. recipes/minilm-cpu.yaml."),
    runs_dir: Path = RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Run a recipe: passes, evaluation, gates, profiles and a comparison table."""
    from edgesmith.pipeline import run

    result = run(recipe, runs_dir=runs_dir, cache_dir=cache_dir, console=err_console if not as_json else None,
                 progress=not as_json)
    if as_json:
        print_json({"run_dir": str(result.run_dir), "deployable": result.deployable, "metrics": result.metrics,
                    "comparison": result.manifest.get("comparison")})
        return
    if result.comparison is not None:
        console.print(result.comparison.table(width=console.width))
        for line in result.comparison.early_exit_lines():
            console.print(f"early exit, {escape(line)}")
    console.print(f"run folder: {result.run_dir}  (manifest.json, report.md)")
