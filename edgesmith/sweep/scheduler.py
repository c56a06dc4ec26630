"""The scheduler: the driver loop that asks the sampler for trials, runs their builds and profiles on
a backend (no build starting while a profile waits, and, locally, a profile starting only while no
build runs), and tells the study the results."""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesmith.faults import point
from edgesmith.sweep.folder import SWEEP_FILE, TRIALS_DIR
from edgesmith.sweep.objectives import LATENCY_METRICS
from edgesmith.sweep.pareto import format_metric, write_pareto
from edgesmith.sweep.space import SearchSpace, Sweep
from edgesmith.sweep.study import _optuna, tell
from edgesmith.sweep.trials import _failure
from edgesmith.sweep.variants import suggest, trial_label, variant


@dataclass
class _InFlight:
    trial: Any
    params: dict[str, Any]
    label: str
    build: dict[str, Any] | None = None


def _values(space: SearchSpace, measured: dict[str, float]) -> list[float] | str:
    """Objective values in order, or the reason they cannot be given."""
    values = []
    for metric in [o.metric for o in space.objectives] + [c.metric for c in space.constraints]:
        if metric not in measured or measured[metric] is None or not math.isfinite(measured[metric]):
            return f"metric '{metric}' was not measured (measured: {', '.join(sorted(measured)) or 'nothing'})"
    for o in space.objectives:
        values.append(float(measured[o.metric]))
    return values


def _measured(build: dict[str, Any], prof: dict[str, Any] | None) -> dict[str, float]:
    measured = {k: float(v) for k, v in build.get("metrics", {}).items() if isinstance(v, (int, float))}
    measured["size"] = float(build["size"])
    if prof and prof.get("ok"):
        for name, stat in LATENCY_METRICS.items():
            if stat in prof["stats"]:
                measured[name] = float(prof["stats"][stat])
        measured["throughput"] = float(prof["throughput"])
    return measured


class _Driver:
    """Asks the sampler for trials, runs builds and profiles on a backend, tells the results."""

    def __init__(self, sweep: Sweep, folder: Path, study, backend, cache_dir: Path, *, trials: int,
                 wall_time_s: float | None, console, on_trial: Callable[[dict], None] | None = None):
        self.sweep, self.folder, self.study, self.backend = sweep, folder, study, backend
        self.cache_dir, self.trials, self.wall_time_s = cache_dir, trials, wall_time_s
        self.console = console
        self.on_trial = on_trial
        self.started = time.monotonic()
        self.runs_dir = folder / TRIALS_DIR
        self.profile_spec = sweep.recipe.profile.model_dump(mode="json") if sweep.recipe.profile else None

    # -- budget ------------------------------------------------------------------------------
    def finished(self) -> int:
        optuna = _optuna()
        done = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.COMPLETE or t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("failure_kind") != "interrupted":
                done += 1
        return done

    def may_start(self, in_flight: int) -> bool:
        if self.finished() + in_flight >= self.trials:
            return False
        return self.wall_time_s is None or time.monotonic() - self.started < self.wall_time_s

    # -- trial lifecycle ---------------------------------------------------------------------
    def ask(self) -> _InFlight:
        trial = self.study.ask()
        params = suggest(trial, self.sweep.space)
        label = trial_label(trial.number, params)
        trial.set_user_attr("params", params)
        trial.set_user_attr("label", label)
        return _InFlight(trial, params, label)

    def build_task(self, item: _InFlight) -> dict[str, Any]:
        recipe = variant(self.sweep.recipe, item.params, name=f"{self.sweep.recipe.name}-t{item.trial.number:04d}")
        return {"recipe": recipe.to_dict(),
                "runs_dir": str(self.runs_dir), "cache_dir": str(self.cache_dir),
                "marker": str(self.folder / SWEEP_FILE)}

    def profile_task(self, item: _InFlight) -> dict[str, Any]:
        assert item.build is not None and self.profile_spec is not None
        return {"artifact_dir": item.build["artifact_dir"], "run_dir": item.build["run_dir"], "label": item.label,
                "metrics": item.build.get("metrics", {}), "profile": self.profile_spec,
                "runtime": self.sweep.space.runtime, "provider": self.sweep.space.provider}

    def _rel(self, path: str | None) -> str | None:
        if not path:
            return None
        try:
            return str(Path(path).resolve().relative_to(self.folder.resolve()))
        except ValueError:
            return str(path)

    def fail(self, item: _InFlight, result: dict[str, Any]) -> None:
        optuna = _optuna()
        trial = item.trial
        trial.set_user_attr("failure_kind", result.get("failure_kind", "error"))
        trial.set_user_attr("failure", result.get("reason", "unknown"))
        if result.get("run_dir"):
            trial.set_user_attr("run_dir", self._rel(result["run_dir"]))
        tell(self.study, trial, state=optuna.trial.TrialState.FAIL)
        self.console.print(f"[red]✗[/] {item.label}: {result.get('reason')}", highlight=False)
        self._report({"trial": trial.number, "state": "FAIL", "reason": result.get("reason")})

    def complete(self, item: _InFlight, prof: dict[str, Any] | None) -> None:
        build = item.build or {}
        if prof is not None and not prof.get("ok"):
            self.fail(item, prof | {"run_dir": build.get("run_dir")})
            return
        measured = _measured(build, prof)
        values = _values(self.sweep.space, measured)
        if isinstance(values, str):
            self.fail(item, {"failure_kind": "error", "reason": values, "run_dir": build.get("run_dir")})
            return
        trial = item.trial
        trial.set_user_attr("measured", measured)
        trial.set_user_attr("run_dir", self._rel(build["run_dir"]))
        trial.set_user_attr("artifact", self._rel(build["artifact_dir"]))
        trial.set_user_attr("final_artifact", build["final_artifact"])
        trial.set_user_attr("build_seconds", build.get("seconds"))
        if prof is not None:
            trial.set_user_attr("profile", self._rel(prof["profile"]))
            trial.set_user_attr("providers", prof.get("providers"))
        for i, c in enumerate(self.sweep.space.constraints):
            trial.set_constraint(f"{i}:{c.text}", c.violation(measured[c.metric]))
        tell(self.study, trial, values)
        feasible = all(c.holds(measured[c.metric]) for c in self.sweep.space.constraints)
        shown = ", ".join(f"{o.metric} {format_metric(o.metric, measured[o.metric])}" for o in self.sweep.space.objectives)
        mark = "[green]✓[/]" if feasible else "[yellow]○[/]"
        note = "" if feasible else " (violates a constraint)"
        self.console.print(f"{mark} {item.label}: {shown}{note}", highlight=False)
        self._report({"trial": trial.number, "state": "COMPLETE", "values": values, "feasible": feasible})

    def _report(self, event: dict) -> None:
        point(f"sweep:trial:{event['trial']}:told")
        write_pareto(self.folder, self.sweep, self.study)
        if self.on_trial is not None:
            self.on_trial(event)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        builds: dict[cf.Future, _InFlight] = {}
        profiles: dict[cf.Future, _InFlight] = {}
        waiting: deque[_InFlight] = deque()
        quiet = self.backend.profile_needs_quiet
        while True:
            if waiting and (not quiet or (not builds and not profiles)):
                item = waiting.popleft()
                profiles[self.backend.submit_profile(self.profile_task(item))] = item
                continue
            if (not waiting and not profiles and len(builds) < self.backend.parallel
                    and self.may_start(len(builds))):
                item = self.ask()
                self.console.print(f"… {item.label}", highlight=False)
                builds[self.backend.submit_build(self.build_task(item))] = item
                continue
            if not builds and not profiles:
                break
            done, _ = cf.wait(list(builds) + list(profiles), return_when=cf.FIRST_COMPLETED)
            for future in done:
                if future in builds:
                    item = builds.pop(future)
                    result = self._result(future)
                    if not result.get("ok"):
                        self.fail(item, result)
                        continue
                    item.build = result
                    if self.profile_spec is None:
                        self.complete(item, None)
                    else:
                        waiting.append(item)
                else:
                    item = profiles.pop(future)
                    self.complete(item, self._result(future))

    @staticmethod
    def _result(future: cf.Future) -> dict[str, Any]:
        try:
            return future.result()
        except Exception as exc:
            return _failure("crashed", exc)
