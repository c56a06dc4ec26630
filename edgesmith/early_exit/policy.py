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

Calibration picks the thresholds that minimise the expected number of layers executed on
validation data while the quality budget still holds, and records the expected exit histogram and
the quality reached. ``per-exit`` calibration (the default) first finds the best threshold shared
by all exits, then refines one threshold per exit by coordinate descent (each exit in turn takes
the value that saves most layers with the budget still met, until no exit can improve): early
exits usually deserve a stricter threshold than late ones, and a shared threshold cannot say so.
``shared`` stops after the first stage. Everything here is numpy: the calibration, the reference
simulation and both runtime controllers call the same :class:`ExitPolicy`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BadInput, GateFailed
from edgesmith.pooling import l2_normalize, mean_pool

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
    return l2_normalize(mean_pool(hidden, mask))


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
    #: one threshold per early exit (all exits but the last); None: ``threshold`` at every exit
    thresholds: list[float] | None = None

    def __post_init__(self) -> None:
        check_policy(self.name, self.task)
        if not self.exit_layers or sorted(set(self.exit_layers)) != list(self.exit_layers):
            raise BadInput(f"exit layers must be strictly increasing, got {self.exit_layers}")
        if self.thresholds is not None:
            self.thresholds = [float(t) for t in self.thresholds]
            if len(self.thresholds) != len(self.exit_layers) - 1:
                raise BadInput(f"{len(self.thresholds)} per-exit thresholds for {len(self.exit_layers) - 1} early "
                               "exits; re-create the early-exit model")

    def threshold_at(self, index: int) -> float:
        """The threshold (in the policy's own units) of early exit ``index``."""
        return self.thresholds[index] if self.thresholds is not None else self.threshold

    def score_thresholds(self) -> np.ndarray:
        """Score thresholds of the early exits (a sample leaves exit i when its score >= entry i)."""
        return np.asarray([self.natural_to_score(self.threshold_at(i)) for i in range(self.exits - 1)],
                          dtype=np.float64)

    def describe(self) -> str:
        """The thresholds as people read them: one number, or one per exit layer."""
        if self.thresholds is None:
            return f"{self.name} threshold {self.threshold:.4g}"
        pairs = ", ".join(f"{layer}: {t:.4g}" for layer, t in zip(self.exit_layers, self.thresholds))
        return f"{self.name} thresholds per exit layer {{{pairs}}}"

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
        return score >= self.natural_to_score(self.threshold_at(index))

    # -- policy.json ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = POLICY_FILE) -> ExitPolicy:
        try:
            per_exit = data.get("thresholds")
            return cls(name=data["name"], threshold=float(data["threshold"]), exit_layers=list(data["exit_layers"]),
                       task=data.get("task", "sequence-classification"), calibration=dict(data.get("calibration") or {}),
                       thresholds=None if per_exit is None else [float(t) for t in per_exit])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{source}: not a valid exit policy ({exc}); re-create the early-exit model") from exc
        except BadInput as exc:  # an unknown policy name (a newer edgesmith's) or one that does not fit the task
            raise BadInput(f"{source}: {exc}") from exc

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


def exit_index(scores: np.ndarray, score_threshold: float | np.ndarray) -> np.ndarray:
    """First exit whose score reaches its threshold (the last exit when none does); the threshold
    is one number for every exit or one per early exit."""
    hit = scores[:, :-1] >= score_threshold
    hit = np.concatenate([hit, np.ones((scores.shape[0], 1), dtype=bool)], axis=1)
    return hit.argmax(axis=1)


def simulate(policy: ExitPolicy, outputs: list[np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the unsegmented model gives under ``policy``: (output of each sample's exit, exit index)."""
    if len(outputs) != policy.exits:
        raise BadInput(f"{len(outputs)} exit outputs for a policy with {policy.exits} exits")
    chosen = exit_index(score_matrix(policy, outputs, mask), policy.score_thresholds())
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


class QualityTable:
    """Per sample and exit, what leaving there contributes to the budget's metric, so that any
    assignment of samples to exits is judged by one gather and a mean.

    Accuracy budgets: 1 where the exit's prediction is right (the label, or the full model's
    prediction when there are no labels); the floor is the full model's accuracy minus the allowed
    drop. Cosine budgets: the cosine of the exit's embedding to the full model's; the floor is the
    budget itself. ``reference`` is the full model's output (default: the last exit's), which is
    what a jointly trained network is judged against.
    """

    def __init__(self, task: str, outputs: list[np.ndarray], mask: np.ndarray, budget: Budget,
                 labels: np.ndarray | None = None, reference: np.ndarray | None = None):
        self.task, self.budget, self.labels, self.mask = task, budget, labels, mask
        self.outputs = outputs
        self.reference = outputs[-1] if reference is None else reference
        n = outputs[0].shape[0]
        if self.reference.shape[0] != n:
            raise BadInput(f"{self.reference.shape[0]} reference outputs for {n} validation samples")
        if task == "sequence-classification":
            target = labels if labels is not None else self.reference.argmax(-1)
            self.values = np.stack([o.argmax(-1) == target for o in outputs], axis=1).astype(np.float64)
            self.full = float((self.reference.argmax(-1) == target).mean())
            self.floor = self.full - budget.value
        else:
            ref = pooled(self.reference, mask)
            self.values = np.stack([(pooled(o, mask) * ref).sum(-1) for o in outputs], axis=1)
            self.full = None
            self.floor = budget.value
        self._rows = np.arange(n)

    def mean(self, chosen: np.ndarray) -> float:
        return float(self.values[self._rows, chosen].mean())

    def holds(self, chosen: np.ndarray) -> bool:
        if self.full is not None:  # the drop exactly as it is reported
            return self.full - self.mean(chosen) <= self.budget.value + 1e-12
        return self.mean(chosen) >= self.floor - 1e-12

    def report(self, chosen: np.ndarray) -> dict[str, float]:
        stacked = np.stack(self.outputs, axis=0)
        return quality(self.task, stacked[chosen, self._rows], self.reference, self.mask, self.labels)


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


THRESHOLD_MODES = ("per-exit", "shared")
#: coordinate-descent rounds of per-exit calibration (it stops earlier when no exit improves)
MAX_ROUNDS = 8


def candidate_thresholds(policy: ExitPolicy, scores: np.ndarray, column: int | None = None) -> list[float]:
    """Score thresholds worth trying: quantiles of the finite early-exit scores (of one exit's
    column, or of all early exits), plus 'never'."""
    if policy.name == "patience":
        return [float(k) for k in range(1, policy.exits)] + [math.inf]
    block = scores[:, :-1] if column is None else scores[:, column]
    finite = block[np.isfinite(block)]
    if finite.size == 0:
        return [math.inf]
    qs = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, CANDIDATES)))
    return [float(q) for q in qs] + [math.inf]


def score_to_natural(policy: ExitPolicy, score_threshold: float) -> float:
    if math.isinf(score_threshold):  # 'never exit early' in the policy's own units
        return -math.inf if policy.name == "entropy" else math.inf
    return -score_threshold if policy.name == "entropy" else score_threshold


def _better(layers: float, q: float, t: float, best: tuple[float, float, float] | None) -> bool:
    """Fewest layers; among equals the higher quality, then the more conservative threshold."""
    if best is None or layers < best[0] - 1e-12:
        return True
    if abs(layers - best[0]) > 1e-12:
        return False
    return q > best[1] + 1e-12 or (abs(q - best[1]) <= 1e-12 and t > best[2])


def calibrate(name: str, task: str, exit_layers: list[int], outputs: list[np.ndarray], mask: np.ndarray,
              budget: Budget, labels: np.ndarray | None = None, *, thresholds: str = "per-exit",
              reference: np.ndarray | None = None) -> ExitPolicy:
    """The policy whose thresholds minimise expected layers while ``budget`` holds on these outputs.

    ``outputs[i]`` are exit ``i``'s outputs for every validation sample (the last one: the full
    model's). ``thresholds``: ``shared`` (one threshold for every exit) or ``per-exit`` (the shared
    one, then refined exit by exit). ``reference``: the full model's output when it is not the last
    exit's (a jointly trained network). 'Never exit early' meets the budget whenever the last exit
    does, so a policy is always found for a frozen backbone.
    """
    budget.check_task(task)
    if thresholds not in THRESHOLD_MODES:
        raise BadInput(f"thresholds '{thresholds}': use one of {', '.join(THRESHOLD_MODES)}")
    if labels is not None and len(labels) != outputs[0].shape[0]:
        raise BadInput(f"{outputs[0].shape[0]} validation texts but {len(labels)} labels")
    probe = ExitPolicy(name, math.inf, list(exit_layers), task)
    scores = score_matrix(probe, outputs, mask)
    table = QualityTable(task, outputs, mask, budget, labels, reference)
    depth = np.asarray(exit_layers, dtype=np.float64)

    def judge(t: float | np.ndarray) -> tuple[np.ndarray, float, float] | None:
        chosen = exit_index(scores, t)
        if not table.holds(chosen):
            return None
        return chosen, float(depth[chosen].mean()), table.mean(chosen)

    best: tuple[float, float, float] | None = None
    for t in candidate_thresholds(probe, scores):
        judged = judge(t)
        if judged is not None and _better(judged[1], judged[2], t, best):
            best = (judged[1], judged[2], t)
    if best is None:
        raise GateFailed(f"budget {budget}: even the full network misses it on the validation data "
                         f"({table.mean(np.full(len(scores), len(exit_layers) - 1)):.4f} against a floor of "
                         f"{table.floor:.4f}); loosen the budget or train the exits jointly for longer")
    shared = best[2]
    vector = np.full(len(exit_layers) - 1, shared, dtype=np.float64)
    rounds = 0
    if thresholds == "per-exit" and len(exit_layers) > 2:
        current = (best[0], best[1])
        columns = [candidate_thresholds(probe, scores, i) for i in range(len(exit_layers) - 1)]
        for rounds in range(1, MAX_ROUNDS + 1):
            improved = False
            for i, cands in enumerate(columns):
                local = (current[0], current[1], vector[i])
                for t in cands:
                    trial = vector.copy()
                    trial[i] = t
                    judged = judge(trial)
                    if judged is not None and _better(judged[1], judged[2], t, local):
                        local = (judged[1], judged[2], t)
                if local[0] < current[0] - 1e-12:
                    improved = True
                if local[2] != vector[i]:
                    vector[i] = local[2]
                    current = (local[0], local[1])
            if not improved:
                break
    chosen = exit_index(scores, vector)
    policy = ExitPolicy(name, score_to_natural(probe, shared), list(exit_layers), task,
                        thresholds=[score_to_natural(probe, t) for t in vector] if thresholds == "per-exit" else None)
    policy.calibration = {"budget": str(budget), "samples": len(chosen), "thresholds": thresholds,
                          **table.report(chosen), **expected(policy, chosen), "labels": labels is not None}
    if thresholds == "per-exit":
        shared_chosen = exit_index(scores, shared)
        policy.calibration["shared_threshold_layers"] = float(depth[shared_chosen].mean())
        policy.calibration["rounds"] = rounds
    return policy
