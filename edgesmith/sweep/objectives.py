"""Objectives and constraints of a sweep: the metrics it may name, their units, and the parsing of
``objectives:`` (``{cosine: max, size: min}``) and ``constraints:`` (``'latency_p90 <= 10ms'``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgesmith.errors import BadInput

LATENCY_METRICS = {"latency_p50": "p50", "latency_p90": "p90", "latency_p99": "p99", "latency_mean": "mean",
                   "latency_min": "min", "latency_max": "max"}
MEASURED_METRICS = {"size", "throughput", *LATENCY_METRICS}
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "maximise": "maximize",
              "min": "minimize", "minimize": "minimize", "minimise": "minimize"}
TIME_UNITS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3}
SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
#: a metric name: cosine, recall@10, latency_p90, task.mmlu-mini (decoders' task accuracy)
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w@.-]*)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*$")


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
