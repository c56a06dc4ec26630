"""The training loop (AdamW, warm-up and decay, bf16, evaluation and early stop, checkpoints, resume, DDP).

:func:`train` leaves the best weights in the objective; checkpoints give an exact resume, and under
torchrun the objective is wrapped in DistributedDataParallel."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from edgesmith.errors import BadInput
from edgesmith.faults import point
from edgesmith.training.batches import TextBatches
from edgesmith.training.checkpoints import Checkpoints, _gather_rng, _state_tensors, load_weights
from edgesmith.training.ddp import default_device, resolve_precision, world
from edgesmith.training.evaluations import Evaluations
from edgesmith.training.settings import TrainResult, TrainSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


#: a parameter attribute: its learning rate is the peak rate times this (quantization scales train faster)
LR_SCALE_ATTR = "edgesmith_lr_scale"


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors), nor on parameters that carry
    their own learning-rate factor (:data:`LR_SCALE_ATTR`), which get a group of their own."""
    decay, no_decay, scaled = [], [], {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        factor = getattr(param, LR_SCALE_ATTR, None)
        if factor is not None:
            scaled.setdefault(float(factor), []).append(param)
        else:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              *({"params": ps, "weight_decay": 0.0, "lr": settings.lr * f} for f, ps in sorted(scaled.items()))]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    warmup = int(settings.steps * settings.warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, settings.steps - warmup)
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class _Progress:
    """A rich bar with loss and samples/s; does nothing when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, label: str = "train"):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.errors import LiveError
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
                            TextColumn("val {task.fields[val]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        try:
            self.bar.start()
        except LiveError as exc:  # another live display is active
            log.debug("no progress bar: %s", exc)
            self.bar = None
            return
        self.task = self.bar.add_task("train", total=total, completed=done, loss="-", speed="-", val="-")

    def update(self, step: int, loss: float, speed: float, val: float | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", speed=f"{speed:.1f}",
                            val="-" if val is None else f"{val:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(objective: nn.Module, data: TextBatches, settings: TrainSettings, *,
          evaluate: Callable[[nn.Module], float], checkpoint_dir: Path | None = None, key: str = "",
          progress: bool = False, device: torch.device | None = None,
          on_step: Callable[[int], None] | None = None, label: str = "train") -> TrainResult:
    """Train ``objective`` in place and leave the best weights (by ``evaluate``) in it.

    ``evaluate(objective)`` returns a validation metric, higher is better; it runs at step 0, every
    ``eval_every`` steps and at the end. ``checkpoint_dir`` with ``key`` (a fingerprint of the
    inputs) enables checkpoints and resume. ``on_step(step)`` is called after each finished step
    (and its evaluation and checkpoint); an exception raised there stops training on the spot, as
    a kill would.
    """
    settings.check()
    rank, world_size = world()
    if settings.batch_size < world_size:
        raise BadInput(f"training: batch_size {settings.batch_size} is smaller than the {world_size} processes")
    device = device or default_device()
    precision = resolve_precision(settings.precision, device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed * 7919 + rank)
        return _train(objective, data, settings, evaluate=evaluate, checkpoint_dir=checkpoint_dir, key=key,
                      progress=progress and rank == 0, device=device, precision=precision,
                      on_step=on_step, rank=rank, world_size=world_size, label=label)


def _train(objective: nn.Module, data: TextBatches, settings: TrainSettings, *, evaluate, checkpoint_dir, key,
           progress, device, precision, on_step, rank, world_size, label) -> TrainResult:
    objective.to(device)
    model = _distributed(objective, device, world_size)
    optimizer = make_optimizer(objective, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    checkpoints = Checkpoints(checkpoint_dir, key) if checkpoint_dir is not None else None
    evals = Evaluations(settings.min_delta)
    resumed = _resume(checkpoints, evals, objective, optimizer, scheduler, rank, world_size)
    start = 0 if resumed is None else resumed

    def run_eval(step: int) -> float:
        objective.eval()
        with torch.no_grad(), _autocast(device, precision):
            metric = float(evaluate(objective))
        objective.train()
        if evals.record(step, metric):
            evals.best_state = _state_tensors(objective)
            if checkpoints and rank == 0:
                checkpoints.write_best(objective, step, metric)
        return metric

    objective.train()
    if resumed is None:
        run_eval(0)
    bar = _Progress(progress, settings.steps, start, label)
    started, samples, step, stopped_early = time.perf_counter(), 0, start, False
    try:
        for step in range(start + 1, settings.steps + 1):
            last_loss, n = _one_step(model, objective, optimizer, scheduler, data, settings, step - 1, device,
                                     precision, rank, world_size)
            samples += n * world_size
            evals.losses.append(last_loss)
            metric = None
            if step % settings.eval_every == 0 or step == settings.steps:
                metric = run_eval(step)
                stopped_early = evals.out_of_patience(settings.patience)
            if checkpoints and settings.checkpoint_every and step % settings.checkpoint_every == 0:
                rng = _gather_rng(world_size)
                if rank == 0:
                    checkpoints.write_last(objective, optimizer, scheduler, rng, evals.state(step))
            bar.update(step, last_loss, samples / max(1e-9, time.perf_counter() - started), metric)
            point(f"train:step:{step}")
            if on_step is not None:
                on_step(step)
            if stopped_early:
                log.info("early stop at step %d: no improvement in %d evaluations", step, settings.patience)
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    _restore_best(objective, evals.best_state, checkpoints)
    first = evals.first_metric
    return TrainResult(steps_run=step, best_step=evals.best_step, best_metric=evals.best_metric,
                       first_metric=float(first if first is not None else evals.best_metric),
                       history=evals.history, timeline=evals.timeline, seconds=seconds,
                       samples_per_second=samples / max(seconds, 1e-9), stopped_early=stopped_early,
                       resumed_from=resumed, precision=precision, world_size=world_size)


def _distributed(objective: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The objective itself, or wrapped in DistributedDataParallel under torchrun."""
    if world_size == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _resume(checkpoints: Checkpoints | None, evals: Evaluations, objective: nn.Module, optimizer, scheduler,
            rank: int, world_size: int) -> int | None:
    """Restore the last checkpoint, if any (after rank 0 has recovered a half-written one); returns the
    step it resumes from, or None for a fresh start."""
    if checkpoints is None:
        return None
    if rank == 0:
        checkpoints.recover()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    saved = checkpoints.last_state()
    if saved is None:
        return None
    checkpoints.restore(objective, optimizer, scheduler, rank)
    start = evals.resume(saved)
    log.info("resuming from the checkpoint at step %d (%s)", start, checkpoints.folder)
    return start


def _restore_best(objective: nn.Module, best_state: dict[str, torch.Tensor] | None,
                  checkpoints: Checkpoints | None) -> None:
    if best_state is not None:
        objective.load_state_dict(best_state)
    elif checkpoints is not None and checkpoints.best_weights() is not None:
        # resumed after the best evaluation: the best weights are only on disk
        load_weights(objective, checkpoints.best_weights())
    objective.eval()


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _one_step(model, objective, optimizer, scheduler, data: TextBatches, settings: TrainSettings, step: int,
              device, precision, rank, world_size) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` batches; returns the mean loss and rows seen here."""
    optimizer.zero_grad(set_to_none=True)
    total, rows = 0.0, 0
    for micro in range(settings.grad_accum):
        batch = {k: v.to(device) for k, v in data.batch(step * settings.grad_accum + micro, rank, world_size).items()}
        last = micro == settings.grad_accum - 1
        sync = model.no_sync() if (world_size > 1 and not last) else nullcontext()
        with sync:
            with _autocast(device, precision):
                out = model(batch)
            loss = out["loss"].float() / settings.grad_accum
            loss.backward()
        total += float(loss.detach())
        rows += int(batch["input_ids"].shape[0])
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), settings.grad_clip)
    optimizer.step()
    scheduler.step()
    if world_size > 1:
        import torch.distributed as dist

        value = torch.tensor([total], device=device)
        dist.all_reduce(value)
        total = float(value) / world_size
    return total, rows
