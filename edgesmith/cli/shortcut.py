"""One-pass verbs (``prune``, ``quantize``, ``export``) build a one-step recipe and run it.

So a shortcut gets what a recipe gets: the type check, the cache, the fidelity against its input
and a run folder. ``--output`` copies the result to a folder of the user's choosing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.table import Table

from edgesmith.cli.common import console, err_console, print_json
from edgesmith.errors import BadInput
from edgesmith.storage import atomic_dir


def run_one_pass(model: str, pass_name: str, options: dict[str, Any], *, output: Path | None, runs_dir: Path,
                 cache_dir: Path | None, as_json: bool, evaluate: bool = True, texts: int = 256,
                 data: str | None = None, data_options: dict[str, Any] | None = None) -> None:
    from edgesmith.pipeline import run

    if output is not None and output.exists() and any(output.iterdir()) and not (output / "edgesmith.json").exists():
        raise BadInput(f"--output {output} exists and is not an edgesmith artifact folder; choose a new or empty folder")
    recipe = {
        "name": f"{pass_name}-{Path(model).name if model else 'minilm'}",
        "model": model,
        "steps": [{pass_name: options}],
        "evaluate": {"enabled": evaluate},
        "profile": None,
        "data": {"limit": texts, **({"path": data} if data else {}), **(data_options or {})},
    }
    result = run(recipe, runs_dir=runs_dir, cache_dir=cache_dir, console=err_console, progress=not as_json)
    final = result.manifest["final_artifact"]
    folder = Path(result.manifest["steps"][-1]["folder"])
    if output is not None:
        with atomic_dir(output) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        folder = output
    step = result.manifest["steps"][-1]
    metrics = result.metrics.get(final, {})
    if as_json:
        print_json({"artifact": str(folder), "run_dir": str(result.run_dir), "report": step["report"],
                    "metrics": metrics, "cached": step["cached"]})
        return
    table = Table(title=f"{pass_name}: {model or 'minilm'} → {folder}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(f"{key} vs source", f"{value:.4f}")
    for key, value in step["report"].items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            table.add_row(key, _cell(value))
        elif (isinstance(value, list) and 0 < len(value) <= 12
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            table.add_row(key, ", ".join(_cell(v) for v in value))  # e.g. exit layers, per-exit thresholds
    console.print(table)
    console.print(f"artifact: {folder}")


def _cell(value: int | float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
