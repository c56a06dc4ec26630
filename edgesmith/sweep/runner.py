"""The entry points: start a sweep in a new folder (:func:`run_sweep`) or continue a stopped one
(:func:`resume_sweep`), on the local or the Ray backend, to its budget and its report."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from edgesmith.errors import BadInput
from edgesmith.storage import write_json_atomic, write_text_atomic
from edgesmith.sweep.folder import META_FILE, STUDY_FILE, SWEEP_FILE, _cache_for, _new_folder, claim_folder
from edgesmith.sweep.pareto import write_pareto, write_report
from edgesmith.sweep.ray_backend import RayBackend
from edgesmith.sweep.scheduler import _Driver
from edgesmith.sweep.space import Sweep, load_sweep
from edgesmith.sweep.study import open_study, requeue_interrupted
from edgesmith.sweep.workers import LocalBackend


@dataclass
class SweepResult:
    folder: Path
    summary: dict[str, Any]
    report: Path
    backend: str
    seconds: float
    front: list[dict[str, Any]] = field(default_factory=list)


def _backend(ray: str | None, parallel: int | None, build_cpus: float, build_gpus: float, provider: str):
    if ray is not None:
        return RayBackend(ray, parallel=parallel, build_cpus=build_cpus, build_gpus=build_gpus, provider=provider)
    return LocalBackend(parallel or 1)


def run_sweep(sweep: Sweep | str | Path, *, folder: str | Path | None = None, sweeps_dir: str | Path = "sweeps",
              trials: int | None = None, parallel: int | None = None, ray: str | None = None,
              cache_dir: str | Path | None = None, wall_time_s: float | None = None, seed: int | None = None,
              build_cpus: float = 1.0, build_gpus: float = 0.0, console=None,
              on_trial: Callable[[dict], None] | None = None) -> SweepResult:
    """Start a sweep in a new folder and run it to its budget."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if seed is not None:
        sweep.space.sampler = sweep.space.sampler.model_copy(update={"seed": seed})
        sweep.source.setdefault("search", {}).setdefault("sampler", {})["seed"] = seed
    if trials is not None:
        sweep.space.budget = sweep.space.budget.model_copy(update={"trials": trials})
    folder = Path(folder) if folder is not None else _new_folder(Path(sweeps_dir), sweep.recipe.name)
    if (folder / STUDY_FILE).exists():
        raise BadInput(f"{folder} already holds a sweep; continue it with `edgesmith sweep --resume {folder}`")
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    source = copy.deepcopy(sweep.source)
    source.setdefault("search", {})["budget"] = sweep.space.budget.model_dump(mode="json")
    write_text_atomic(folder / SWEEP_FILE, yaml.safe_dump(source, sort_keys=False))
    cache = _cache_for(cache_dir, folder, ray)
    write_json_atomic(folder / META_FILE, {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                          "cache_dir": str(cache), "study": sweep.recipe.name})
    claim_folder(folder)
    study = open_study(folder, sweep, create=True)
    return _drive(sweep, folder, study, cache, parallel=parallel, ray=ray, wall_time_s=wall_time_s,
                  build_cpus=build_cpus, build_gpus=build_gpus, console=console, on_trial=on_trial)


def resume_sweep(folder: str | Path, *, trials: int | None = None, parallel: int | None = None,
                 ray: str | None = None, cache_dir: str | Path | None = None, wall_time_s: float | None = None,
                 build_cpus: float = 1.0, build_gpus: float = 0.0, console=None,
                 on_trial: Callable[[dict], None] | None = None) -> SweepResult:
    """Continue a sweep killed or stopped before its budget: trials that were running are
    recorded as interrupted and run again."""
    folder = Path(folder)
    if not (folder / SWEEP_FILE).exists() or not (folder / STUDY_FILE).exists():
        raise BadInput(f"{folder}: not a sweep folder (no {SWEEP_FILE} and {STUDY_FILE}); give the folder "
                       "`edgesmith sweep` printed")
    folder = folder.resolve()
    sweep = load_sweep(folder / SWEEP_FILE)
    if trials is not None:
        sweep.space.budget = sweep.space.budget.model_copy(update={"trials": trials})
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).exists() else {}
    cache = Path(cache_dir) if cache_dir is not None else Path(meta.get("cache_dir") or _cache_for(None, folder, ray))
    claim_folder(folder)
    study = open_study(folder, sweep, create=False)
    requeue_interrupted(study)
    return _drive(sweep, folder, study, cache, parallel=parallel, ray=ray, wall_time_s=wall_time_s,
                  build_cpus=build_cpus, build_gpus=build_gpus, console=console, on_trial=on_trial)


def _drive(sweep: Sweep, folder: Path, study, cache: Path, *, parallel: int | None, ray: str | None,
           wall_time_s: float | None, build_cpus: float, build_gpus: float, console,
           on_trial: Callable[[dict], None] | None) -> SweepResult:
    from rich.console import Console

    console = console or Console(stderr=True, quiet=True)
    started = time.perf_counter()
    backend = _backend(ray, parallel, build_cpus, build_gpus, sweep.space.provider)
    wall = wall_time_s if wall_time_s is not None else sweep.space.budget.wall_time_s
    console.print(f"[bold]edgesmith sweep[/] {sweep.recipe.name}: {sweep.space.budget.trials} trials, "
                  f"{backend.describe()} → {folder}")
    driver = _Driver(sweep, folder, study, backend, cache, trials=sweep.space.budget.trials, wall_time_s=wall,
                     console=console, on_trial=on_trial)
    cancelled = True
    try:
        driver.run()
        cancelled = False
    finally:
        backend.close(cancel=cancelled)
    summary = write_pareto(folder, sweep, study)
    report = write_report(folder, sweep, summary)
    seconds = round(time.perf_counter() - started, 2)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("sessions", []).append({"backend": backend.describe(), "seconds": seconds,
                                            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    meta.pop("pid", None)
    write_json_atomic(meta_path, meta)
    return SweepResult(folder, summary, report, backend.describe(), seconds, summary["front"])
