"""Trial work, run in worker processes or Ray tasks (plain dicts in, plain dicts out): the build of a
variant through the pipeline, and the profile of its final artifact. Both are module-level
functions so that multiprocessing and Ray can pickle them by reference."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError, first_line
from edgesmith.recipe import SOURCE_ID

log = logging.getLogger(__name__)


def _failure(kind: str, exc: BaseException) -> dict[str, Any]:
    text = first_line(exc) if str(exc) else type(exc).__name__
    return {"ok": False, "failure_kind": kind, "reason": f"{type(exc).__name__}: {text}"}


def build_trial(task: dict[str, Any]) -> dict[str, Any]:
    """Run one variant through the pipeline (no profiling) and measure its final artifact's size.

    Never raises for a trial's own failure: a failed gate, a refused config or an export error
    comes back as ``{"ok": False, "failure_kind": ..., "reason": ...}``."""
    from edgesmith.errors import GateFailed, ValidationFailed

    started = time.perf_counter()
    marker = Path(task["marker"])
    if not marker.exists():
        import socket

        return {"ok": False, "failure_kind": "setup",
                "reason": f"the sweep folder {marker.parent} is not visible on {socket.gethostname()}; "
                          "put it (and the cache) on a filesystem all nodes share"}
    try:
        from edgesmith.pipeline import run
        from edgesmith.profiling import artifact_size_bytes

        result = run(task["recipe"], runs_dir=task["runs_dir"], cache_dir=task["cache_dir"], progress=False)
        final_id = result.manifest.get("final_artifact", SOURCE_ID)
        art = result.artifacts[final_id]
        folder = result.run_dir / "artifacts" / final_id if final_id != SOURCE_ID else _source_path(task["recipe"])
        return {"ok": True, "run_dir": str(result.run_dir), "final_artifact": final_id, "artifact_dir": str(folder),
                "metrics": result.metrics.get(final_id, {}), "size": artifact_size_bytes(art),
                "seconds": round(time.perf_counter() - started, 3)}
    except GateFailed as exc:
        return _failure("gate-failed", exc) | {"run_dir": _last_run_dir(task)}
    except ValidationFailed as exc:
        return _failure("validation-failed", exc) | {"run_dir": _last_run_dir(task)}
    except EdgesmithError as exc:
        return _failure("error", exc) | {"run_dir": _last_run_dir(task)}
    except Exception as exc:  # an export crash or a library fault: this trial fails, the sweep goes on
        log.debug("trial failed", exc_info=True)
        return _failure("error", exc) | {"run_dir": _last_run_dir(task)}


def _source_path(recipe: dict[str, Any]) -> Path:
    from edgesmith.artifacts import resolve_model_path

    return resolve_model_path(recipe.get("model"))


def _last_run_dir(task: dict[str, Any]) -> str | None:
    runs = sorted(Path(task["runs_dir"]).glob(f"{task['recipe']['name']}-*"))
    return str(runs[-1]) if runs else None


def profile_trial(task: dict[str, Any]) -> dict[str, Any]:
    """Profile one trial's final artifact and save the profile (with its quality) in the trial's run folder."""
    try:
        from edgesmith.artifacts import load
        from edgesmith.pipeline import profile_filename
        from edgesmith.profiling import profile

        spec = task["profile"]
        art = load(task["artifact_dir"])
        prof = profile(art, task.get("runtime"), batch=spec["batch"], seq=spec["seq"], warmup=spec["warmup"],
                       iterations=spec["iterations"], time_budget_s=spec["time_budget_s"], threads=spec["threads"],
                       provider=task.get("provider", "cpu"), target=spec["target"], label=task["label"])
        prof.quality = dict(task.get("metrics", {}))
        path = Path(task["run_dir"]) / "profiles" / profile_filename(task["label"])
        prof.save(path)
        stats = prof.stats.model_dump() if hasattr(prof.stats, "model_dump") else dict(prof.stats)
        return {"ok": True, "profile": str(path), "stats": stats, "throughput": prof.throughput,
                "providers": list(prof.runtime.providers)}
    except Exception as exc:  # a profile that cannot run fails its trial, not the sweep
        log.debug("profiling failed", exc_info=True)
        return _failure("profile-failed", exc)
