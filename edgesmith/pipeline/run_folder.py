"""The run folder ``runs/<recipe>-<time>/``: its ``state.json`` (what the run is doing now), folders
left by killed runs, and ``manifest.json``'s contents."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgesmith.artifacts import Artifact
from edgesmith.cache import package_versions
from edgesmith.errors import BadInput
from edgesmith.faults import point
from edgesmith.recipe import Recipe
from edgesmith.storage import read_json, temp_owner, write_json_atomic

#: the states a run folder ends in
FINAL_STATES = ("done", "failed", "gate-failed", "interrupted")


class RunState:
    """``state.json`` in the run folder: what the run is doing, for people and for tests.

    Each change first checks that the run folder is still there: one deleted mid-run (by the user,
    or a clean-up job) stops the run with one line rather than being silently made again."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / "state.json"
        self.set("starting")

    def check(self) -> None:
        if not self.run_dir.is_dir():
            raise BadInput(f"{self.run_dir}: the run folder was deleted while the run was running; the steps it "
                           "finished stay in the cache, so running the recipe again resumes from them")

    def set(self, status: str, **extra: Any) -> None:
        self.check()
        point(f"run:{status}")
        write_json_atomic(self.path, {"status": status, "updated": now(), "owner": temp_owner(), **extra})


def tidy_killed_runs(runs_dir: Path, name: str) -> None:
    """Run folders of this recipe left by a killed run (state not final, its process gone, on this
    machine): remove their half-copied artifacts' temp folders and mark them ``interrupted``."""
    from edgesmith.storage import process_gone, remove_stale_temps

    if not runs_dir.is_dir():
        return
    for folder in runs_dir.glob(f"{name}-*"):
        state = read_json(folder / "state.json")
        if not isinstance(state, dict) or state.get("status") in FINAL_STATES or not process_gone(str(state.get("owner"))):
            continue
        remove_stale_temps(folder)
        remove_stale_temps(folder / "artifacts")
        write_json_atomic(folder / "state.json", {**state, "status": "interrupted", "was": state.get("status"),
                                                  "updated": now()})


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_dir(runs_dir: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = runs_dir / f"{name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = runs_dir / f"{name}-{stamp}-{n}"
    try:
        candidate.mkdir(parents=True)
    except PermissionError as exc:  # name the runs folder, which the user can fix
        blocked = next((p for p in (runs_dir, *runs_dir.parents) if p.exists()), runs_dir)
        raise PermissionError(exc.errno, exc.strerror, str(blocked)) from exc
    return candidate


def manifest(recipe: Recipe, source: Artifact, source_hash: str, steps: list[dict], folders: dict[str, str],
             metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    from edgesmith.artifacts import TorchModel

    src = {"model": recipe.model, "kind": source.kind, "name": source.name, "content_hash": source_hash,
           "task": source.task}
    if isinstance(source, TorchModel):
        src["parameters"] = source.parameter_count()
    return {
        "schema": 1,
        "recipe": recipe.to_dict(),
        "created": now(),
        "source": src,
        "steps": [{**s, "folder": folders.get(s["id"])} for s in steps],
        "metrics": metrics,
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "machine": platform.machine(), "packages": package_versions()},
    }
