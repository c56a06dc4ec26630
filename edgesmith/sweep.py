"""Sweeps: search recipe variants for the Pareto front of quality, latency and size.

A sweep is a recipe plus a ``search:`` block in the same YAML::

    name: minilm-sweep
    model: minilm
    steps:
      - prune: {heads: 0.25, ffn: 0.25}
      - export: {}
      - quantize: {mode: dynamic}
    profile: {batch: 1, seq: 128, iterations: 50, threads: 2}
    search:
      parameters:
        steps.prune.enabled: [true, false]              # a step can be switched off
        steps.prune.heads: {choices: [0.25, 0.5], when: {steps.prune.enabled: true}}
        steps.prune.ffn: {low: 0.0, high: 0.5, step: 0.25, when: {steps.prune.enabled: true}}
        steps.quantize.mode: [dynamic, static]
      objectives: {cosine: max, latency_p50: min, size: min}
      constraints: ["cosine >= 0.98", "latency_p90 <= 10ms"]
      budget: {trials: 20, wall_time: 30m}
      sampler: {name: nsga2, seed: 0}

Every trial is a normal pipeline run (so every step is cached and shared across trials) of the
variant with ``profile: null``; the variant's final artifact is then profiled on its own. How
profiling is kept apart from other trials' work is the scheduler's job (:func:`run_sweep`):

- local (``parallel`` worker processes): profiling runs in the driver process, and only while no
  build is running; no build starts while a profile is waiting or running. So a timed loop never
  shares the machine with another trial.
- Ray: each build is a task asking ``build_cpus`` CPUs; each profile is a task pinned to one
  profiling node that asks for *all* of that node's CPUs (and a GPU when the provider is one), so
  Ray starts it only when nothing else of the sweep runs there and starts nothing beside it; the
  driver submits no new build while a profile is pending, so profiles cannot starve. All profiles
  run on the same node, so their latencies compare.

The study lives in ``study.journal`` (Optuna's journal storage) in the sweep folder; a killed sweep
continues with ``resume_sweep(folder)`` (``edgesmith sweep --resume FOLDER``): trials that were
running when it died are recorded as interrupted and run again (their finished steps come from
the cache).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.errors import BadInput, EdgesmithError
from edgesmith.recipe import SOURCE_ID, Recipe
from edgesmith.storage import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
STUDY_FILE = "study.journal"
META_FILE = "sweep.json"
PARETO_FILE = "pareto.json"
TRIALS_DIR = "trials"
ENABLED = "enabled"  # steps.<id>.enabled: the pseudo-option that switches a step on or off
WHOLE = "*"  # steps.<id>: the parameter chooses among whole option sets of the step

LATENCY_METRICS = {"latency_p50": "p50", "latency_p90": "p90", "latency_p99": "p99", "latency_mean": "mean",
                   "latency_min": "min", "latency_max": "max"}
MEASURED_METRICS = {"size", "throughput", *LATENCY_METRICS}
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "maximise": "maximize",
              "min": "minimize", "minimize": "minimize", "minimise": "minimize"}
TIME_UNITS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3}
SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w@]*)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*$")
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|min)?\s*$")


# ---------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One searched option: ``steps.<step_id>.<option>`` with choices or a range, maybe conditional."""

    path: str
    step_id: str
    option: str
    kind: Literal["choice", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(name in chosen and chosen[name] in values for name, values in self.when)

    def grid_values(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None or self.log:
            raise BadInput(f"search.parameters.{self.path}: the grid sampler needs a step on every range "
                           "(and no log); add step: or use choices")
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Constraint:
    """``metric op value``, with value in the metric's own unit (ms for latencies, bytes for size)."""

    metric: str
    op: Literal[">=", "<=", ">", "<"]
    value: float
    text: str

    def violation(self, measured: float) -> float:
        """Optuna's convention: <= 0 when satisfied, else by how much it is violated."""
        gap = self.value - measured if self.op in (">=", ">") else measured - self.value
        if self.op in (">", "<") and gap == 0:
            return 1e-12  # a strict bound is violated by equality
        return gap

    def holds(self, measured: float) -> bool:
        return self.violation(measured) <= 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerSpec(_Strict):
    name: Literal["nsga2", "tpe", "random", "grid"] = "nsga2"
    seed: int | None = 0
    population: int | None = Field(None, ge=2, description="NSGA-II population (default: trials/3, 4 to 50)")


class BudgetSpec(_Strict):
    trials: int = Field(20, gt=0, description="finished trials (completed or failed) to run")
    wall_time: float | str | None = Field(None, description="start no trial after this long: seconds or '30m', '2h'")

    @field_validator("wall_time")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def wall_time_s(self) -> float | None:
        return None if self.wall_time is None else parse_duration(self.wall_time)


class SearchSpec(_Strict):
    """The ``search:`` block as written; :func:`parse_search` checks it against the recipe."""

    parameters: dict[str, Any]
    objectives: dict[str, str] | list[dict[str, str]]
    constraints: list[str] = Field(default_factory=list)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    runtime: str | None = Field(None, description="runtime the final artifact is profiled on (default: its own)")
    provider: str = Field("cpu", description="execution provider for profiling: cpu, cuda, tensorrt")


@dataclass
class SearchSpace:
    parameters: list[Parameter]
    objectives: list[Objective]
    constraints: list[Constraint]
    budget: BudgetSpec
    sampler: SamplerSpec
    runtime: str | None
    provider: str

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def needs_latency(self, recipe: Recipe) -> bool:
        return recipe.profile is not None


@dataclass
class Sweep:
    """A recipe (the base of every variant) and its search space."""

    recipe: Recipe
    space: SearchSpace
    source: dict[str, Any]  # the YAML document as written (recipe keys + search), kept for --resume


def parse_duration(value: float | str) -> float:
    """Seconds from a number of seconds or '90s', '30m', '2h'."""
    if isinstance(value, bool):
        raise ValueError(f"a duration is seconds or a string like '30m', not {value!r}")  # noqa: TRY004 (pydantic)
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a duration must be positive (got {value})")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a duration; write seconds or e.g. '90s', '30m', '2h'")
    number, unit = float(match.group(1)), (match.group(2) or "s")
    seconds = number * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive (got {value!r})")
    return seconds


def parse_constraint(text: str, *, where: str = "search.constraints") -> Constraint:
    """``'cosine >= 0.98'``, ``'latency_p90 <= 10ms'``, ``'size <= 20MB'`` -> :class:`Constraint`."""
    match = _CONSTRAINT.match(str(text))
    if not match:
        raise BadInput(f"{where}: '{text}' is not a constraint; write 'METRIC >= VALUE' or 'METRIC <= VALUE', "
                       "e.g. 'cosine >= 0.98' or 'latency_p90 <= 10ms'")
    metric, op, number, unit = match.group(1), match.group(2), float(match.group(3)), match.group(4)
    _check_metric(metric, where)
    value = number * _unit_factor(metric, unit, where, text)
    return Constraint(metric=metric, op=op, value=value, text=str(text).strip())  # type: ignore[arg-type]


def _unit_factor(metric: str, unit: str, where: str, text: str) -> float:
    if not unit:
        return 1.0
    if metric in LATENCY_METRICS:
        table, hint = TIME_UNITS, "ms, s or us"
    elif metric == "size":
        table, hint = SIZE_UNITS, "B, KB, MB, GB, KiB, MiB or GiB"
    else:
        raise BadInput(f"{where}: '{text}': {metric} takes no unit")
    factor = table.get(unit) if metric in LATENCY_METRICS else table.get(unit.lower())
    if factor is None:
        raise BadInput(f"{where}: '{text}': unknown unit '{unit}' for {metric}; use {hint}")
    return float(factor)


def _check_metric(metric: str, where: str) -> None:
    from edgesmith.quality import is_known_metric, known_metrics

    if metric in MEASURED_METRICS or is_known_metric(metric):
        return
    known = [*known_metrics(), "size", "throughput", *LATENCY_METRICS]
    raise BadInput(f"{where}: unknown metric '{metric}'; use one of {', '.join(known)} (recall@k, e.g. recall@10)")


def parse_search(raw: Any, recipe: Recipe, *, where: str = "search") -> SearchSpace:
    """Check a ``search:`` block against the recipe: steps, option names and values, metrics."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: give a mapping with parameters, objectives, constraints, budget")
    try:
        spec = SearchSpec(**raw)
    except ValidationError as exc:
        from edgesmith.compress.base import describe_validation_error
        from edgesmith.recipe import _model_at

        raise BadInput(describe_validation_error(exc, where, _model_at(SearchSpec, exc))) from exc
    if not spec.parameters:
        raise BadInput(f"{where}.parameters: empty; name at least one option to search, "
                       "e.g. steps.prune.heads: [0.25, 0.5]")
    steps = {s.id: s for s in recipe.steps}
    parameters: list[Parameter] = []
    for path, value in spec.parameters.items():
        parameters.append(_parse_parameter(path, value, steps, parameters, f"{where}.parameters.{path}"))
    objectives = _parse_objectives(spec.objectives, f"{where}.objectives")
    constraints = [parse_constraint(c, where=f"{where}.constraints") for c in spec.constraints]
    needs_profile = [m for m in [o.metric for o in objectives] + [c.metric for c in constraints]
                     if m in LATENCY_METRICS or m == "throughput"]
    if needs_profile and recipe.profile is None:
        raise BadInput(f"{where}: {needs_profile[0]} needs a latency measurement, but the recipe says profile: null; "
                       "give a profile block (batch, seq, iterations)")
    if spec.runtime is not None:
        from edgesmith.runtimes.base import get_runtime

        get_runtime(spec.runtime)
    space = SearchSpace(parameters, objectives, constraints, spec.budget, spec.sampler, spec.runtime, spec.provider)
    if spec.sampler.name == "grid":
        if any(p.when for p in parameters):
            raise BadInput(f"{where}.sampler: the grid sampler needs a fixed space; drop the 'when' conditions "
                           "or use nsga2, tpe or random")
        for p in parameters:
            p.grid_values()
    return space


def _parse_objectives(raw: dict[str, str] | list[dict[str, str]], where: str) -> list[Objective]:
    items: list[tuple[str, str]] = []
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        for entry in raw:
            if len(entry) != 1:
                raise BadInput(f"{where}: each entry is one 'metric: max|min', got {entry!r}")
            items += list(entry.items())
    if not items:
        raise BadInput(f"{where}: empty; give at least one, e.g. {{cosine: max, size: min}}")
    objectives = []
    for metric, direction in items:
        _check_metric(metric, where)
        if str(direction).lower() not in DIRECTIONS:
            raise BadInput(f"{where}.{metric}: '{direction}' is not a direction; use max or min")
        objectives.append(Objective(metric, DIRECTIONS[str(direction).lower()]))  # type: ignore[arg-type]
    if len({o.metric for o in objectives}) != len(objectives):
        raise BadInput(f"{where}: a metric is named twice")
    return objectives


def address(path: str) -> tuple[str, str]:
    """``steps.<id>.<option>`` -> (id, option); ``steps.<id>`` -> (id, WHOLE): a choice of option sets."""
    rest = path[len("steps."):]
    if "." not in rest:
        return rest, WHOLE
    step_id, option = rest.rsplit(".", 1)
    return step_id, option


def _split_path(path: str, where: str, steps: dict) -> tuple[str, str]:
    if not path.startswith("steps.") or path == "steps.":
        raise BadInput(f"{where}: a parameter is addressed as steps.<step_id>.<option> (e.g. steps.prune.heads), "
                       "or steps.<step_id> with choices of option sets")
    step_id, option = address(path)
    if step_id not in steps:
        raise BadInput(f"{where}: the recipe has no step '{step_id}'; its steps: {', '.join(steps) or 'none'}")
    return step_id, option


def _parse_parameter(path: str, value: Any, steps: dict, earlier: list[Parameter], where: str) -> Parameter:
    from edgesmith.compress.base import get_pass, make_config

    step_id, option = _split_path(path, where, steps)
    step = steps[step_id]
    pass_cls = get_pass(step.pass_name)
    fields = pass_cls.config_class.model_fields
    if option not in (ENABLED, WHOLE) and option not in fields:
        raise BadInput(f"{where}: pass '{step.pass_name}' has no option '{option}'; "
                       f"its options: {', '.join(sorted(fields))} (and '{ENABLED}' to switch the step off)")
    when: dict[str, Any] = {}
    if isinstance(value, dict):
        value = dict(value)
        when = value.pop("when", None) or {}
        if not isinstance(when, dict):
            raise BadInput(f"{where}.when: give a mapping {{parameter: value}}")
    param = _parameter_values(path, step_id, option, value, where)
    conditions = []
    known = {p.path: p for p in earlier}
    for name, wanted in when.items():
        if name not in known:
            raise BadInput(f"{where}.when: '{name}' is not a parameter declared before this one; "
                           f"declared: {', '.join(known) or 'none'}")
        values = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if known[name].kind == "choice":
            missing = [v for v in values if v not in known[name].choices]
            if missing:
                raise BadInput(f"{where}.when: {name} never takes {missing[0]!r}; its choices: "
                               f"{', '.join(map(repr, known[name].choices))}")
        conditions.append((name, values))
    param = dataclasses.replace(param, when=tuple(conditions))
    # every value the search can take must make a valid config for the pass
    if option == ENABLED:
        bad = [c for c in param.choices if not isinstance(c, bool)]
        if param.kind != "choice" or bad:
            raise BadInput(f"{where}: '{ENABLED}' takes choices of true/false, e.g. [true, false]")
    elif option == WHOLE:
        if param.kind != "choice" or not all(isinstance(c, dict) for c in param.choices):
            raise BadInput(f"{where}: a whole step takes choices of option sets, e.g. "
                           "[{enabled: false}, {ffn: 0.25}, {ffn: 0.5}]")
        for probe in param.choices:
            if probe.get(ENABLED, True) is False:
                continue
            options = {**step.options, **{k: v for k, v in probe.items() if k != ENABLED}}
            make_config(pass_cls.config_class, options, where=f"{where} = {probe!r}")
    else:
        for probe in ([*param.choices] if param.kind == "choice" else [param.low, param.high]):
            options = {**step.options, option: probe}
            make_config(pass_cls.config_class, options, where=f"{where} = {probe!r}")
    return param


def _parameter_values(path: str, step_id: str, option: str, value: Any, where: str) -> Parameter:
    if isinstance(value, dict) and "choices" in value:
        extra = set(value) - {"choices"}
        if extra:
            raise BadInput(f"{where}: choices take no {', '.join(sorted(extra))}")
        value = value["choices"]
    if isinstance(value, list):
        if not value:
            raise BadInput(f"{where}: empty list of choices; give at least one value, e.g. [0.25, 0.5]")
        return Parameter(path, step_id, option, "choice", choices=tuple(value))
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "step", "log"}
        if unknown:
            raise BadInput(f"{where}: unknown key '{min(unknown)}'; a range has low, high, step, log "
                           "(choices are a list, conditions go in when:)")
        if "low" not in value or "high" not in value:
            raise BadInput(f"{where}: a range needs low and high, e.g. {{low: 0.1, high: 0.6}}")
        low, high, step, log_ = value["low"], value["high"], value.get("step"), bool(value.get("log", False))
        numbers = [v for v in (low, high, step) if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise BadInput(f"{where}: low, high and step must be numbers")
        if low > high:
            raise BadInput(f"{where}: low ({low}) is above high ({high}); swap them")
        if step is not None and step <= 0:
            raise BadInput(f"{where}: step must be positive (got {step})")
        if log_ and low <= 0:
            raise BadInput(f"{where}: a log range needs low > 0 (got {low})")
        if log_ and step is not None:
            raise BadInput(f"{where}: give either log or step, not both")
        kind = "int" if all(isinstance(v, int) for v in numbers) else "float"
        return Parameter(path, step_id, option, kind, low=low, high=high, step=step, log=log_)
    raise BadInput(f"{where}: give a list of choices ([a, b]), a range ({{low: .., high: ..}}) "
                   f"or {{choices: [...], when: {{...}}}}, not {value!r}")


def load_sweep(path: str | Path) -> Sweep:
    """Read a recipe with a ``search:`` block from YAML (or JSON)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"sweep recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return sweep_from_dict(data, where=str(path))


def sweep_from_dict(data: Any, *, where: str = "sweep") -> Sweep:
    if not isinstance(data, dict):
        raise BadInput(f"{where}: a sweep is a recipe mapping with a search: block")
    if "search" not in data:
        raise BadInput(f"{where}: no search: block; add search: {{parameters: ..., objectives: ...}} "
                       "(see docs/sweep.md), or use `edgesmith run` for a single recipe")
    source = copy.deepcopy(data)
    rest = {k: v for k, v in data.items() if k != "search"}
    recipe = Recipe.from_dict(rest, where=where)
    from edgesmith.pipeline import plan

    plan(recipe)
    space = parse_search(data["search"], recipe, where=f"{where}: search")
    return Sweep(recipe, space, source)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are None/bool/int/float/str: other values go as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "json:" + json.dumps(value, sort_keys=True)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask an Optuna trial for a value of every active parameter, in the order they are declared."""
    chosen: dict[str, Any] = {}
    for p in space.parameters:
        if not p.active(chosen):
            continue
        if p.kind == "choice":
            chosen[p.path] = _decode(trial.suggest_categorical(p.path, [_encode(c) for c in p.choices]))
        elif p.kind == "int":
            chosen[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            chosen[p.path] = trial.suggest_float(p.path, float(p.low), float(p.high), step=p.step, log=p.log)
    return chosen


def variant(recipe: Recipe, params: dict[str, Any], *, name: str) -> Recipe:
    """The recipe with the chosen options set, switched-off steps left out, and profiling off."""
    by_step: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        step_id, option = address(path)
        chosen = by_step.setdefault(step_id, {})
        if option == WHOLE:
            chosen.update(value)
        else:
            chosen[option] = value
    steps = []
    for step in recipe.steps:
        chosen = by_step.get(step.id, {})
        if chosen.get(ENABLED, True) is False:
            continue
        options = {**step.options, **{k: v for k, v in chosen.items() if k != ENABLED}}
        steps.append(step.model_copy(update={"options": options}))
    return Recipe.model_validate({**recipe.model_dump(), "name": name, "steps": steps, "profile": None})


def trial_label(number: int, params: dict[str, Any]) -> str:
    text = describe_params(params)
    return f"t{number:04d}" + (f" {text}" if text else "")


def describe_params(params: dict[str, Any]) -> str:
    """``prune=(ffn=0.5) quantize=off``: the chosen values, short, for labels and tables."""
    parts = []
    for path, value in params.items():
        step_id, option = address(path)
        if option == ENABLED:
            parts.append(f"{step_id}={'on' if value else 'off'}")
        elif option == WHOLE:
            on = value.get(ENABLED, True) is not False
            inner = ",".join(f"{k}={v}" for k, v in value.items() if k != ENABLED)
            parts.append(f"{step_id}=" + (f"({inner})" if on and inner else "on" if on else "off"))
        elif params.get(f"steps.{step_id}.{ENABLED}", True) is not False:
            parts.append(f"{option}={value}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Trial work (runs in worker processes or Ray tasks: plain dicts in, plain dicts out)
# ---------------------------------------------------------------------------------------------


def _failure(kind: str, exc: BaseException) -> dict[str, Any]:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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
        from edgesmith.pipeline import _profile_file
        from edgesmith.profiling import profile

        spec = task["profile"]
        art = load(task["artifact_dir"])
        prof = profile(art, task.get("runtime"), batch=spec["batch"], seq=spec["seq"], warmup=spec["warmup"],
                       iterations=spec["iterations"], time_budget_s=spec["time_budget_s"], threads=spec["threads"],
                       provider=task.get("provider", "cpu"), target=spec["target"], label=task["label"])
        prof.quality = dict(task.get("metrics", {}))
        path = Path(task["run_dir"]) / "profiles" / _profile_file(task["label"])
        prof.save(path)
        stats = prof.stats.model_dump() if hasattr(prof.stats, "model_dump") else dict(prof.stats)
        return {"ok": True, "profile": str(path), "stats": stats, "throughput": prof.throughput,
                "providers": list(prof.runtime.providers)}
    except Exception as exc:  # a profile that cannot run fails its trial, not the sweep
        log.debug("profiling failed", exc_info=True)
        return _failure("profile-failed", exc)


# ---------------------------------------------------------------------------------------------
# Backends: where builds and profiles run
# ---------------------------------------------------------------------------------------------


def _done(value: Any) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_result(value)
    return future


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class LocalBackend:
    """``parallel`` worker processes for builds (in-process when 1); profiles run in the driver.

    ``profile_needs_quiet`` tells the scheduler to start a profile only when no build is running."""

    profile_needs_quiet = True

    def __init__(self, parallel: int):
        self.parallel = max(1, parallel)
        self.pool: cf.ProcessPoolExecutor | None = None
        if self.parallel > 1:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // self.parallel)
            self.pool = cf.ProcessPoolExecutor(self.parallel, mp_context=mp.get_context("spawn"),
                                               initializer=_worker_init, initargs=(threads,))

    def describe(self) -> str:
        return f"local, {self.parallel} worker{'s' if self.parallel > 1 else ''}"

    def submit_build(self, task: dict[str, Any]) -> cf.Future:
        if self.pool is None:
            return _done(build_trial(task))
        return self.pool.submit(build_trial, task)

    def submit_profile(self, task: dict[str, Any]) -> cf.Future:
        return _done(profile_trial(task))

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayBackend:
    """Builds and profiles as Ray tasks on an existing cluster (``ray start --head`` / ``--address``).

    A build asks ``build_cpus`` CPUs (and ``build_gpus``); a profile is pinned to one node and asks
    for all of its CPUs (and one GPU when the provider is not cpu), so it runs alone there."""

    profile_needs_quiet = False

    def __init__(self, address: str, *, parallel: int | None, build_cpus: float, build_gpus: float, provider: str):
        try:
            import ray
        except ImportError as exc:
            raise BadInput("--ray needs Ray: pip install 'edgesmith[ray]'") from exc
        self.ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except ConnectionError as exc:
            raise BadInput(f"no Ray cluster at '{address}': {exc}; start one with `ray start --head` "
                           "or give its address (host:port)") from exc
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        self.build_cpus, self.build_gpus = build_cpus, build_gpus
        self.parallel = parallel or max(1, int(cpus // max(build_cpus, 1e-9)))
        self.node = self._profiling_node(nodes, provider)
        self.node_cpus = self.node["Resources"].get("CPU", 1)
        self.profile_gpus = 1 if provider != "cpu" else 0
        self._build = ray.remote(build_trial).options(num_cpus=build_cpus, num_gpus=build_gpus, max_retries=0)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._profile = ray.remote(profile_trial).options(
            num_cpus=self.node_cpus, num_gpus=self.profile_gpus, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node["NodeID"], soft=False))
        log.info("ray: %d node(s), %g CPUs; profiles on %s (%g CPUs)", len(nodes), cpus,
                 self.node.get("NodeManagerAddress"), self.node_cpus)

    @staticmethod
    def _profiling_node(nodes: list[dict], provider: str) -> dict:
        """A node marked with the custom resource ``edgesmith_profile``, else a GPU node when
        profiling on a GPU, else the head node (when it has CPUs), else the node with most CPUs."""
        marked = [n for n in nodes if n["Resources"].get("edgesmith_profile")]
        if marked:
            return marked[0]
        if provider != "cpu":
            gpu = [n for n in nodes if n["Resources"].get("GPU")]
            if not gpu:
                raise BadInput(f"profiling on '{provider}' needs a GPU node, and the Ray cluster has none")
            return gpu[0]
        head = [n for n in nodes if "node:__internal_head__" in n["Resources"] and n["Resources"].get("CPU")]
        if head:
            return head[0]
        with_cpus = [n for n in nodes if n["Resources"].get("CPU")]
        if not with_cpus:
            raise BadInput("the Ray cluster has no node with CPUs to run trials on")
        return max(with_cpus, key=lambda n: n["Resources"]["CPU"])

    def describe(self) -> str:
        return f"ray, {self.parallel} builds at a time, profiles on {self.node.get('NodeManagerAddress')}"

    def submit_build(self, task: dict[str, Any]) -> cf.Future:
        return self._build.remote(task).future()

    def submit_profile(self, task: dict[str, Any]) -> cf.Future:
        return self._profile.remote(task).future()

    def close(self, cancel: bool = False) -> None:
        self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise BadInput("sweeps need Optuna: pip install 'edgesmith[sweep]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(space: SearchSpace):
    optuna = _optuna()
    spec = space.sampler
    if spec.name == "nsga2":
        population = spec.population or min(50, max(4, space.budget.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=spec.seed)
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    grid = {p.path: [_encode(v) for v in p.grid_values()] for p in space.parameters}
    return optuna.samplers.GridSampler(grid, seed=spec.seed)


def open_study(folder: Path, sweep: Sweep, *, create: bool):
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))
    name = sweep.recipe.name
    if create:
        return optuna.create_study(study_name=name, storage=storage, directions=sweep.space.directions,
                                   sampler=make_sampler(sweep.space))
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sweep.space))


def tell(study, trial, values=None, *, state=None) -> None:
    """``study.tell``, outside ``optimize``: the grid sampler calls ``study.stop()`` once every grid
    point has been visited, which raises there. The trial is recorded before that (Optuna sets the
    state in a ``finally``), and the budget ends the sweep, so that error is dropped."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


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
        except Exception as exc:  # noqa: BLE001  a worker process or Ray task died
            return _failure("crashed", exc)


# ---------------------------------------------------------------------------------------------
# Results: the front, pareto.json, the report
# ---------------------------------------------------------------------------------------------


def format_metric(metric: str, value: float) -> str:
    if metric == "size":
        return f"{value / 1e6:.2f} MB"
    if metric in LATENCY_METRICS:
        return f"{value:.2f} ms"
    if metric == "throughput":
        return f"{value:.1f}/s"
    return f"{value:.4f}"


def _trial_record(t, folder: Path) -> dict[str, Any]:
    return {"trial": t.number, "state": t.state.name, "label": t.user_attrs.get("label", f"t{t.number:04d}"),
            "params": t.user_attrs.get("params", {}), "values": list(t.values) if t.values else None,
            "measured": t.user_attrs.get("measured", {}), "run_dir": t.user_attrs.get("run_dir"),
            "artifact": t.user_attrs.get("artifact"), "profile": t.user_attrs.get("profile"),
            "failure": t.user_attrs.get("failure"), "failure_kind": t.user_attrs.get("failure_kind")}


def _feasible(record: dict[str, Any], space: SearchSpace) -> bool:
    measured = record["measured"]
    return all(c.metric in measured and c.holds(measured[c.metric]) for c in space.constraints)


def front_of(study, space: SearchSpace) -> list[Any]:
    """Optuna's Pareto front (``best_trials``: feasible, non-dominated completed trials), each
    checked again against our own constraints, by trial number."""
    trials = [t for t in study.best_trials if all(c.metric in t.user_attrs.get("measured", {}) and
                                                   c.holds(t.user_attrs["measured"][c.metric])
                                                   for c in space.constraints)]
    return sorted(trials, key=lambda t: t.number)


def summarize_study(study, sweep: Sweep, folder: Path) -> dict[str, Any]:
    """What ``pareto.json`` holds: the front (duplicates of one variant folded), every trial, counts."""
    space = sweep.space
    records = [_trial_record(t, folder) for t in study.get_trials(deepcopy=False)]
    front, seen = [], {}
    for t in front_of(study, space):
        record = _trial_record(t, folder)
        key = json.dumps(record["params"], sort_keys=True)
        if key in seen:
            seen[key]["duplicates"].append(t.number)
            continue
        record["duplicates"] = []
        seen[key] = record
        front.append(record)
    complete = [r for r in records if r["state"] == "COMPLETE"]
    return {
        "schema": 1,
        "sweep": sweep.recipe.name,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in space.objectives],
        "constraints": [c.text for c in space.constraints],
        "counts": {"complete": len(complete), "feasible": sum(_feasible(r, space) for r in complete),
                   "failed": sum(r["state"] == "FAIL" and r["failure_kind"] != "interrupted" for r in records),
                   "interrupted": sum(r["failure_kind"] == "interrupted" for r in records),
                   "running": sum(r["state"] == "RUNNING" for r in records)},
        "front": front,
        "profiles": [r["profile"] for r in front if r["profile"]],
        "trials": records,
    }


def write_pareto(folder: Path, sweep: Sweep, study) -> dict[str, Any]:
    summary = summarize_study(study, sweep, folder)
    write_json_atomic(folder / PARETO_FILE, summary)
    return summary


def profiles_of_front(path: str | Path) -> list[Path]:
    """The profile files a ``pareto.json`` lists (for ``edgesmith compare``), resolved beside it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: cannot read it as a sweep's pareto.json ({exc})") from exc
    if not isinstance(data, dict) or "front" not in data:
        raise BadInput(f"{path}: not a sweep's pareto.json (no 'front')")
    files = [path.parent / p for p in data.get("profiles", [])]
    if not files:
        raise BadInput(f"{path}: the front has no profiles (the sweep ran with profile: null); nothing to compare")
    return files


def is_pareto_file(path: str | Path) -> bool:
    path = Path(path)
    if path.name == PARETO_FILE:
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "front" in data and "objectives" in data


def _plot_axes(space: SearchSpace) -> tuple[Objective, Objective] | None:
    if len(space.objectives) < 2:
        return None
    minimise = [o for o in space.objectives if o.direction == "minimize"]
    maximise = [o for o in space.objectives if o.direction == "maximize"]
    if minimise and maximise:
        return minimise[0], maximise[0]
    return space.objectives[0], space.objectives[1]


def plot_front(summary: dict[str, Any], space: SearchSpace, path: Path) -> Path | None:
    """Every completed trial on the first two objectives (a cost on x, a quality on y when there
    are both), the front in blue, constraint violators as red crosses."""
    axes = _plot_axes(space)
    complete = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    if axes is None or not complete:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from edgesmith.plots import _save_png

    x_obj, y_obj = axes
    scale = {"size": 1e-6}
    def xy(r):
        return (r["measured"][x_obj.metric] * scale.get(x_obj.metric, 1.0),
                r["measured"][y_obj.metric] * scale.get(y_obj.metric, 1.0))

    front_ids = {r["trial"] for r in summary["front"]}
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for r in complete:
        x, y = xy(r)
        if r["trial"] in front_ids:
            ax.scatter([x], [y], color="tab:blue", zorder=3)
            ax.annotate(f"t{r['trial']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        elif not _feasible(r, space):
            ax.scatter([x], [y], color="tab:red", marker="x", zorder=2)
        else:
            ax.scatter([x], [y], color="tab:gray", alpha=0.6, zorder=2)
    points = sorted(xy(r) for r in summary["front"])
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", alpha=0.5,
                drawstyle="steps-post" if x_obj.direction != y_obj.direction else "default", label="Pareto front")
        ax.legend(loc="best")
    unit = {"size": " (MB)", **{m: " (ms)" for m in LATENCY_METRICS}}
    ax.set_xlabel(f"{x_obj.metric}{unit.get(x_obj.metric, '')} — {x_obj.direction[:3]}")
    ax.set_ylabel(f"{y_obj.metric}{unit.get(y_obj.metric, '')} — {y_obj.direction[:3]}")
    ax.set_title(f"sweep {summary['sweep']}: {len(complete)} trials, {len(summary['front'])} on the front")
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path, 100)


def _params_text(params: dict[str, Any]) -> str:
    return describe_params(params) or "(the recipe as written)"


def markdown_report(summary: dict[str, Any], space: SearchSpace, *, plot: str | None, html: str | None) -> str:
    metrics = [o.metric for o in space.objectives]
    extra = [m for m in ("cosine", "recall@10", "latency_p50", "latency_p90", "size")
             if m not in metrics and any(m in r["measured"] for r in summary["front"])]
    columns = metrics + extra
    c = summary["counts"]
    lines = [f"# Sweep {summary['sweep']}", "",
             "Objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in space.objectives) + ".  ",
             "Constraints: " + (", ".join(f"`{t}`" for t in summary["constraints"]) or "none") + ".  ",
             f"Trials: {c['complete']} completed ({c['feasible']} within the constraints), {c['failed']} failed"
             + (f", {c['interrupted']} interrupted and run again" if c["interrupted"] else "") + ".", ""]
    if plot:
        lines += [f"![Pareto front]({plot})", ""]
    lines += ["## Pareto front", "", "| trial | variant | " + " | ".join(columns) + " | run folder |",
              "|---|---|" + "---|" * len(columns) + "---|"]
    for r in summary["front"]:
        dup = f" (= {', '.join(f't{d}' for d in r['duplicates'])})" if r["duplicates"] else ""
        cells = [format_metric(m, r["measured"][m]) if m in r["measured"] else "" for m in columns]
        lines.append(f"| t{r['trial']}{dup} | {_params_text(r['params'])} | " + " | ".join(cells) + f" | {r['run_dir']} |")
    if not summary["front"]:
        lines.append("| (no completed trial within the constraints) | | " + "| " * len(columns) + "|")
    lines += ["", "## All trials", "", "| trial | state | variant | " + " | ".join(columns) + " | note |",
              "|---|---|---|" + "---|" * len(columns) + "---|"]
    front_ids = {r["trial"] for r in summary["front"]}
    for r in summary["trials"]:
        cells = [format_metric(m, r["measured"][m]) if m in r["measured"] else "" for m in columns]
        if r["state"] == "FAIL":
            note = f"{r['failure_kind']}: {r['failure']}"
        elif r["state"] == "COMPLETE":
            note = "front" if r["trial"] in front_ids else ("violates a constraint" if not _feasible(r, space) else "")
        else:
            note = r["state"].lower()
        note = note.replace("|", "\\|")
        lines.append(f"| t{r['trial']} | {r['state'].lower()} | {_params_text(r['params'])} | "
                     + " | ".join(cells) + f" | {note} |")
    if html:
        lines += ["", (f"Profiles of the front, side by side: [{html}]({html}); "
                       f"`edgesmith compare {PARETO_FILE}` prints the same comparison.")]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, sweep: Sweep, summary: dict[str, Any]) -> Path:
    """``report.md`` (front table, all trials, plot) and ``report.html`` (the front's profiles, via
    :func:`edgesmith.report.write_html`) when the front has profiles."""
    plot = None
    try:
        if plot_front(summary, sweep.space, folder / "pareto.png") is not None:
            plot = "pareto.png"
    except Exception as exc:  # noqa: BLE001  a plot is a convenience: the tables stand without it
        log.warning("no Pareto plot: %s", exc)
    html = None
    front_runs = [folder / r["run_dir"] for r in summary["front"] if r["profile"] and r["run_dir"]]
    if front_runs:
        try:
            from edgesmith.report import write_html

            write_html(front_runs, folder / "report.html", title=f"edgesmith sweep {summary['sweep']}: the Pareto front")
            html = "report.html"
        except (BadInput, OSError) as exc:
            log.warning("no HTML report: %s", exc)
    path = folder / "report.md"
    write_text_atomic(path, markdown_report(summary, sweep.space, plot=plot, html=html))
    return path


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    folder: Path
    summary: dict[str, Any]
    report: Path
    backend: str
    seconds: float
    front: list[dict[str, Any]] = field(default_factory=list)


def _new_folder(root: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / f"{name}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{stamp}-{n}"
    return candidate


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


def requeue_interrupted(study) -> list[int]:
    """Mark trials left RUNNING by a dead sweep as failed ("interrupted") and enqueue their params."""
    optuna = _optuna()
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "failure_kind", "interrupted")
        study._storage.set_trial_user_attr(t._trial_id, "failure", "the sweep stopped while it ran; run again")
        tell(study, t.number, state=optuna.trial.TrialState.FAIL)
        params = _grid_point(study, t) or t.params  # partial params (killed mid-ask): the rest is sampled anew
        if params:
            study.enqueue_trial(params, skip_if_exists=False)
        numbers.append(t.number)
    if numbers:
        log.info("trials %s were interrupted; they run again", ", ".join(map(str, numbers)))
    return numbers


def _grid_point(study, trial) -> dict[str, Any] | None:
    """The grid sampler's point of a trial (its ``grid_id`` in the sampler's grid, which the seed
    shuffles: the sampler rebuilt with the same seed has the same order). A trial killed before
    all its values were suggested still holds its grid id, and the grid counts that point as
    visited, so it must be enqueued whole."""
    optuna = _optuna()
    sampler = study.sampler
    grid_id = trial.system_attrs.get("grid_id")
    if grid_id is None or not isinstance(sampler, optuna.samplers.GridSampler):
        return None
    return dict(zip(sampler._param_names, sampler._all_grids[int(grid_id)], strict=True))


def claim_folder(folder: Path) -> None:
    """Record this process as the sweep's driver. A driver still alive elsewhere is refused; the
    journal's lock file left by a killed driver is removed (it would hold the study for 30 s)."""
    from edgesmith.storage import _pid_alive

    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    pid = meta.get("pid")
    if pid and pid != os.getpid() and _pid_alive(int(pid)):
        raise BadInput(f"{folder}: the sweep is running in process {pid}; wait for it or stop it first")
    lock = folder / (STUDY_FILE + ".lock")
    if lock.is_symlink() or lock.exists():
        lock.unlink()
        log.info("removed the journal lock left by a stopped sweep")
    write_json_atomic(meta_path, {**meta, "pid": os.getpid()})


def _cache_for(cache_dir: str | Path | None, folder: Path, ray: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).resolve()
    if ray is not None:
        return folder / "cache"  # the sweep folder must be shared by all nodes anyway
    from edgesmith.cache import default_cache_dir

    return default_cache_dir().resolve()


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


__all__ = ["Constraint", "Objective", "Parameter", "SearchSpace", "Sweep", "SweepResult", "front_of", "load_sweep",
           "parse_constraint", "parse_search", "profiles_of_front", "resume_sweep", "run_sweep", "suggest",
           "sweep_from_dict", "variant"]

