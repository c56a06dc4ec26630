"""Task accuracy of a decoder artifact, and its paired delta against the source model.

:func:`run_tasks` runs lm-eval tasks on one artifact through :class:`~edgesmith.tasks.adapter.EdgesmithLM`
(the artifact's own runtime: PyTorch, ONNX Runtime, or llama.cpp on a GGUF as it is) and keeps each
document's result. :func:`evaluate_tasks` does that for the candidate and its source on the same
documents and pairs them (:mod:`edgesmith.tasks.paired`: McNemar on the items that flipped), beside
the KL divergence, top-1 agreement and perplexity of :mod:`edgesmith.lm_quality`. That is
``edgesmith evaluate ART --tasks ...``, ``es.evaluate(artifact, tasks=[...])`` and the recipe gates
``task.<name>``.

Each (artifact, runtime, task, limit) result is cached under ``<cache>/tasks/`` by the artifact's
content hash, the task file's hash and the lm-eval and edgesmith versions: the source is scored
once however many candidates are compared with it. Nothing is written before every task has been
resolved and its documents loaded, and each cache entry is written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.tasks.harness import SHIPPED, TaskSelection, build_tasks, require_lm_eval, select_tasks
from edgesmith.tasks.paired import Accuracy, PairedDelta, accuracy, paired_delta

log = logging.getLogger(__name__)

#: metrics looked for, in this order, when a task is not one of the shipped ones
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "word_perplexity", "perplexity", "f1", "mcc")
#: bump when what a cached task result holds changes
RESULT_VERSION = 1


@dataclass
class TaskResult:
    """One task on one artifact: its primary metric (with an interval when it is a 0/1 accuracy),
    every metric lm-eval reported, each document's primary result, and the seconds it took."""

    task: str
    metric: str
    value: float
    n: int
    metrics: dict[str, float]
    items: dict[str, float]
    seconds: float
    runtime: str
    interval: Accuracy | None = None

    def as_dict(self, *, items: bool = False) -> dict[str, Any]:
        out = {"task": self.task, "metric": self.metric, "value": self.value, "n": self.n, "metrics": self.metrics,
               "seconds": round(self.seconds, 2), "runtime": self.runtime,
               "interval": self.interval.as_dict() if self.interval else None}
        if items:
            out["items"] = self.items
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TaskResult:
        interval = Accuracy(**data["interval"]) if data.get("interval") else None
        return cls(data["task"], data["metric"], float(data["value"]), int(data["n"]), dict(data["metrics"]),
                   {str(k): float(v) for k, v in data["items"].items()}, float(data["seconds"]), data["runtime"],
                   interval)


@dataclass
class TaskComparison:
    task: str
    candidate: TaskResult
    reference: TaskResult | None = None
    paired: PairedDelta | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.candidate.metric, "candidate": self.candidate.as_dict(),
                "reference": self.reference.as_dict() if self.reference else None,
                "paired": self.paired.as_dict() if self.paired else None}


@dataclass
class TaskReport:
    """What :func:`evaluate_tasks` returns: per task the candidate's result, the reference's and
    their paired delta, plus the decoder fidelity (KL, top-1, perplexity) when it was measured."""

    model: str
    reference: str | None
    tasks: dict[str, TaskComparison]
    fidelity: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``task.<name>`` -> the candidate's primary metric (what recipe gates read)."""
        return {f"task.{name}": c.candidate.value for name, c in self.tasks.items()}

    def reference_metrics(self) -> dict[str, float]:
        return {f"task.{name}": c.reference.value for name, c in self.tasks.items() if c.reference}

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "reference": self.reference, "fidelity": self.fidelity,
                "tasks": {k: v.as_dict() for k, v in self.tasks.items()}}


# ---------------------------------------------------------------------------------------------
# One artifact
# ---------------------------------------------------------------------------------------------


def runtime_of(artifact: Artifact, runtime: str | None) -> str:
    """The runtime that scores ``artifact``: ``runtime``, or its own (one line when it cannot run it)."""
    from edgesmith.runtimes.generation import decoder_runtime

    return decoder_runtime(artifact, runtime).name


def check_decoder(artifact: Artifact) -> None:
    if artifact.task != "text-generation":
        raise BadInput(f"{artifact.name} is a {artifact.task} model, not a causal LM; task accuracy needs a "
                       "text-generation model (a decoder)")
    if artifact.tokenizer is None:
        raise BadInput(f"{artifact.name} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")


def _task_hash(name: str, files: dict[str, Path]) -> str:
    from edgesmith.storage import sha256_file, sha256_json

    path = files.get(name)
    if path is None:
        return sha256_json({"lm_eval_task": name})
    folder = path.parent
    related = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".py"))
    return sha256_json({p.name: sha256_file(p) for p in related})


def _cache_file(artifact_hash: str, runtime: str, name: str, task_hash: str, limit: int | None,
                options: dict[str, Any]) -> Path:
    from edgesmith.cache import default_cache_dir
    from edgesmith.storage import sha256_json
    from edgesmith.version import __version__

    key = sha256_json({"v": RESULT_VERSION, "artifact": artifact_hash, "runtime": runtime, "task": name,
                       "task_files": task_hash, "limit": limit, "options": options,
                       "lm_eval": metadata.version("lm_eval"), "edgesmith": __version__})
    return default_cache_dir() / "tasks" / f"{key}.json"


def _primary(name: str, reported: dict[str, float]) -> str:
    wanted = SHIPPED.get(name)
    if wanted and wanted in reported:
        return wanted
    for metric in PRIMARY_METRICS:
        if metric in reported:
            return metric
    if not reported:
        raise BadInput(f"task {name}: lm-eval reported no metric")
    return sorted(reported)[0]


def _parse(name: str, output: dict, seconds: float, runtime: str) -> TaskResult:
    results = output["results"].get(name)
    if results is None:
        raise BadInput(f"task {name}: lm-eval returned no result (is it a group of tasks? name its tasks instead)")
    reported = {k.split(",")[0]: float(v) for k, v in results.items()
                if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    metric = _primary(name, reported)
    items: dict[str, float] = {}
    for sample in output.get("samples", {}).get(name, []):
        value = sample.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            items[str(sample["doc_id"])] = float(value)
    n = len(output.get("samples", {}).get(name, [])) or int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
    binary = bool(items) and len(items) == n and all(v in (0.0, 1.0) for v in items.values())
    interval = accuracy([items[k] for k in items]) if binary else None
    return TaskResult(name, metric, reported[metric], n, reported, items if binary else {}, seconds, runtime, interval)


def run_tasks(artifact: Artifact, tasks: Sequence[str] | str, *, limit: int | None = None, runtime: str | None = None,
              threads: int | None = None, batch_size: int = 8, use_cache: bool = True,
              selection: TaskSelection | None = None) -> dict[str, TaskResult]:
    """Run ``tasks`` on ``artifact`` in its runtime (``runtime``: llamacpp, onnxruntime or torch)."""
    require_lm_eval()
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1 (got {limit})")
    check_decoder(artifact)
    runtime = runtime_of(artifact, runtime)
    selection = selection or select_tasks(list(tasks) if not isinstance(tasks, str) else tasks)
    build_tasks(selection)  # every task's documents load before anything runs or is written
    options = {"batch_size": batch_size, "add_bos_token": None}
    artifact_hash = artifact.content_hash() if use_cache else ""
    results: dict[str, TaskResult] = {}
    todo: list[tuple[str, Path | None]] = []
    for name in selection.names:
        path = _cache_file(artifact_hash, runtime, name, _task_hash(name, selection.files), limit, options) \
            if use_cache else None
        if path is not None and path.exists():
            try:
                import json

                results[name] = TaskResult.from_dict(json.loads(path.read_text()))
                log.info("%s on %s: reused from the cache", name, artifact.name)
                continue
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable task cache entry %s", path)
        todo.append((name, path))
    if todo:
        results.update(_run_uncached(artifact, todo, selection, limit=limit, runtime=runtime, threads=threads,
                                     batch_size=batch_size))
    return {name: results[name] for name in selection.names}


def _run_uncached(artifact: Artifact, todo: list[tuple[str, Path | None]], selection: TaskSelection, *,
                  limit: int | None, runtime: str, threads: int | None, batch_size: int) -> dict[str, TaskResult]:
    from lm_eval import simple_evaluate

    from edgesmith.runtimes.generation import open_decoder
    from edgesmith.storage import write_json_atomic
    from edgesmith.tasks.adapter import EdgesmithLM

    artifact, session = open_decoder(artifact, runtime=runtime, threads=threads)
    out: dict[str, TaskResult] = {}
    try:
        lm = EdgesmithLM(artifact_obj=artifact, session=session, batch_size=batch_size)
        for name, path in todo:
            t0 = time.perf_counter()
            output = simple_evaluate(model=lm, tasks=[name], task_manager=selection.manager, limit=limit,
                                     bootstrap_iters=0, log_samples=True, verbosity="ERROR")
            seconds = time.perf_counter() - t0
            result = _parse(name, output, seconds, session.runtime)
            log.info("%s on %s (%s): %s %.4f over %d documents in %.1f s", name, artifact.name, session.runtime,
                     result.metric, result.value, result.n, seconds)
            if path is not None:
                write_json_atomic(path, result.as_dict(items=True))
            out[name] = result
    finally:
        session.close()
    return out


# ---------------------------------------------------------------------------------------------
# Candidate against its source
# ---------------------------------------------------------------------------------------------


def evaluate_tasks(artifact: Artifact, tasks: Sequence[str] | str, *, reference: Artifact | None = None,
                   limit: int | None = None, runtime: str | None = None, threads: int | None = None,
                   batch_size: int = 8, fidelity: bool = True, use_cache: bool = True) -> TaskReport:
    """Task accuracy of ``artifact`` and, with a ``reference`` (its source), the paired delta on the
    same documents and the decoder fidelity (KL, top-1, perplexity) against it."""
    check_decoder(artifact)
    selection = select_tasks(list(tasks) if not isinstance(tasks, str) else tasks)
    if reference is not None:
        check_decoder(reference)
    build_tasks(selection)
    candidate = run_tasks(artifact, selection.names, limit=limit, runtime=runtime, threads=threads,
                          batch_size=batch_size, use_cache=use_cache, selection=selection)
    ref_results: dict[str, TaskResult] = {}
    if reference is not None:
        ref_results = run_tasks(reference, selection.names, limit=limit, threads=threads, batch_size=batch_size,
                                use_cache=use_cache, selection=selection)
    comparisons = {}
    for name, result in candidate.items():
        ref = ref_results.get(name)
        paired = paired_delta(ref.items, result.items) if ref and ref.items and result.items else None
        comparisons[name] = TaskComparison(name, result, ref, paired)
    fid: dict[str, float] = {}
    if fidelity and reference is not None:
        from edgesmith.quality import decoder_fidelity

        fid = decoder_fidelity(artifact, reference)
    return TaskReport(artifact.name, reference.name if reference is not None else None, comparisons, fid)


def evaluate(artifact: Artifact, reference: Artifact | None = None, texts: Sequence[str] = (),
             labels: Sequence[Any] | None = None, *, tasks: Sequence[str] | str | None = None,
             limit: int | None = None, runtime: str | None = None, **options: Any):
    """``es.evaluate``: with ``tasks``, :func:`evaluate_tasks` (a :class:`TaskReport`); without,
    :func:`edgesmith.quality.evaluate` (fidelity metrics against ``reference`` on ``texts``)."""
    if tasks is not None:
        return evaluate_tasks(artifact, tasks, reference=reference, limit=limit, runtime=runtime, **options)
    from edgesmith.quality import evaluate as quality_evaluate

    return quality_evaluate(artifact, reference, texts, labels, **options)


def task_metrics(final: Artifact, source: Artifact, names: Sequence[str], final_metrics: dict[str, Any],
                 source_metrics: dict[str, Any], *, limit: int | None = None, runtime: str | None = None) -> TaskReport:
    """A recipe's task accuracy: ``task.<name>`` of the final artifact and of the source, on the same
    documents, added to their metrics (what ``gates: {task.<name>: max_drop}`` and sweep objectives read)."""
    report = evaluate_tasks(final, list(names), reference=source if final is not source else None, limit=limit,
                            runtime=runtime, fidelity=False)
    final_metrics.update(report.metrics())
    if final is source:
        source_metrics.update(report.metrics())
    else:
        source_metrics.update(report.reference_metrics())
    return report
