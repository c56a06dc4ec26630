"""``edgesmith evaluate ART [--reference MODEL]``: the quality an artifact kept against its source:
KL divergence, top-1 agreement and perplexity for decoders; cosine and neighbour recall for
encoders; agreement (and accuracy with labels) for classifiers. ``--gate`` turns a metric into a
check that exits 3."""

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
    limit: int = typer.Option(512, "--limit", help="Encoders and classifiers: rows to evaluate on."),
    gate: list[str] = typer.Option([], "--gate", help="METRIC=MAX_DROP (repeatable): exit 3 when the metric "
                                   "drops by more (kld and perplexity: rises by more) than that."),
    as_json: bool = JSON_OUT,
) -> None:
    """Quality of an artifact against its source model (exit 3 when a --gate fails)."""
    from edgesmith.artifacts import load
    from edgesmith.data import load_texts
    from edgesmith.quality import check_gates, evaluate

    gates = _gates(gate)
    candidate = load(model)
    ref = reference_of(candidate, reference)
    texts, labels = [], None
    if candidate.task != "text-generation":
        rows = load_texts(data, text_field=text_field, label_field=label_field, limit=limit)
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
    if as_json:
        print_json({"model": candidate.name, "reference": ref.name, "metrics": metrics, "gate_failures": failures})
    else:
        table = Table(title=f"{candidate.name} against {ref.name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)
    if failures:
        raise GateFailed("; ".join(f"{f['metric']} {f['value']:.4f} vs {f['reference']:.4f} (limit {f['max_drop']})"
                                   for f in failures), failures)
