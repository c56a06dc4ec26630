"""How to train (:class:`TrainSettings`) and what a training run returns (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from edgesmith.errors import BadInput


@dataclass
class TrainSettings:
    """How to train. ``steps`` counts optimizer steps; a step consumes ``grad_accum`` batches."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    eval_every: int = 50
    patience: int | None = None
    min_delta: float = 1e-4
    checkpoint_every: int | None = None
    max_length: int = 128
    bucket_batches: int = 50

    def check(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "max_length": self.max_length,
                    "bucket_batches": self.bucket_batches}
        for name, value in positive.items():
            if value < 1:
                raise BadInput(f"training: {name} must be at least 1 (got {value})")
        if self.lr <= 0:
            raise BadInput(f"training: lr must be above 0 (got {self.lr})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise BadInput(f"training: warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.patience is not None and self.patience < 1:
            raise BadInput(f"training: patience must be at least 1 evaluation (got {self.patience})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise BadInput(f"training: checkpoint_every must be at least 1 (got {self.checkpoint_every})")


@dataclass
class TrainResult:
    steps_run: int
    best_step: int
    best_metric: float
    first_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    #: {step, metric, seconds}: wall seconds since this process started training, at each evaluation
    timeline: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    stopped_early: bool = False
    resumed_from: int | None = None
    precision: str = "fp32"
    world_size: int = 1


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)
