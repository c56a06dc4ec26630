"""The distill pass's options (teacher, student, losses, data and the training settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgesmith.passes import PassConfig
from edgesmith.training import TrainSettings

LOSSES = ("cosine", "kl", "hidden_mse", "attention", "task")


class DistillConfig(PassConfig):
    """Teacher, student, losses, data and the training settings of a distillation."""

    teacher: str | None = Field(None, description="model folder; default: the run's source model")
    keep_layers: list[int] | None = Field(None, description="student = the teacher with only these layers (0-based)")
    every_k: int | None = Field(None, description="student = the teacher with every k-th layer (k-1, 2k-1, …)")
    losses: dict[Literal["cosine", "kl", "hidden_mse", "attention", "task"], float] | None = Field(
        None, description="loss weights; default: cosine for encoders, kl (+ task with labels) for classifiers; "
                          "attention: KL between the teacher's and the student's attention maps of the mapped "
                          "layers (eager attention while training)")
    temperature: float = Field(2.0, gt=0)
    layer_map: dict[int, int] | None = Field(None, description="hidden_mse and attention: student layer → teacher "
                                                               "layer (0-based)")
    project: bool | None = Field(None, description="learn linear projections where widths differ "
                                                   "(default: only for a narrower student)")
    data: str | None = Field(None, description="training texts: a local file or builtin:wordnet; default: the run's data")
    text_field: str = "text"
    label_field: str | None = None
    limit: int | None = Field(None, gt=0, description="use at most this many rows of data")
    offset: int = Field(0, ge=0, description="skip this many rows of `data` first (keep training text apart "
                                             "from the recipe's evaluation rows)")
    eval_texts: int = Field(256, ge=2, description="rows held out for validation (at most a fifth of the data)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement")
    min_delta: float = Field(1e-4, ge=0, description="smallest validation gain that counts for patience")
    checkpoint_every: int | None = Field(100, ge=1, description="None: no checkpoints")
    checkpoint_dir: str | None = Field(None, description="default: ctx.extras['checkpoint_dir'] or the edgesmith cache")
    keep_checkpoints: bool = False
    max_length: int = Field(128, ge=2)

    @field_validator("losses")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one loss, e.g. {cosine: 1.0}")
            for name, weight in value.items():
                if not weight > 0:
                    raise ValueError(f"loss '{name}' needs a weight above 0 (got {weight})")
        return value

    @model_validator(mode="after")
    def _one_student(self) -> DistillConfig:
        if self.keep_layers is not None and self.every_k is not None:
            raise ValueError("give keep_layers or every_k, not both")
        if self.every_k is not None and self.every_k < 1:
            raise ValueError("every_k must be at least 1 (2 keeps every other layer)")
        if self.keep_layers is not None and (not self.keep_layers or len(set(self.keep_layers)) != len(self.keep_layers)):
            raise ValueError("keep_layers must list distinct layer indices, at least one")
        return self

    def settings(self) -> TrainSettings:
        return TrainSettings(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio, schedule=self.schedule, grad_clip=self.grad_clip,
            grad_accum=self.grad_accum, precision=self.precision, seed=self.seed, eval_every=self.eval_every,
            patience=self.patience, min_delta=self.min_delta, checkpoint_every=self.checkpoint_every, max_length=self.max_length)
