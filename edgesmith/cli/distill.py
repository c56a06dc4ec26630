"""``edgesmith distill``: recover what pruning cost, or train a shallower copy, as a one-pass run."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.common import CACHE_DIR, JSON_OUT
from edgesmith.cli.root import app
from edgesmith.cli.shortcut import ONE_PASS_RUNS_DIR, run_one_pass
from edgesmith.errors import BadInput

LOSS_NAMES = ("cosine", "kl", "hidden_mse", "attention", "task")
LOSS = typer.Option([], "--loss", help="Loss and weight, repeatable: cosine, kl, hidden_mse=0.1, attention=0.1, task.")
OUTPUT = typer.Option(None, "--output", "-o", help="Copy the result to this folder.")


def parse_losses(values: list[str]) -> dict[str, float] | None:
    """``["cosine", "hidden_mse=0.1"]`` → ``{"cosine": 1.0, "hidden_mse": 0.1}``."""
    if not values:
        return None
    losses: dict[str, float] = {}
    for value in values:
        name, _, weight = value.partition("=")
        if name not in LOSS_NAMES:
            raise BadInput(f"--loss {value}: unknown loss '{name}'; use one of {', '.join(LOSS_NAMES)} (e.g. cosine=1)")
        try:
            losses[name] = float(weight) if weight else 1.0
        except ValueError as exc:
            raise BadInput(f"--loss {value}: the weight '{weight}' is not a number (e.g. hidden_mse=0.1)") from exc
    return losses


def parse_layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise BadInput(f"--keep-layers {value}: give comma-separated layer indices, e.g. 1,3,5") from exc


@app.command("distill")
def distill_command(
    student: str = typer.Argument("minilm", help="Student model folder (a pruned model, say), or 'minilm'."),
    teacher: str | None = typer.Option(None, "--teacher", help="Teacher model folder (default: the student's own "
                                                                 "source, for --every-k / --keep-layers)."),
    data: str = typer.Option("builtin:wordnet", "--data", help="Training texts: .jsonl/.csv/.parquet/.txt or builtin:wordnet."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str | None = typer.Option(None, "--label-field", help="Labels for the task loss."),
    limit: int | None = typer.Option(None, "--limit", help="Use at most this many rows of the data."),
    steps: int = typer.Option(200, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    schedule: str = typer.Option("linear", "--schedule", help="linear, cosine or constant decay after warm-up."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPUs that support it), fp32, bf16."),
    loss: list[str] = LOSS,
    temperature: float = typer.Option(2.0, "--temperature", help="Softening of the logits for the kl loss."),
    every_k: int | None = typer.Option(None, "--every-k", help="Student = the teacher's every k-th layer."),
    keep_layers: str | None = typer.Option(None, "--keep-layers", help="Student = these teacher layers, e.g. 1,3,5."),
    eval_every: int = typer.Option(50, "--eval-every"),
    eval_texts: int = typer.Option(256, "--eval-texts", help="Rows held out for validation (the first rows)."),
    patience: int | None = typer.Option(None, "--patience", help="Stop after N evaluations without improvement."),
    checkpoint_every: int | None = typer.Option(100, "--checkpoint-every", help="Checkpoint interval (resume after a kill)."),
    max_length: int = typer.Option(128, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    output: Path | None = OUTPUT,
    runs_dir: Path | None = ONE_PASS_RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Distil a teacher into a student (cosine on embeddings for encoders, KL on logits for classifiers)."""
    kept = parse_layers(keep_layers)
    if teacher is None and every_k is None and kept is None:
        raise BadInput("distill: give --teacher MODEL to recover a pruned student, or --every-k / --keep-layers "
                       "to train a shallower copy of the model")
    options = {
        "teacher": teacher, "data": data, "text_field": text_field, "label_field": label_field, "limit": limit,
        "steps": steps, "batch_size": batch_size, "lr": lr, "schedule": schedule, "warmup_ratio": warmup_ratio,
        "grad_accum": grad_accum, "precision": precision, "losses": parse_losses(loss), "temperature": temperature,
        "every_k": every_k, "keep_layers": kept, "eval_every": eval_every, "eval_texts": eval_texts,
        "patience": patience, "checkpoint_every": checkpoint_every, "max_length": max_length, "seed": seed,
    }
    options = {k: v for k, v in options.items() if v is not None}
    # the pipeline evaluates against the run's model: meaningful only when that model is the teacher
    # (a shallower copy); with --teacher the pass's own report holds fidelity to the teacher.
    # Its evaluation texts are the data's first rows: the rows the pass holds out.
    run_one_pass(student, "distill", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir,
                 as_json=as_json, evaluate=teacher is None, texts=eval_texts, data=data,
                 data_options={"text_field": text_field, **({"label_field": label_field} if label_field else {})})
