"""Recipes: a short, readable list of named steps, validated before anything runs.

    name: minilm-cpu
    model: minilm
    data: {path: builtin:wordnet, limit: 512}
    steps:
      - prune: {heads: 0.25, ffn: 0.25}
      - export: {}
      - quantize: {mode: dynamic}
    gates: {cosine: 0.05}
    profile: {artifacts: [source, export, quantize], batch: 1, seq: 128}

Unknown keys are refused with the key's name and the allowed ones; a step is ``{pass_name: options}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from edgesmith.errors import BadInput
from edgesmith.schema import StrictModel, describe_validation_error, model_at, read_yaml

SOURCE_ID = "source"


Strict = StrictModel


class DataSpec(Strict):
    """Local texts (and labels) for evaluation, calibration and training; nothing is downloaded."""

    path: str = "builtin:wordnet"
    text_field: str = "text"
    label_field: str | None = None
    limit: int = Field(512, gt=0, description="rows used for evaluation")
    offset: int = Field(0, ge=0)


class Step(Strict):
    id: str
    pass_name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ProfileTarget(Strict):
    artifact: str
    runtime: str | None = None
    provider: str = "cpu"


class ProfileSpec(Strict):
    artifacts: list[str | ProfileTarget] | None = Field(
        None, description="ids to profile (source or a step id); default: the source and every step's output")
    batch: int | list[int] = Field(1, description=(
        "batch size; decoders may give a list ([1, 2, 4, 8]): a profile per size, static batches of mixed-length "
        "prompts around the first prompt_tokens length"))
    seq: int = Field(128, gt=0)
    warmup: int = Field(5, ge=0)
    iterations: int = Field(50, gt=0)
    time_budget_s: float | None = Field(15.0, gt=0)
    threads: int | None = Field(None, gt=0)
    target: str = "cpu-local"
    prompt_tokens: list[int] = Field(default_factory=lambda: [128, 512], min_length=1, description=(
        "decoders: prompt lengths timed for the time to first token; decode follows the first"))
    new_tokens: int = Field(128, ge=2, description="decoders: tokens generated greedily (EOS ignored) per round")
    rounds: int = Field(3, gt=0, description="decoders: timed generation rounds (after one warm-up round)")

    @field_validator("batch")
    @classmethod
    def _positive_batches(cls, value: int | list[int]) -> int | list[int]:
        sizes = value if isinstance(value, list) else [value]
        if any(b < 1 for b in sizes):
            raise ValueError(f"Input should be greater than 0 (got {value})")
        if not sizes or len(set(sizes)) != len(sizes):
            raise ValueError(f"batch sizes must be listed once each, got {value}")
        return value

    @field_validator("prompt_tokens")
    @classmethod
    def _positive_lengths(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise ValueError(f"prompt lengths must be positive and listed once each, got {value}")
        return value

    def targets(self) -> list[ProfileTarget]:
        return [a if isinstance(a, ProfileTarget) else ProfileTarget(artifact=a) for a in (self.artifacts or [])]


class EvaluateSpec(Strict):
    enabled: bool = True
    k: int = Field(10, gt=0, description="neighbours for recall@k")
    batch_size: int = Field(32, gt=0)


class TasksSpec(Strict):
    """Decoders: task accuracy (lm-eval tasks, ``edgesmith[tasks]``) of the source and the final
    artifact on the same documents; ``gates: {task.NAME: max_drop}`` adds its task here by itself."""

    names: list[str] = Field(default_factory=list, description="mmlu-mini, wordnet-mc, any lm-eval task or task YAML")
    limit: int | None = Field(None, gt=0, description="documents per task (default: all)")
    runtime: str | None = Field(None, description="runtime of the final artifact (llamacpp for a GGUF as it is)")


class Recipe(Strict):
    name: str = "recipe"
    model: str = "minilm"
    task: str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    steps: list[Step] = Field(default_factory=list)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    gates: dict[str, float] = Field(default_factory=dict, description="metric -> largest allowed drop vs the source")
    tasks: TasksSpec = Field(default_factory=TasksSpec)
    profile: ProfileSpec | None = Field(default_factory=ProfileSpec)

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("steps must be a list of {pass_name: options}")
        steps, seen = [], {}
        for i, item in enumerate(value, 1):
            if isinstance(item, Step):
                steps.append(item)
                continue
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"step {i} must be one mapping {{pass_name: {{options}}}}, got {item!r}")
            (name, options), = item.items()
            options = dict(options or {})
            if not isinstance(options, dict):
                raise ValueError(f"step {i} ({name}): options must be a mapping")
            step_id = str(options.pop("id", name))
            seen[step_id] = seen.get(step_id, 0) + 1
            if seen[step_id] > 1:
                step_id = f"{step_id}-{seen[step_id]}"
            steps.append({"id": step_id, "pass_name": str(name), "options": options})
        return steps

    @model_validator(mode="after")
    def _check_ids(self) -> Recipe:
        ids = {SOURCE_ID} | {s.id for s in self.steps}
        if self.profile is not None:
            for target in self.profile.targets():
                if target.artifact not in ids:
                    raise ValueError(f"profile.artifacts names '{target.artifact}', which is not a step; known: {', '.join(sorted(ids))}")
        for gate, drop in self.gates.items():
            if drop < 0:
                raise ValueError(f"gates.{gate}: a largest allowed drop cannot be negative ({drop})")
        return self

    def task_names(self) -> list[str]:
        """Tasks to measure: ``tasks.names`` and every task a ``task.NAME`` gate names."""
        names = list(self.tasks.names)
        names += [g[len("task."):] for g in self.gates if g.startswith("task.") and g[len("task."):] not in names]
        return names

    def artifact_ids(self) -> list[str]:
        return [SOURCE_ID] + [s.id for s in self.steps]

    def profile_targets(self) -> list[ProfileTarget]:
        if self.profile is None:
            return []
        targets = self.profile.targets()
        return targets or [ProfileTarget(artifact=i) for i in self.artifact_ids()]

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, *, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise BadInput(f"{where}: a recipe is a mapping of keys (name, model, steps, ...), got {type(data).__name__}")
        try:
            return cls(**data)
        except ValidationError as exc:
            raise BadInput(describe_validation_error(exc, where, model_at(cls, exc))) from exc

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        data = read_yaml(path, f"recipe {path} not found; see recipes/ for examples")
        if data is None:
            raise BadInput(f"{path}: empty recipe; give at least a model and steps")
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json")
        data["steps"] = [{s.pass_name: {**({"id": s.id} if s.id != s.pass_name else {}), **s.options}} for s in self.steps]
        return data
