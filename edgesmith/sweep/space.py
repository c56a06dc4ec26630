"""The search space of a sweep: the ``search:`` block (parameters, budget, sampler) checked against
its recipe, and the reading of a sweep recipe from YAML."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from edgesmith.errors import BadInput
from edgesmith.recipe import Recipe
from edgesmith.schema import StrictModel, describe_validation_error, model_at, read_yaml
from edgesmith.sweep.objectives import (
    LATENCY_METRICS,
    Constraint,
    Objective,
    _parse_objectives,
    parse_constraint,
)

ENABLED = "enabled"  # steps.<id>.enabled: the pseudo-option that switches a step on or off
WHOLE = "*"  # steps.<id>: the parameter chooses among whole option sets of the step

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|min)?\s*$")


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


_Strict = StrictModel


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
        raise ValueError(f"a duration is seconds or a string like '30m', not {value!r}")
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


def parse_search(raw: Any, recipe: Recipe, *, where: str = "search") -> SearchSpace:
    """Check a ``search:`` block against the recipe: steps, option names and values, metrics."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: give a mapping with parameters, objectives, constraints, budget")
    try:
        spec = SearchSpec(**raw)
    except ValidationError as exc:
        raise BadInput(describe_validation_error(exc, where, model_at(SearchSpec, exc))) from exc
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
    from edgesmith.passes import get_pass, make_config

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
    data = read_yaml(path, f"sweep recipe {path} not found")
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
