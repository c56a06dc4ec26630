"""Early-exit policies, their calibration, and ``policy.json``.

Every policy reduces to one rule: at exit ``i`` a sample gets a *score* that depends only on the
outputs of exits ``0..i`` (so a controller can decide segment by segment), and the sample leaves at
the first exit whose score reaches the threshold. The last exit always takes every sample left.

- ``entropy`` (DeeBERT): score = -H(softmax(logits)) / log(classes); exits when the normalised
  entropy is at most ``threshold``.
- ``maxprob``: score = the largest class probability; exits when it is at least ``threshold``.
- ``patience`` (PABEE): score = how many consecutive exits before this one predicted the same
  class; exits when that count reaches ``threshold`` (an integer).
- ``agreement`` (encoders): score = cosine between this exit's and the previous exit's mean-pooled
  embedding; exits when it is at least ``threshold``.

Calibration picks the one threshold (shared by all exits) that minimises the expected number of
layers executed on validation data while the quality budget still holds, and records the expected
exit histogram and the quality reached. Everything here is numpy: the calibration, the reference
simulation and both runtime controllers call the same :class:`ExitPolicy`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BadInput

POLICIES = ("entropy", "maxprob", "patience", "agreement")
CLASSIFIER_POLICIES = ("entropy", "maxprob", "patience")
ENCODER_POLICIES = ("agreement",)
BUDGET_METRICS = {"accuracy": "sequence-classification", "cosine": "feature-extraction"}
POLICY_FILE = "policy.json"
#: candidate thresholds tried by calibration (quantiles of the observed scores)
CANDIDATES = 400


def default_policy(task: str) -> str:
    return "entropy" if task == "sequence-classification" else "agreement"


def check_policy(name: str, task: str) -> None:
    if name not in POLICIES:
        raise BadInput(f"unknown exit policy '{name}'; use one of: {', '.join(POLICIES)}")
    allowed = CLASSIFIER_POLICIES if task == "sequence-classification" else ENCODER_POLICIES
    if name not in allowed:
        raise BadInput(f"exit policy '{name}' does not fit a {task} model; use one of: {', '.join(allowed)}")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean of token vectors, L2-normalised (a sentence embedding)."""
    weights = mask.astype(np.float64)[..., None]
    rows = (hidden.astype(np.float64) * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return rows / np.clip(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12, None)


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


@dataclass
class ExitState:
    """What a policy remembers per sample between exits (indexed by the sample's row in the batch)."""

    size: int
    previous: np.ndarray | None = None
    run: np.ndarray | None = None


@dataclass
class ExitPolicy:
    """A policy with its threshold; ``exit_layers[i]`` = layers executed when leaving at exit ``i``."""

    name: str
    threshold: float
    exit_layers: list[int]
    task: str = "sequence-classification"
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_policy(self.name, self.task)
        if not self.exit_layers or sorted(set(self.exit_layers)) != list(self.exit_layers):
            raise BadInput(f"exit layers must be strictly increasing, got {self.exit_layers}")

    @property
    def exits(self) -> int:
        return len(self.exit_layers)

    # -- scores ---------------------------------------------------------------------------
    def score(self, index: int, output: np.ndarray, mask: np.ndarray, state: ExitState,
              rows: np.ndarray) -> np.ndarray:
        """Scores of ``rows`` (positions in the whole batch) at exit ``index``; updates ``state``."""
        n = len(rows)
        if self.name == "entropy":
            p = softmax(output)
            h = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1) / math.log(max(2, p.shape[-1]))
            return -h
        if self.name == "maxprob":
            return softmax(output).max(axis=-1)
        if self.name == "patience":
            pred = output.argmax(axis=-1)
            if state.previous is None:
                state.previous = np.full(state.size, -1, dtype=np.int64)
                state.run = np.zeros(state.size, dtype=np.int64)
            same = (state.previous[rows] == pred) if index > 0 else np.zeros(n, dtype=bool)
            run = np.where(same, state.run[rows] + 1, 0)
            state.previous[rows] = pred
            state.run[rows] = run
            return run.astype(np.float64)
        # agreement: cosine of consecutive pooled embeddings
        emb = pooled(output, mask)
        if state.previous is None:
            state.previous = np.zeros((state.size, emb.shape[-1]), dtype=np.float64)
        score = (state.previous[rows] * emb).sum(axis=-1) if index > 0 else np.full(n, -np.inf)
        state.previous[rows] = emb
        return score

    def natural_to_score(self, threshold: float) -> float:
        """The policy's threshold in its own units as a score threshold (exit when score >= it)."""
        return -threshold if self.name == "entropy" else threshold

    def decide(self, index: int, output: np.ndarray, mask: np.ndarray, state: ExitState,
               rows: np.ndarray) -> np.ndarray:
        """True for the rows that leave at exit ``index`` (all of them at the last exit)."""
        score = self.score(index, output, mask, state, rows)
        if index == self.exits - 1:
            return np.ones(len(rows), dtype=bool)
        return score >= self.natural_to_score(self.threshold)

    # -- policy.json ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = POLICY_FILE) -> ExitPolicy:
        try:
            return cls(name=data["name"], threshold=float(data["threshold"]), exit_layers=list(data["exit_layers"]),
                       task=data.get("task", "sequence-classification"), calibration=dict(data.get("calibration") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{source}: not a valid exit policy ({exc}); re-create the early-exit model") from exc

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        Path(path).write_text(json.dumps({**self.to_json(), **(extra or {})}, indent=2))


# ---------------------------------------------------------------------------------------------
# The unsegmented reference: every exit computed, then the policy applied
# ---------------------------------------------------------------------------------------------


def score_matrix(policy: ExitPolicy, outputs: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """(samples, exits) scores, computed exit by exit exactly as a controller does."""
    n = outputs[0].shape[0]
    rows = np.arange(n)
    state = ExitState(n)
    scores = np.empty((n, len(outputs)), dtype=np.float64)
    for i, out in enumerate(outputs):
        scores[:, i] = policy.score(i, out, mask, state, rows)
    return scores


def exit_index(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """First exit whose score reaches the threshold (the last exit when none does)."""
    hit = scores[:, :-1] >= score_threshold
    hit = np.concatenate([hit, np.ones((scores.shape[0], 1), dtype=bool)], axis=1)
    return hit.argmax(axis=1)


def simulate(policy: ExitPolicy, outputs: list[np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the unsegmented model gives under ``policy``: (output of each sample's exit, exit index)."""
    if len(outputs) != policy.exits:
        raise BadInput(f"{len(outputs)} exit outputs for a policy with {policy.exits} exits")
    chosen = exit_index(score_matrix(policy, outputs, mask), policy.natural_to_score(policy.threshold))
    stacked = np.stack(outputs, axis=0)
    return stacked[chosen, np.arange(len(chosen))], chosen


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """``accuracy`` = the largest accuracy drop allowed (vs the full model; against the labels when
    there are labels, else 1 - agreement with the full model's predictions); ``cosine`` = the lowest
    mean cosine of the embeddings to the full model's."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str | dict[str, float]) -> Budget:
        if isinstance(text, dict):
            if len(text) != 1:
                raise BadInput(f"budget: give one metric, e.g. accuracy=0.01 or cosine=0.98 (got {text})")
            metric, value = next(iter(text.items()))
        else:
            metric, sep, value = str(text).partition("=")
            if not sep:
                raise BadInput(f"budget '{text}': write METRIC=VALUE, e.g. accuracy=0.01 or cosine=0.98")
        metric = metric.strip()
        if metric not in BUDGET_METRICS:
            raise BadInput(f"budget metric '{metric}' is not one of: {', '.join(BUDGET_METRICS)} "
                           "(accuracy=MAX_DROP for classifiers, cosine=MIN_COSINE for encoders)")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"budget {metric}={value}: '{value}' is not a number") from exc
        if not math.isfinite(number) or not 0.0 <= number <= 1.0:
            raise BadInput(f"budget {metric}={value}: give a number between 0 and 1")
        return cls(metric, number)

    def check_task(self, task: str) -> None:
        if BUDGET_METRICS[self.metric] != task:
            fit = [m for m, t in BUDGET_METRICS.items() if t == task]
            raise BadInput(f"budget '{self.metric}' does not fit a {task} model; use {', '.join(fit)}")

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def quality(task: str, chosen_outputs: np.ndarray, final: np.ndarray, mask: np.ndarray,
            labels: np.ndarray | None) -> dict[str, float]:
    """Quality of the early-exit outputs against the full model's (and the labels)."""
    if task == "sequence-classification":
        pred, full = chosen_outputs.argmax(-1), final.argmax(-1)
        out = {"agreement": float((pred == full).mean())}
        if labels is not None:
            out["accuracy"] = float((pred == labels).mean())
            out["accuracy_full"] = float((full == labels).mean())
            out["accuracy_drop"] = out["accuracy_full"] - out["accuracy"]
        else:
            out["accuracy_drop"] = 1.0 - out["agreement"]
        return out
    cos = (pooled(chosen_outputs, mask) * pooled(final, mask)).sum(-1)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def meets(budget: Budget, q: dict[str, float]) -> bool:
    if budget.metric == "accuracy":
        return q["accuracy_drop"] <= budget.value + 1e-12
    return q["cosine"] >= budget.value - 1e-12


def expected(policy: ExitPolicy, chosen: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(chosen, minlength=policy.exits)
    layers = np.asarray(policy.exit_layers)[chosen]
    total = policy.exit_layers[-1]
    return {"histogram": {str(policy.exit_layers[i]): int(c) for i, c in enumerate(counts)},
            "expected_layers": float(layers.mean()),
            "layer_fraction": float(layers.mean() / total)}


def evaluate_policy(policy: ExitPolicy, outputs: list[np.ndarray], mask: np.ndarray,
                    labels: np.ndarray | None = None) -> dict[str, Any]:
    """Quality and exit histogram of ``policy`` on precomputed exit outputs."""
    chosen_outputs, chosen = simulate(policy, outputs, mask)
    return {**quality(policy.task, chosen_outputs, outputs[-1], mask, labels), **expected(policy, chosen)}


def candidate_thresholds(policy: ExitPolicy, scores: np.ndarray) -> list[float]:
    """Score thresholds worth trying: quantiles of the finite early-exit scores, plus 'never'."""
    if policy.name == "patience":
        return [float(k) for k in range(1, policy.exits)] + [math.inf]
    finite = scores[:, :-1][np.isfinite(scores[:, :-1])]
    if finite.size == 0:
        return [math.inf]
    qs = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, CANDIDATES)))
    return [float(q) for q in qs] + [math.inf]


def score_to_natural(policy: ExitPolicy, score_threshold: float) -> float:
    return -score_threshold if policy.name == "entropy" else score_threshold


def calibrate(name: str, task: str, exit_layers: list[int], outputs: list[np.ndarray], mask: np.ndarray,
              budget: Budget, labels: np.ndarray | None = None) -> ExitPolicy:
    """The policy whose threshold minimises expected layers while ``budget`` holds on these outputs.

    ``outputs[i]`` are exit ``i``'s outputs for every validation sample (the last one: the full
    model's). The 'never exit early' threshold always meets the budget, so a policy is always found.
    """
    budget.check_task(task)
    if labels is not None and len(labels) != outputs[0].shape[0]:
        raise BadInput(f"{outputs[0].shape[0]} validation texts but {len(labels)} labels")
    probe = ExitPolicy(name, math.inf, list(exit_layers), task)
    scores = score_matrix(probe, outputs, mask)
    stacked = np.stack(outputs, axis=0)
    best: tuple[float, float, dict] | None = None
    for t in candidate_thresholds(probe, scores):
        chosen = exit_index(scores, t)
        q = quality(task, stacked[chosen, np.arange(len(chosen))], outputs[-1], mask, labels)
        if not meets(budget, q):
            continue
        layers = float(np.asarray(exit_layers)[chosen].mean())
        # fewest layers; among equals the most conservative threshold
        if best is None or layers < best[0] - 1e-12 or (abs(layers - best[0]) <= 1e-12 and t > best[1]):
            best = (layers, t, q)
    assert best is not None  # t = inf (never exit early) reproduces the full model
    layers, t, q = best
    if policy_threshold_is_never(t):
        t_natural = math.inf if name != "entropy" else -math.inf
    else:
        t_natural = score_to_natural(probe, t)
    policy = ExitPolicy(name, t_natural, list(exit_layers), task)
    chosen = exit_index(scores, t)
    policy.calibration = {"budget": str(budget), "samples": len(chosen), **q, **expected(policy, chosen),
                          "labels": labels is not None}
    return policy


def policy_threshold_is_never(score_threshold: float) -> bool:
    return math.isinf(score_threshold)
