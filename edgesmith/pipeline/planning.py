"""Planning a run: every step's pass and config resolved and the chain of artifact kinds checked, so
everything that can be refused is refused before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgesmith.artifacts import META_FILE, ONNX_FILE, read_meta, resolve_model_path
from edgesmith.errors import BadInput
from edgesmith.passes import Pass, get_pass, make_config
from edgesmith.recipe import SOURCE_ID, Recipe


@dataclass
class PlannedStep:
    id: str
    pass_cls: type[Pass]
    config: Any
    input_kind: str
    output_kind: str


def source_kind(model: str) -> str:
    """The artifact kind a recipe's model resolves to, read without loading the model."""
    path = resolve_model_path(model)
    if path.is_file():
        return "torch" if path.suffix == ".gguf" else "onnx"  # a GGUF loads as its FP32 torch model
    meta = path / META_FILE
    if meta.exists():
        return read_meta(meta)["kind"]
    if (path / ONNX_FILE).exists():
        return "onnx"
    return "torch"


def plan(recipe: Recipe) -> list[PlannedStep]:
    """Resolve every step's pass and config and check that the chain of artifact types fits."""
    kind = source_kind(recipe.model)
    planned: list[PlannedStep] = []
    previous = "the model"
    for i, step in enumerate(recipe.steps, 1):
        pass_cls = get_pass(step.pass_name)
        config = make_config(pass_cls.config_class, step.options, where=f"step {i} ({step.id})")
        accepted = [a.kind for a in pass_cls.accepts]
        if kind not in accepted:
            hint = "; add an export step before it" if kind == "torch" and "onnx" in accepted else ""
            raise BadInput(f"step {i} ({step.id}): pass '{step.pass_name}' takes {' or '.join(accepted)} models, "
                           f"but {previous} gives a {kind} model{hint}")
        out_kind = pass_cls.returns.kind
        planned.append(PlannedStep(step.id, pass_cls, config, kind, out_kind))
        kind = out_kind
        previous = f"step {i} ({step.id})"
    _check_profile_targets(recipe, {SOURCE_ID: source_kind(recipe.model), **{p.id: p.output_kind for p in planned}})
    if recipe.gates:
        from edgesmith.quality import is_known_metric, known_metrics

        for gate in recipe.gates:
            if not is_known_metric(gate):
                raise BadInput(f"gates: unknown metric '{gate}'; known: {', '.join(known_metrics())}")
    if recipe.task_names():  # unknown tasks, bad task files, lm-eval missing: refused before any work
        from edgesmith.tasks.harness import build_tasks, select_tasks

        build_tasks(select_tasks(recipe.task_names()))
    return planned


def _check_profile_targets(recipe: Recipe, kinds: dict[str, str]) -> None:
    """Each profile target's runtime runs its artifact's kind."""
    from edgesmith.runtimes.base import get_runtime

    for target in recipe.profile_targets():
        if target.runtime is not None:
            runtime = get_runtime(target.runtime)
            from_gguf = target.artifact == SOURCE_ID and resolve_model_path(recipe.model).suffix == ".gguf"
            if kinds[target.artifact] not in runtime.kinds and not (from_gguf and "gguf" in runtime.kinds):
                # a source read from a GGUF runs its original file on a GGUF runtime (llama.cpp)
                raise BadInput(f"profile: runtime '{target.runtime}' cannot run '{target.artifact}' "
                               f"(a {kinds[target.artifact]} model); it runs {', '.join(runtime.kinds)} models")
