"""What the training loop remembers of its evaluations: the history (step, metric, mean training
loss since the last one), the best step and metric, the patience count, the first metric, and the
wall-clock timeline; saved into and restored from the last checkpoint for an exact resume."""

from __future__ import annotations

import math
import time
from typing import Any

import torch


class Evaluations:
    """The evaluations so far; ``history`` is what a resumed run reproduces exactly, ``timeline``
    (this process's wall seconds at each evaluation, the recovery curve) is kept apart from it."""

    def __init__(self, min_delta: float):
        self.min_delta = min_delta
        self.losses: list[float] = []  # training losses since the last evaluation
        self.history: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.best_step, self.best_metric, self.bad_evals = 0, -math.inf, 0
        self.first_metric: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.clock_start = time.perf_counter()

    def resume(self, saved: dict[str, Any]) -> int:
        """Take the state a checkpoint saved (see :meth:`state`); returns the step it was taken at."""
        self.history = list(saved["history"])
        self.best_step, self.best_metric = int(saved["best_step"]), float(saved["best_metric"])
        self.bad_evals, self.first_metric = int(saved["bad_evals"]), float(saved["first_metric"])
        self.losses.extend(saved.get("pending_losses", []))
        return int(saved["step"])

    def state(self, step: int) -> dict[str, Any]:
        return {"step": step, "history": self.history, "best_step": self.best_step, "best_metric": self.best_metric,
                "bad_evals": self.bad_evals, "first_metric": self.first_metric, "pending_losses": self.losses}

    def record(self, step: int, metric: float) -> bool:
        """Add one evaluation; returns whether it is the best so far."""
        entry: dict[str, Any] = {"step": step, "metric": metric}
        self.timeline.append({"step": step, "metric": metric,
                              "seconds": round(time.perf_counter() - self.clock_start, 2)})
        if self.losses:
            entry["loss"] = sum(self.losses) / len(self.losses)  # mean training loss since the last evaluation
            self.losses.clear()
        self.history.append(entry)
        if self.first_metric is None:
            self.first_metric = metric
        # patience counts evaluations that improve on the best by less than min_delta
        self.bad_evals = 0 if metric > self.best_metric + self.min_delta else self.bad_evals + 1
        if metric > self.best_metric:
            self.best_step, self.best_metric = step, metric
            return True
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.bad_evals >= patience
