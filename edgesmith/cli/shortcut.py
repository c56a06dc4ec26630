"""One-pass verbs (``prune``, ``quantize``, ``export``, ``distill``, ``early-exit``) build a one-step
recipe and run it.

So a shortcut gets what a recipe gets: the type check, the cache, the fidelity against its input
and a run record. ``--output`` copies the result to a folder of the user's choosing; that folder is
the only thing a one-pass verb writes outside the cache. Its run record (manifest, report,
``state.json``, the artifact's hard links) goes to ``<cache>/one-pass/<verb>-<model>-<time>/``
unless ``--runs-dir`` says otherwise: run folders in the current folder are for ``edgesmith run``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgesmith.cli.common import console, err_console, print_json
from edgesmith.errors import BadInput
from edgesmith.storage import atomic_dir

#: where a one-pass verb keeps its run record: under the cache, never the current folder
ONE_PASS_DIR = "one-pass"
ONE_PASS_RUNS_DIR = typer.Option(
    None, "--runs-dir", help="Where this call's run record (manifest, report, state) goes; default "
    "<cache>/one-pass/ ($EDGESMITH_CACHE or ~/.cache/edgesmith), so nothing but --output is written in the "
    "current folder.")


def one_pass_runs_dir(cache_dir: Path | None) -> Path:
    """``<cache>/one-pass``: the run records of one-pass verbs."""
    from edgesmith.cache import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / ONE_PASS_DIR


def run_one_pass(model: str, pass_name: str, options: dict[str, Any], *, output: Path | None,
                 runs_dir: Path | None,
                 cache_dir: Path | None, as_json: bool, evaluate: bool = True, texts: int = 256,
                 data: str | None = None, data_options: dict[str, Any] | None = None) -> None:
    from edgesmith.artifacts import has_tokenizer
    from edgesmith.pipeline import run

    if output is not None and output.exists() and not output.is_dir():
        raise BadInput(f"--output {output} is a file; give a folder (new or empty) for the result")
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
    no_text_eval = evaluate and not has_tokenizer(model)
    if no_text_eval:  # fidelity on texts needs a tokenizer; the pass itself validated on token-id probes
        recipe["evaluate"] = {"enabled": False}
    runs_dir = runs_dir if runs_dir is not None else one_pass_runs_dir(cache_dir)
    result = run(recipe, runs_dir=runs_dir, cache_dir=cache_dir, console=None if as_json else err_console,
                 progress=not as_json)
    final = result.manifest["final_artifact"]
    folder = Path(result.manifest["steps"][-1]["folder"])
    if output is not None:
        with atomic_dir(output) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        folder = output
    step = result.manifest["steps"][-1]
    metrics = result.metrics.get(final, {})
    skipped = "skipped: the model has no tokenizer (validated on token ids from its config)" if no_text_eval else None
    if as_json:
        print_json({"artifact": str(folder), "run_dir": str(result.run_dir), "report": step["report"],
                    "metrics": metrics, "cached": step["cached"], **({"evaluation": skipped} if skipped else {})})
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
    if skipped:
        table.add_row("evaluation on texts", skipped)
    console.print(table)
    console.print(f"artifact: {folder}")
    console.print(f"run record: {result.run_dir}")


def _cell(value: int | float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
