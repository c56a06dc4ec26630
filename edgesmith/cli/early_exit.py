"""``edgesmith early-exit``: exit heads, a calibrated exit policy and ONNX segments, as a one-pass run."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.common import CACHE_DIR, JSON_OUT
from edgesmith.cli.distill import OUTPUT
from edgesmith.cli.root import app
from edgesmith.cli.shortcut import ONE_PASS_RUNS_DIR, run_one_pass
from edgesmith.early_exit.policy import POLICIES, Budget
from edgesmith.errors import BadInput


def parse_exits(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise BadInput(f"--exits {value}: give comma-separated layer numbers (1-based), e.g. 2,3,4,5") from exc


@app.command("early-exit")
def early_exit_command(
    model: str = typer.Argument(..., help="Classifier or encoder folder (BERT family), or 'minilm'."),
    data: str = typer.Option(..., "--data", help="Texts to train and calibrate on: .jsonl/.csv/.parquet/.txt or "
                                                 "builtin:wordnet."),
    budget: str | None = typer.Option(None, "--budget", help="accuracy=MAX_DROP (classifiers, default 0.01) or "
                                                             "cosine=MIN (encoders, default 0.98)."),
    policy: str | None = typer.Option(None, "--policy", help=f"One of {', '.join(POLICIES)} (default: entropy for "
                                                             "classifiers, agreement for encoders)."),
    exits: str | None = typer.Option(None, "--exits", help="Layers after which an exit sits, e.g. 2,3,4,5 "
                                                           "(default: every layer from the 2nd)."),
    thresholds: str = typer.Option("per-exit", "--thresholds", help="per-exit (one calibrated threshold per exit) "
                                                                    "or shared (one for every exit)."),
    train: str = typer.Option("frozen", "--train", help="frozen (heads only) or joint (backbone too)."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str | None = typer.Option(None, "--label-field", help="Labels: the accuracy budget is then "
                                                                       "measured on them."),
    limit: int | None = typer.Option(None, "--limit", help="Use at most this many rows of the data."),
    validation: int = typer.Option(1000, "--validation", help="First rows held out to calibrate the thresholds."),
    steps: int = typer.Option(600, "--steps", help="Exit-head training steps."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Checkpoint interval (resume after a kill)."),
    max_length: int = typer.Option(128, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    output: Path | None = OUTPUT,
    runs_dir: Path | None = ONE_PASS_RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Add exit heads, train them by self-distillation, calibrate the exit thresholds to a budget, export segments."""
    if policy is not None and policy not in POLICIES:
        raise BadInput(f"--policy {policy}: use one of {', '.join(POLICIES)}")
    if thresholds not in ("per-exit", "shared"):
        raise BadInput(f"--thresholds {thresholds}: use per-exit or shared")
    if train not in ("frozen", "joint"):
        raise BadInput(f"--train {train}: use frozen or joint")
    if budget is not None:
        Budget.parse(budget)
    options = {
        "data": data, "budget": budget, "policy": policy, "exits": parse_exits(exits), "train": train,
        "thresholds": thresholds,
        "text_field": text_field, "label_field": label_field, "limit": limit, "validation": validation,
        "steps": steps, "batch_size": batch_size, "lr": lr, "checkpoint_every": checkpoint_every,
        "max_length": max_length, "seed": seed,
    }
    options = {k: v for k, v in options.items() if v is not None}
    # the run evaluates the result against the model on the data's first rows: the calibration rows
    run_one_pass(model, "early-exit", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir,
                 as_json=as_json, evaluate=True, texts=min(validation, 256), data=data,
                 data_options={"text_field": text_field, **({"label_field": label_field} if label_field else {})})
