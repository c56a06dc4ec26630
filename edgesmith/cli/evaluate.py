"""``edgesmith evaluate ART [--reference MODEL]``: the quality an artifact kept against its source:
KL divergence, top-1 agreement and perplexity for decoders; cosine and neighbour recall for
encoders; agreement (and accuracy with labels) for classifiers. ``--gate`` turns a metric into a
check that exits 3. Decoders: ``--tasks mmlu-mini,wordnet-mc`` adds task accuracy (lm-eval tasks
through the artifact's own runtime, :mod:`edgesmith.tasks`) and its paired delta against the source;
``--gate task.mmlu-mini=0.02`` gates the paired drop."""

from __future__ import annotations

import typer
from rich.table import Table

from edgesmith.cli.common import JSON_OUT, console, print_json
from edgesmith.cli.root import app
from edgesmith.errors import BadInput, GateFailed


def _gates(items: list[str]) -> dict[str, float]:
    gates: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            gates[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise BadInput(f"--gate '{item}' is not METRIC=MAX_DROP (examples: kld=0.05, top1=0.1, cosine=0.01)")
    return gates


def reference_of(artifact, given: str | None):
    """The model to compare against: ``given``, else the source the artifact records."""
    from edgesmith.artifacts import load

    if given:
        return load(given)
    source = (artifact.meta or {}).get("source")
    if not source:
        raise BadInput(f"{artifact.name} records no source model; give one with --reference MODEL")
    try:
        return load(source)
    except BadInput as exc:
        raise BadInput(f"{artifact.name}'s recorded source {source} cannot be loaded ({exc}); "
                       "give one with --reference MODEL") from exc


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Argument(..., help="The artifact to evaluate (a folder, .onnx, .gguf, 'smollm2')."),
    reference: str | None = typer.Option(None, "--reference", "-r", help="The model to compare against "
                                         "(default: the source the artifact records)."),
    data: str = typer.Option("builtin:wordnet", "--data", help="Encoders and classifiers: local texts (jsonl, "
                             "csv, parquet, txt). Decoders score held-out passages of the shipped corpus."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str | None = typer.Option(None, "--label-field", help="Classifiers: labels for accuracy."),
    limit: int | None = typer.Option(None, "--limit", help="Encoders and classifiers: rows to evaluate on "
                                     "(default 512). With --tasks: documents per task (default: all)."),
    tasks: str | None = typer.Option(None, "--tasks", help="Decoders: task accuracy on these tasks, comma-separated "
                                     "(shipped: mmlu-mini, wordnet-mc; any lm-eval task name or task YAML), with "
                                     "the paired delta against the reference. Needs edgesmith[tasks]."),
    runtime: str | None = typer.Option(None, "--runtime", help="Decoders: the runtime that runs the artifact "
                                       "(llamacpp runs a .gguf as it is, ortgenai an ORT GenAI folder; default: "
                                       "the artifact's own)."),
    threads: int | None = typer.Option(None, "--threads", help="Decoders: threads of the runtime."),
    batch_size: int = typer.Option(8, "--batch-size", help="With --tasks: contexts scored per forward pass."),
    gate: list[str] = typer.Option([], "--gate", help="METRIC=MAX_DROP (repeatable): exit 3 when the metric "
                                   "drops by more (kld and perplexity: rises by more) than that."),
    as_json: bool = JSON_OUT,
) -> None:
    """Quality of an artifact against its source model (exit 3 when a --gate fails)."""
    from edgesmith.artifacts import load
    from edgesmith.data import load_texts
    from edgesmith.quality import check_gates, evaluate

    gates = _gates(gate)
    if tasks is not None or any(g.startswith("task.") for g in gates):
        _evaluate_tasks(model, reference, tasks, gates, limit=limit, runtime=runtime, threads=threads,
                        batch_size=batch_size, as_json=as_json)
        return
    candidate = _load_candidate(model, runtime) if runtime else load(model)
    ref = reference_of(candidate, reference)
    if runtime and candidate.task == "text-generation":
        _evaluate_on_runtime(candidate, ref, runtime, threads, gates, as_json)
        return
    texts, labels = [], None
    if candidate.task != "text-generation":
        rows = load_texts(data, text_field=text_field, label_field=label_field, limit=limit or 512)
        texts, labels = rows.texts, rows.labels
    metrics = evaluate(candidate, ref, texts, labels)
    reference_metrics = {}
    if "accuracy" in gates or "perplexity" in gates:
        reference_metrics = {"accuracy": metrics.get("accuracy_reference"),
                             "perplexity": metrics.get("perplexity_reference")}
        if "accuracy" in gates:
            reference_metrics["accuracy"] = evaluate(ref, ref, texts, labels)["accuracy"]
        reference_metrics = {k: v for k, v in reference_metrics.items() if v is not None}
    failures = check_gates(metrics, reference_metrics, gates) if gates else []
    _report(candidate, ref, metrics, failures, as_json)


def _report(candidate, ref, metrics: dict[str, float], failures: list[dict], as_json: bool,
            runtime: str | None = None) -> None:
    """The metrics as JSON or a table; exit 3 (GateFailed) when a gate failed."""
    if as_json:
        print_json({"model": candidate.name, "reference": ref.name, **({"runtime": runtime} if runtime else {}),
                    "metrics": metrics, "gate_failures": failures})
    else:
        table = Table(title=f"{candidate.name}{f' ({runtime})' if runtime else ''} against {ref.name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)
    _fail_on(failures)


def _fail_on(failures: list[dict]) -> None:
    """Exit 3 (GateFailed) naming every gate that failed."""
    if failures:
        raise GateFailed("; ".join(f"{f['metric']} {f['value']:.4f} vs {f['reference']:.4f} (limit {f['max_drop']})"
                                   for f in failures), failures)


def _load_candidate(model: str, runtime: str | None):
    """The artifact as its runtime runs it (``--runtime llamacpp`` keeps a .gguf, or smollm2, as it
    is); one line when that runtime has no generation loop or cannot run it."""
    from edgesmith.artifacts import load
    from edgesmith.runtimes.base import get_runtime
    from edgesmith.runtimes.generation import decoder_runtime

    if runtime is None:
        return load(model)
    artifact = get_runtime(runtime).load_artifact(model)
    decoder_runtime(artifact, runtime)
    return artifact


def _evaluate_on_runtime(candidate, ref, runtime: str, threads: int | None, gates: dict[str, float],
                         as_json: bool) -> None:
    """A decoder's fidelity (KL, top-1, perplexity) to its source, scored on ``runtime``'s own logits."""
    from edgesmith.lm_quality import lm_fidelity, session_logits
    from edgesmith.quality import check_gates

    logits = session_logits(candidate, runtime=runtime, threads=threads)
    metrics = lm_fidelity(logits, ref, tokenizer=candidate.tokenizer or ref.tokenizer, threads=threads)
    failures = check_gates(metrics, {"perplexity": metrics["perplexity_reference"]}, gates) if gates else []
    _report(candidate, ref, metrics, failures, as_json, runtime)


def _evaluate_tasks(model: str, reference: str | None, tasks: str | None, gates: dict[str, float], *,
                    limit: int | None, runtime: str | None, threads: int | None, batch_size: int,
                    as_json: bool) -> None:
    from edgesmith.quality import check_gates
    from edgesmith.tasks.evaluation import evaluate_tasks
    from edgesmith.tasks.harness import require_lm_eval

    require_lm_eval()
    named = [g.removeprefix("task.") for g in gates if g.startswith("task.")]
    wanted = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    wanted += [t for t in named if t not in wanted]
    candidate = _load_candidate(model, runtime)
    ref = reference_of(candidate, reference)
    report = evaluate_tasks(candidate, wanted, reference=ref, limit=limit, runtime=runtime, threads=threads,
                            batch_size=batch_size)
    metrics = {**report.fidelity, **report.metrics()}
    reference_metrics = {"perplexity": report.fidelity.get("perplexity_reference"), **report.reference_metrics()}
    reference_metrics = {k: v for k, v in reference_metrics.items() if v is not None}
    failures = check_gates(metrics, reference_metrics, gates) if gates else []
    if as_json:
        print_json({**report.as_dict(), "metrics": metrics, "gate_failures": failures})
    else:
        _print_report(report)
    _fail_on(failures)


def _print_report(report) -> None:
    first = next(iter(report.tasks.values()))
    model = f"{report.model} ({first.candidate.runtime})"
    reference = f"{report.reference} ({first.reference.runtime})" if first.reference else report.reference
    if report.fidelity:
        table = Table(title=f"{model} against {reference}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in report.fidelity.items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)
    table = Table(title=f"task accuracy of {model}" + (f", paired against {reference}" if report.reference else ""))
    for column in ("task (metric)", "n", "accuracy [95% CI]", "source", "paired delta [95% CI]", "lost/gained",
                   "McNemar p", "verdict"):
        table.add_column(column, justify="left" if column in ("task (metric)", "verdict") else "right", no_wrap=True)
    seconds = []
    for name, comp in report.tasks.items():
        cand, paired = comp.candidate, comp.paired
        value = f"{cand.value:.3f}" + (f" [{cand.interval.low:.3f}-{cand.interval.high:.3f}]" if cand.interval else "")
        table.add_row(f"{name} ({cand.metric})", str(cand.n), value,
                      f"{comp.reference.value:.3f}" if comp.reference else "-",
                      f"{paired.delta:+.3f} [{paired.low:+.3f}, {paired.high:+.3f}]" if paired else "-",
                      f"{paired.lost}/{paired.gained}" if paired else "-",
                      f"{paired.p_value:.3g}" if paired else "-", paired.verdict if paired else "-")
        seconds.append(f"{name} {cand.seconds:.0f} s" + (f" (source {comp.reference.seconds:.0f} s)"
                                                         if comp.reference else ""))
    console.print(table)
    console.print("time, cached results included: " + ", ".join(seconds), style="dim")
