"""A recipe run end to end: plan, steps, evaluation, task accuracy, gates, profiles, report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from edgesmith.artifacts import Artifact, load
from edgesmith.cache import StepCache
from edgesmith.data import TextData, load_texts
from edgesmith.errors import GateFailed, first_line
from edgesmith.passes import Context
from edgesmith.pipeline.evaluation import evaluate_all
from edgesmith.pipeline.planning import PlannedStep, plan
from edgesmith.pipeline.profiles import profile_all, profiles_manifest
from edgesmith.pipeline.run_folder import RunState, manifest, new_run_dir, tidy_killed_runs
from edgesmith.pipeline.steps import materialise, run_steps
from edgesmith.recipe import SOURCE_ID, Recipe
from edgesmith.reports.markdown import write_run_report
from edgesmith.storage import sha256_json, write_json_atomic


@dataclass
class RunResult:
    run_dir: Path
    artifacts: dict[str, Artifact]
    metrics: dict[str, dict[str, float]]
    profiles: list[Any] = field(default_factory=list)
    comparison: Any = None
    deployable: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)


def run(recipe: Recipe | str | Path | dict, *, runs_dir: str | Path = "runs", cache_dir: str | Path | None = None,
        console: Console | None = None, progress: bool = True) -> RunResult:
    """Run a recipe end to end and return what it made. Raises GateFailed (exit 3) when a gate fails."""
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    console = console or Console(stderr=True, quiet=not progress)
    started = time.perf_counter()

    steps = plan(recipe)
    data = load_texts(recipe.data.path, text_field=recipe.data.text_field, label_field=recipe.data.label_field,
                      limit=recipe.data.limit, offset=recipe.data.offset)
    cache = StepCache(cache_dir)
    tidy_killed_runs(Path(runs_dir), recipe.name)
    run_dir = new_run_dir(Path(runs_dir), recipe.name)
    state = RunState(run_dir)
    console.print(f"[bold]edgesmith run[/] {recipe.name} → {run_dir}")

    try:
        result = _execute(recipe, steps, data, cache, run_dir, state, console)
    except GateFailed:
        state.set("gate-failed")
        raise
    except BaseException as exc:
        if run_dir.is_dir():
            state.set("failed", error=first_line(exc) if str(exc) else type(exc).__name__)
        raise
    result.manifest["seconds_total"] = round(time.perf_counter() - started, 2)
    state.check()
    write_json_atomic(run_dir / "manifest.json", result.manifest)
    state.set("done")
    return result


def _execute(recipe: Recipe, steps: list[PlannedStep], data: TextData, cache: StepCache, run_dir: Path,
             state: RunState, console: Console) -> RunResult:
    source = load(recipe.model, task=recipe.task)
    source_hash = source.content_hash()
    data_hash = sha256_json({"texts": data.texts, "labels": data.labels})
    ctx = Context(source=source, texts=data.texts, labels=data.labels)
    made, step_records = run_steps(steps, source, ctx, data_hash, cache, state, console)
    artifacts: dict[str, Artifact] = {SOURCE_ID: source, **made}

    state.set("materialising")
    folders = materialise(step_records, cache, run_dir, state)

    metrics: dict[str, dict[str, float]] = {}
    if recipe.evaluate.enabled:
        state.set("evaluating")
        metrics = evaluate_all(recipe, artifacts, data, cache, console)

    final_id = steps[-1].id if steps else SOURCE_ID
    if recipe.task_names():  # decoders' task accuracy (edgesmith.tasks), paired on the same documents
        from edgesmith.tasks.evaluation import task_metrics

        state.set("evaluating tasks")
        task_metrics(artifacts[final_id], source, recipe.task_names(), metrics.setdefault(final_id, {}),
                     metrics.setdefault(SOURCE_ID, {}), limit=recipe.tasks.limit, runtime=recipe.tasks.runtime)
    record = manifest(recipe, source, source_hash, step_records, folders, metrics)
    _check_gates(recipe, final_id, metrics, record, run_dir)

    profiles, comparison = [], None
    if recipe.profile_targets():
        state.set("profiling")
        profiles, comparison = profile_all(recipe, artifacts, metrics, run_dir, console)
        record.update(profiles_manifest(recipe, profiles, comparison))
        for warning in record["warnings"]:
            console.print(f"[yellow]warning:[/] {warning}")
    write_run_report(run_dir, recipe.name, recipe.model, record, comparison, metrics, profiles)
    return RunResult(run_dir, artifacts, metrics, profiles, comparison, True, record)


def _check_gates(recipe: Recipe, final_id: str, metrics: dict[str, dict[str, float]], record: dict[str, Any],
                 run_dir: Path) -> None:
    """Record the gates in the manifest; when one fails, write the manifest and report and raise GateFailed."""
    failures: list[dict] = []
    if recipe.gates:
        from edgesmith.quality import check_gates

        failures = check_gates(metrics.get(final_id, {}), metrics.get(SOURCE_ID, {}), recipe.gates)
    record["gates"] = {"final_artifact": final_id, "rules": recipe.gates, "failures": failures,
                       "passed": not failures}
    record["deployable"] = not failures
    record["final_artifact"] = final_id
    if failures:
        write_json_atomic(run_dir / "manifest.json", record)
        write_run_report(run_dir, recipe.name, recipe.model, record, None, metrics)
        worst = failures[0]
        raise GateFailed(
            f"quality gate failed for '{final_id}': {worst['metric']} dropped {worst['drop']:.4f} "
            f"(from {worst['reference']:.4f} to {worst['value']:.4f}), more than the allowed {worst['max_drop']}; "
            f"nothing is marked deployable (run folder: {run_dir})", failures)
