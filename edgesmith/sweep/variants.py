"""Variants: the values a trial asks the sampler for, the recipe they make, and their short labels."""

from __future__ import annotations

import json
from typing import Any

from edgesmith.recipe import Recipe
from edgesmith.sweep.space import ENABLED, WHOLE, SearchSpace, address


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
