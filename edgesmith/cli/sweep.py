"""``edgesmith sweep``: search recipe variants for the Pareto front, locally or on a Ray cluster."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.common import CACHE_DIR, JSON_OUT, console, err_console, print_json
from edgesmith.cli.root import app


@app.command("sweep")
def sweep_command(
    recipe: Path | None = typer.Argument(None, help="Recipe YAML with a search: block (see docs/sweep.md)."),
    trials: int | None = typer.Option(None, "--trials", "-n", min=1, help="Trials to finish (default: search.budget)."),
    parallel: int | None = typer.Option(None, "--parallel", "-j", min=1, help="Builds at a time: local worker "
                                        "processes (default 1), or Ray tasks (default: cluster CPUs / --build-cpus)."),
    ray: str | None = typer.Option(None, "--ray", help="Run trials as Ray tasks on a running cluster: 'auto' "
                                   "(RAY_ADDRESS or the local head) or its address host:port."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the sweep in this folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Sweep folder (default: sweeps/<name>-<time>)."),
    sweeps_dir: Path = typer.Option(Path("sweeps"), "--sweeps-dir", help="Where new sweep folders go."),
    cache_dir: Path | None = CACHE_DIR,
    wall_time: str | None = typer.Option(None, "--wall-time", help="Start no trial after this long ('30m', '2h', "
                                         "seconds); default: search.budget.wall_time."),
    seed: int | None = typer.Option(None, "--seed", help="Sampler seed (default: search.sampler.seed)."),
    build_cpus: float = typer.Option(1.0, "--build-cpus", help="Ray: CPUs each build task asks for."),
    build_gpus: float = typer.Option(0.0, "--build-gpus", help="Ray: GPUs each build task asks for."),
    as_json: bool = JSON_OUT,
) -> None:
    """Sample recipe variants (Optuna), run each as a cached pipeline run, profile it alone, report the Pareto front."""
    from edgesmith.errors import BadInput
    from edgesmith.sweep import (
        describe_params,
        format_metric,
        parse_duration,
        resume_sweep,
        run_sweep,
    )

    if (recipe is None) == (resume is None):
        raise BadInput("give a sweep recipe (edgesmith sweep RECIPE) or --resume FOLDER, not both and not neither")
    try:
        wall_s = parse_duration(wall_time) if wall_time is not None else None
    except ValueError as exc:
        raise BadInput(f"--wall-time: {exc}") from exc
    shown = None if as_json else err_console
    common = {"trials": trials, "parallel": parallel, "ray": ray, "cache_dir": cache_dir, "wall_time_s": wall_s,
              "build_cpus": build_cpus, "build_gpus": build_gpus, "console": shown}
    if resume is not None:
        result = resume_sweep(resume, **common)
    else:
        result = run_sweep(recipe, folder=out, sweeps_dir=sweeps_dir, seed=seed, **common)
    summary = result.summary
    if as_json:
        print_json({"folder": str(result.folder), "backend": result.backend, "seconds": result.seconds,
                    "counts": summary["counts"], "front": summary["front"], "report": str(result.report)})
        return
    from rich.table import Table

    metrics = [o["metric"] for o in summary["objectives"]]
    table = Table(title=f"Pareto front of {summary['sweep']} ({summary['counts']['complete']} trials completed, "
                  f"{summary['counts']['failed']} failed)")
    for column in ["trial", "variant", *metrics]:
        table.add_column(column)
    for r in summary["front"]:
        variant = describe_params(r["params"])
        table.add_row(f"t{r['trial']}", variant, *[format_metric(m, r["measured"][m]) for m in metrics])
    console.print(table)
    console.print(f"sweep folder: {result.folder}  (pareto.json, report.md; {result.seconds:.0f} s, {result.backend})")
