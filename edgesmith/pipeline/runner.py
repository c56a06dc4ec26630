"""Run a recipe: check the chain, run (or reuse) each step, evaluate, gate, profile, compare, report.

Every step is cached under a content-addressed key (see :mod:`edgesmith.cache`); a second run of
the same recipe reuses every finished step, and a run killed mid-step, started again, finishes with
the same outputs. The run folder ``runs/<recipe>-<time>/`` holds the artifacts, ``manifest.json``,
``report.md`` with its plot, the profiles, and ``state.json`` (what the run is doing now).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from edgesmith.artifacts import META_FILE, ONNX_FILE, Artifact, load, read_meta, resolve_model_path
from edgesmith.cache import StepCache, package_versions
from edgesmith.data import TextData, load_texts
from edgesmith.errors import BadInput, GateFailed, first_line
from edgesmith.faults import point
from edgesmith.passes import Context, Pass, get_pass, make_config
from edgesmith.recipe import SOURCE_ID, Recipe
from edgesmith.reports.markdown import write_run_report
from edgesmith.storage import atomic_dir, link_or_copy_tree, read_json, sha256_json, temp_owner, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class PlannedStep:
    id: str
    pass_cls: type[Pass]
    config: Any
    input_kind: str
    output_kind: str


@dataclass
class RunResult:
    run_dir: Path
    artifacts: dict[str, Artifact]
    metrics: dict[str, dict[str, float]]
    profiles: list[Any] = field(default_factory=list)
    comparison: Any = None
    deployable: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Planning: everything that can be refused is refused before any work starts
# ---------------------------------------------------------------------------------------------


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
    kinds = {SOURCE_ID: source_kind(recipe.model), **{p.id: p.output_kind for p in planned}}
    from edgesmith.runtimes.base import get_runtime

    for target in recipe.profile_targets():
        if target.runtime is not None:
            runtime = get_runtime(target.runtime)
            from_gguf = target.artifact == SOURCE_ID and resolve_model_path(recipe.model).suffix == ".gguf"
            if kinds[target.artifact] not in runtime.kinds and not (from_gguf and "gguf" in runtime.kinds):
                # a source read from a GGUF runs its original file on a GGUF runtime (llama.cpp)
                raise BadInput(f"profile: runtime '{target.runtime}' cannot run '{target.artifact}' "
                               f"(a {kinds[target.artifact]} model); it runs {', '.join(runtime.kinds)} models")
    if recipe.gates:
        from edgesmith.quality import is_known_metric, known_metrics

        for gate in recipe.gates:
            if not is_known_metric(gate):
                raise BadInput(f"gates: unknown metric '{gate}'; known: {', '.join(known_metrics())}")
    if recipe.task_names():  # unknown tasks, bad task files, lm-eval missing: refused before any work
        from edgesmith.tasks.harness import build_tasks, select_tasks

        build_tasks(select_tasks(recipe.task_names()))
    return planned


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


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
    _tidy_killed_runs(Path(runs_dir), recipe.name)
    run_dir = _new_run_dir(Path(runs_dir), recipe.name)
    state = _State(run_dir)
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


class _State:
    """``state.json`` in the run folder: what the run is doing, for people and for tests.

    Each change first checks that the run folder is still there: one deleted mid-run (by the user,
    or a clean-up job) stops the run with one line rather than being silently made again."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / "state.json"
        self.set("starting")

    def check(self) -> None:
        if not self.run_dir.is_dir():
            raise BadInput(f"{self.run_dir}: the run folder was deleted while the run was running; the steps it "
                           "finished stay in the cache, so running the recipe again resumes from them")

    def set(self, status: str, **extra: Any) -> None:
        self.check()
        point(f"run:{status}")
        write_json_atomic(self.path, {"status": status, "updated": _now(), "owner": temp_owner(), **extra})


#: the states a run folder ends in
FINAL_STATES = ("done", "failed", "gate-failed", "interrupted")


def _tidy_killed_runs(runs_dir: Path, name: str) -> None:
    """Run folders of this recipe left by a killed run (state not final, its process gone, on this
    machine): remove their half-copied artifacts' temp folders and mark them ``interrupted``."""
    from edgesmith.storage import process_gone, remove_stale_temps

    if not runs_dir.is_dir():
        return
    for folder in runs_dir.glob(f"{name}-*"):
        state = read_json(folder / "state.json")
        if not isinstance(state, dict) or state.get("status") in FINAL_STATES or not process_gone(str(state.get("owner"))):
            continue
        remove_stale_temps(folder)
        remove_stale_temps(folder / "artifacts")
        write_json_atomic(folder / "state.json", {**state, "status": "interrupted", "was": state.get("status"),
                                                  "updated": _now()})


def _execute(recipe: Recipe, steps: list[PlannedStep], data: TextData, cache: StepCache, run_dir: Path,
             state: _State, console: Console) -> RunResult:
    source = load(recipe.model, task=recipe.task)
    source_hash = source.content_hash()
    data_hash = sha256_json({"texts": data.texts, "labels": data.labels})
    ctx = Context(source=source, texts=data.texts, labels=data.labels)
    artifacts: dict[str, Artifact] = {SOURCE_ID: source}
    step_records: list[dict] = []

    current = source
    for i, step in enumerate(steps, 1):
        config_json = step.config.key_dump()
        extra = dict(step.pass_cls.environment_key())
        files = referenced_files_key(config_json)
        if files:
            extra["files"] = files  # a data or teacher file edited in place must not reuse a stale step
        if "data" in step.pass_cls.uses:
            extra["data"] = data_hash
        if "source" in step.pass_cls.uses:
            extra["source"] = source_hash
        input_hash = current.content_hash()
        key = cache.key(input_hash, step.pass_cls.name, config_json, extra)
        label = f"[{i}/{len(steps)}] {step.id}"
        state.set("running", step=step.id, index=i, cache_key=key)
        t0 = time.perf_counter()

        def waiting(label: str = label) -> None:
            console.print(f"{label}: another edgesmith process is computing this step; waiting for it "
                          f"({cache.lock_path(key)})", soft_wrap=True)

        with cache.lock(key, on_wait=waiting):
            cached = cache.usable(key, label=step.id)
            if cached:
                out = load(cache.path(key))
                console.print(f"{label}: reused from cache ({key[:12]})")
            else:
                point(f"step:{step.id}:start")
                ctx.workdir = cache.scratch(key)
                try:
                    with console.status(f"{label}: {step.pass_cls.name} …"):
                        out = step.pass_cls(step.config)(current, ctx)
                    point(f"step:{step.id}:computed")
                    cache.store(key, out)
                finally:
                    shutil.rmtree(ctx.workdir, ignore_errors=True)
                point(f"step:{step.id}:stored")
                out = load(cache.path(key))
                console.print(f"{label}: done in {time.perf_counter() - t0:.1f}s")
        seconds = time.perf_counter() - t0
        artifacts[step.id] = out
        entry = out.lineage[-1] if out.lineage else {}
        step_records.append({
            "id": step.id, "pass": step.pass_cls.name, "config": config_json, "cache_key": key, "cached": cached,
            "seconds": round(seconds, 3), "pass_seconds": entry.get("seconds"), "input_hash": input_hash,
            "output_hash": out.content_hash(), "kind": out.kind, "report": entry.get("report", {}),
        })
        current = out

    state.set("materialising")
    folders = {}
    for record in step_records:
        dest = run_dir / "artifacts" / record["id"]
        state.check()
        with atomic_dir(dest) as tmp:
            link_or_copy_tree(cache.path(record["cache_key"]), tmp)
        folders[record["id"]] = str(dest)

    metrics: dict[str, dict[str, float]] = {}
    if recipe.evaluate.enabled:
        state.set("evaluating")
        metrics = _evaluate_all(recipe, artifacts, data, cache, console)

    final_id = steps[-1].id if steps else SOURCE_ID
    if recipe.task_names():  # decoders' task accuracy (edgesmith.tasks), paired on the same documents
        from edgesmith.tasks.evaluation import task_metrics

        state.set("evaluating tasks")
        task_metrics(artifacts[final_id], source, recipe.task_names(), metrics.setdefault(final_id, {}),
                     metrics.setdefault(SOURCE_ID, {}), limit=recipe.tasks.limit, runtime=recipe.tasks.runtime)
    manifest = _manifest(recipe, source, source_hash, step_records, folders, metrics)
    gate_failures: list[dict] = []
    if recipe.gates:
        from edgesmith.quality import check_gates

        gate_failures = check_gates(metrics.get(final_id, {}), metrics.get(SOURCE_ID, {}), recipe.gates)
    manifest["gates"] = {"final_artifact": final_id, "rules": recipe.gates, "failures": gate_failures,
                         "passed": not gate_failures}
    manifest["deployable"] = not gate_failures
    manifest["final_artifact"] = final_id
    if gate_failures:
        write_json_atomic(run_dir / "manifest.json", manifest)
        write_run_report(run_dir, recipe.name, recipe.model, manifest, None, metrics)
        worst = gate_failures[0]
        raise GateFailed(
            f"quality gate failed for '{final_id}': {worst['metric']} dropped {worst['drop']:.4f} "
            f"(from {worst['reference']:.4f} to {worst['value']:.4f}), more than the allowed {worst['max_drop']}; "
            f"nothing is marked deployable (run folder: {run_dir})", gate_failures)

    profiles, comparison = [], None
    targets = recipe.profile_targets()
    if targets:
        state.set("profiling")
        profiles, comparison = _profile_all(recipe, artifacts, metrics, run_dir, console)
        manifest["profiles"] = [
            {"artifact": t.artifact, "file": f"profiles/{profile_filename(p.label)}",
             "runtime": p.runtime.name, "providers": p.runtime.providers, "stats": p.stats.model_dump()
             if hasattr(p.stats, "model_dump") else p.stats}
            for t, p in zip(targets, profiles)]
        manifest["comparison"] = json.loads(comparison.to_json())
        manifest["warnings"] = _slower_than_parent(recipe, targets, profiles)
        for warning in manifest["warnings"]:
            console.print(f"[yellow]warning:[/] {warning}")
    write_run_report(run_dir, recipe.name, recipe.model, manifest, comparison, metrics, profiles)
    return RunResult(run_dir, artifacts, metrics, profiles, comparison, True, manifest)


def referenced_files_key(config: Any) -> dict[str, str]:
    """Content hashes of the local files and folders a step's options name (data, calibration, teacher)."""
    from edgesmith.storage import sha256_file

    found: dict[str, str] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value and not value.startswith("builtin:") and len(value) < 4096:
            path = Path(value).expanduser()
            try:
                if path.is_file():
                    found[value] = sha256_file(path)
                elif path.is_dir():
                    found[value] = sha256_json({str(f.relative_to(path)): sha256_file(f)
                                                for f in sorted(path.rglob("*")) if f.is_file()})
            except OSError:
                return

    visit(config)
    return found


def _evaluate_all(recipe: Recipe, artifacts: dict[str, Artifact], data: TextData, cache: StepCache,
                  console: Console) -> dict[str, dict[str, float]]:
    from edgesmith.quality import evaluate, reference_outputs

    source = artifacts[SOURCE_ID]
    texts, labels = data.texts, data.labels
    metrics_dir = cache.root / "metrics"
    reference = None
    results: dict[str, dict[str, float]] = {}
    source_hash = source.content_hash()
    for art_id, art in artifacts.items():
        key = sha256_json({"artifact": art.content_hash(), "reference": source_hash,
                           "texts": sha256_json([texts, labels]), "k": recipe.evaluate.k,
                           "versions": package_versions()})
        path = metrics_dir / f"{key}.json"
        saved = read_json(path)
        if isinstance(saved, dict) and all(isinstance(v, (int, float)) for v in saved.values()):
            results[art_id] = saved
            continue
        if path.exists():
            log.warning("cached metrics %s are damaged; computing them again", path)
        with console.status(f"evaluating {art_id} on {len(texts)} texts …"):
            if reference is None:
                reference = reference_outputs(source, texts, batch_size=recipe.evaluate.batch_size)
            results[art_id] = evaluate(art, source, texts, labels, k=recipe.evaluate.k, reference_embeddings=reference,
                                       candidate_outputs=reference if art is source else None,
                                       batch_size=recipe.evaluate.batch_size)
        write_json_atomic(path, results[art_id])
    return results


def _profile_all(recipe: Recipe, artifacts: dict[str, Artifact], metrics: dict[str, dict[str, float]],
                 run_dir: Path, console: Console):
    from edgesmith.profiling import compare, is_decoder, profile, profile_generation
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    spec = recipe.profile
    assert spec is not None
    profiles = []
    for target in recipe.profile_targets():
        art = artifacts[target.artifact]
        runtime = target.runtime or default_runtime_for(art)
        precision = _precision(art, runtime)
        label = f"{target.artifact} ({get_runtime(runtime).short_name or runtime} {precision})"
        progress = console.is_terminal and not console.quiet
        if is_decoder(art):
            lengths = ",".join(map(str, spec.prompt_tokens))
            console.print(f"profiling {label} (generation: prompts {lengths} tokens, {spec.new_tokens} new tokens, "
                          f"{spec.rounds} rounds) …")
            options = {"provider": target.provider} if target.provider != "cpu" else {}
            prof = profile_generation(art, runtime, prompt_tokens=spec.prompt_tokens, new_tokens=spec.new_tokens,
                                      batch=spec.batch, rounds=spec.rounds, threads=spec.threads, target=spec.target,
                                      label=label, progress=progress, **options)
        else:
            console.print(f"profiling {label} (batch {spec.batch}, seq {spec.seq}) …")
            prof = profile(art, runtime, batch=spec.batch, seq=spec.seq, warmup=spec.warmup,
                           iterations=spec.iterations, time_budget_s=spec.time_budget_s, threads=spec.threads,
                           provider=target.provider, target=spec.target, label=label, progress=progress)
        prof.quality = dict(metrics.get(target.artifact, {}))
        prof.save(run_dir / "profiles" / profile_filename(label))
        profiles.append(prof)
    comparison = compare(profiles, baseline=0)
    return profiles, comparison


def _slower_than_parent(recipe: Recipe, targets: list, profiles: list) -> list[str]:
    """"Compressed but not faster": flag each profiled artifact slower than the nearest profiled ancestor."""
    from edgesmith.stats import bootstrap_speedup, verdict_of

    order = recipe.artifact_ids()
    by_id = {t.artifact: p for t, p in zip(targets, profiles)}
    warnings = []
    for art_id, prof in by_id.items():
        ancestors = [a for a in order[:order.index(art_id)] if a in by_id]
        if not ancestors:
            continue
        parent = by_id[ancestors[-1]]
        if parent.is_generation and prof.is_generation:
            from edgesmith.profiling import generation_slowdowns

            slower = generation_slowdowns(parent, prof)
            if slower:
                warnings.append(f"{prof.label} is slower than its parent {parent.label}: {'; '.join(slower)} "
                                "(compressed but not faster)")
            continue
        if (parent.shapes.batch, parent.shapes.seq) != (prof.shapes.batch, prof.shapes.seq):
            continue
        speedup, low, high = bootstrap_speedup(parent.latencies_ms, prof.latencies_ms)
        if verdict_of(low, high) == "slower":
            warnings.append(f"{prof.label} is slower than its parent {parent.label}: {speedup:.2f}x "
                            f"[{low:.2f}-{high:.2f}] (compressed but not faster)")
    return warnings


def profile_filename(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label).strip("_") + ".json"


def _precision(art: Artifact, runtime: str | None = None) -> str:
    from edgesmith.runtimes.base import get_runtime

    if art.kind in ("onnx", "tensorrt", "early-exit"):
        return str(art.meta.get("precision", "fp32")).removesuffix("-dynamic")
    if art.kind == "gguf":
        return str((art.meta.get("gguf_export") or {}).get("quant", "gguf"))
    summary = (art.meta.get("gguf") or {}).get("quant_summary") or {}
    if summary and runtime is not None and "gguf" in get_runtime(runtime).decoder_kinds:
        # a model read from a GGUF runs its original file on a runtime of GGUF files (llama.cpp)
        return max(summary, key=lambda kind: summary[kind]).lower()
    return "fp32"


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_run_dir(runs_dir: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = runs_dir / f"{name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = runs_dir / f"{name}-{stamp}-{n}"
    try:
        candidate.mkdir(parents=True)
    except PermissionError as exc:  # name the runs folder, which the user can fix
        blocked = next((p for p in (runs_dir, *runs_dir.parents) if p.exists()), runs_dir)
        raise PermissionError(exc.errno, exc.strerror, str(blocked)) from exc
    return candidate


def _manifest(recipe: Recipe, source: Artifact, source_hash: str, steps: list[dict], folders: dict[str, str],
              metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    from edgesmith.artifacts import TorchModel

    src = {"model": recipe.model, "kind": source.kind, "name": source.name, "content_hash": source_hash,
           "task": source.task}
    if isinstance(source, TorchModel):
        src["parameters"] = source.parameter_count()
    return {
        "schema": 1,
        "recipe": recipe.to_dict(),
        "created": _now(),
        "source": src,
        "steps": [{**s, "folder": folders.get(s["id"])} for s in steps],
        "metrics": metrics,
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "machine": platform.machine(), "packages": package_versions()},
    }
