"""A small, reusable training loop for passes that train (distillation, early-exit heads).

The loop trains an *objective*: an ``nn.Module`` whose ``forward(batch)`` returns a dict with a
scalar ``"loss"`` (and any other scalars worth logging). Everything else is the loop's job:

- AdamW, linear warm-up then linear or cosine decay, gradient clipping and accumulation;
- bf16 autocast where the hardware supports it (``precision="auto"``: CUDA with bf16 only);
- data: texts tokenised once, batches padded to their longest row (dynamic padding) and drawn
  from length buckets, in an order that is a pure function of (seed, step), so a resumed run
  sees exactly the batches an uninterrupted one would;
- evaluation every N steps (higher is better), early stop after ``patience`` evaluations without
  improvement, and the best weights as the result;
- checkpoints every N steps into a folder (weights as safetensors; optimizer, scheduler and RNG
  state as plain tensors and dicts read back with ``torch.load(weights_only=True)``), and an
  exact resume from the last one after a kill;
- DistributedDataParallel when started under ``torchrun`` (gloo on CPU, NCCL on GPUs): each rank
  takes its share of every global batch, evaluation runs on every rank (same weights, same texts,
  same decision) and rank 0 writes the checkpoints.

``python -m edgesmith.training PASS MODEL --options JSON --output FOLDER`` runs one pass under the
process group (see :func:`main`), e.g. ``torchrun --nproc_per_node 2 -m edgesmith.training distill
...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edgesmith.errors import BadInput
from edgesmith.storage import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

LAST = "last"
BEST = "best"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


# ---------------------------------------------------------------------------------------------
# Settings and results
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """How to train. ``steps`` counts optimizer steps; a step consumes ``grad_accum`` batches."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    eval_every: int = 50
    patience: int | None = None
    min_delta: float = 1e-4
    checkpoint_every: int | None = None
    max_length: int = 128
    bucket_batches: int = 50

    def check(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "max_length": self.max_length,
                    "bucket_batches": self.bucket_batches}
        for name, value in positive.items():
            if value < 1:
                raise BadInput(f"training: {name} must be at least 1 (got {value})")
        if self.lr <= 0:
            raise BadInput(f"training: lr must be above 0 (got {self.lr})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise BadInput(f"training: warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.patience is not None and self.patience < 1:
            raise BadInput(f"training: patience must be at least 1 evaluation (got {self.patience})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise BadInput(f"training: checkpoint_every must be at least 1 (got {self.checkpoint_every})")


@dataclass
class TrainResult:
    steps_run: int
    best_step: int
    best_metric: float
    first_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    stopped_early: bool = False
    resumed_from: int | None = None
    precision: str = "fp32"
    world_size: int = 1


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call created it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. 'auto' picks bf16 only on a CUDA device that supports it."""
    if precision == "fp32":
        return "fp32"
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if device.type == "cuda" and not cuda_bf16:
        raise BadInput("precision bf16: this GPU does not support bfloat16; use precision fp32 or auto")
    return "bf16"


# ---------------------------------------------------------------------------------------------
# Data: tokenised once, dynamic padding, length buckets, order = f(seed, step)
# ---------------------------------------------------------------------------------------------


class TextBatches:
    """Training batches of tokenised texts.

    Each epoch is a permutation drawn from ``(seed, epoch)``; the permutation is cut into chunks
    of ``bucket_batches`` batches, each chunk sorted by length and split into batches (so a batch
    holds texts of similar length and pads little), and the batches are shuffled. ``batch(step)``
    is a pure function of the step: resuming needs no data-loader state.
    """

    def __init__(self, tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int, seed: int,
                 input_names: Sequence[str], labels: Sequence[int] | None = None, bucket_batches: int = 50):
        if not texts:
            raise BadInput("no training texts; give a data file with at least a batch of texts")
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids: list[list[int]] = enc["input_ids"]
        self.labels = list(labels) if labels is not None else None
        self.batch_size = min(batch_size, len(self.ids))
        self.seed = seed
        self.input_names = list(input_names)
        self.bucket_batches = bucket_batches
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad)
        self.batches_per_epoch = max(1, len(self.ids) // self.batch_size)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.ids), generator=gen).tolist()
        order = order[: self.batches_per_epoch * self.batch_size]
        chunk = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: len(self.ids[i]))
            batches.extend(part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size))
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in shuffle]
        self._epoch_cache = (epoch, batches)
        return batches

    def indices(self, micro_step: int) -> list[int]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return self._epoch(epoch)[index]

    def batch(self, micro_step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """The ``micro_step``-th batch, this rank's share of it, padded to its longest row."""
        rows = self.indices(micro_step)[rank::world_size]
        return self.collate(rows)

    def collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = self.ids[i]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in rows], dtype=torch.long)
        return batch


def padded_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int,
                   input_names: Sequence[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Evaluation batches in length order, each with the positions of its texts in ``texts``."""
    data = TextBatches(tokenizer, texts, batch_size=batch_size, max_length=max_length, seed=0,
                       input_names=input_names)
    order = sorted(range(len(texts)), key=lambda i: len(data.ids[i]))
    return [(order[s:s + batch_size], data.collate(order[s:s + batch_size]))
            for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
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
# Checkpoints (nothing untrusted is unpickled: safetensors, and torch.load(weights_only=True))
# ---------------------------------------------------------------------------------------------


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(module, str(path))


def load_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(module, str(path), strict=False)
    if unexpected or [m for m in missing if m in dict(module.named_parameters())]:
        raise BadInput(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); delete the checkpoint folder to start afresh")


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _gather_rng(world_size: int) -> list[dict[str, torch.Tensor]]:
    if world_size == 1:
        return [_rng_states()]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in _rng_states().items()})
    return gathered


class Checkpoints:
    """``folder/last`` (resume point) and ``folder/best`` (best weights so far), each atomic."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key

    def recover(self) -> None:
        """Tidy up after a kill: put back a checkpoint caught between its two renames, then remove
        half-written temporaries."""
        from edgesmith.storage import remove_stale_temps

        if not self.folder.is_dir():
            return
        for name in (LAST, BEST):
            if not (self.folder / name).exists():
                olds = sorted(self.folder.glob(f".old-*-{name}"))
                if olds:
                    os.replace(olds[-1], self.folder / name)
        remove_stale_temps(self.folder)

    def write_best(self, module: nn.Module, step: int, metric: float) -> None:
        with atomic_dir(self.folder / BEST) as tmp:
            save_weights(module, tmp / WEIGHTS)
            write_json_atomic(tmp / STATE, {"key": self.key, "step": step, "metric": metric})

    def write_last(self, module: nn.Module, optimizer, scheduler, rng: list[dict[str, torch.Tensor]],
                   state: dict[str, Any]) -> None:
        with atomic_dir(self.folder / LAST) as tmp:
            save_weights(module, tmp / WEIGHTS)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
            for rank, states in enumerate(rng):
                torch.save(states, tmp / f"rng-{rank}.pt")
            write_json_atomic(tmp / STATE, {"key": self.key, **state})

    def last_state(self) -> dict[str, Any] | None:
        path = self.folder / LAST / STATE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        if state.get("key") != self.key:
            log.warning("checkpoint in %s belongs to other inputs; starting afresh", self.folder)
            return None
        return state

    def restore(self, module: nn.Module, optimizer, scheduler, rank: int) -> None:
        last = self.folder / LAST
        load_weights(module, last / WEIGHTS)
        saved = torch.load(last / OPTIMIZER, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng_file = last / f"rng-{rank}.pt"
        if not rng_file.exists():
            raise BadInput(f"{last}: no RNG state for rank {rank}; the checkpoint was written by a run with "
                           "fewer processes; delete the folder to start afresh")
        _set_rng_states(torch.load(rng_file, weights_only=True))

    def best_weights(self) -> Path | None:
        path = self.folder / BEST / WEIGHTS
        state = self.folder / BEST / STATE
        if path.exists() and state.exists() and json.loads(state.read_text()).get("key") == self.key:
            return path
        return None


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
    model: nn.Module = objective
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    optimizer = make_optimizer(objective, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    checkpoints = Checkpoints(checkpoint_dir, key) if checkpoint_dir is not None else None

    losses: list[float] = []  # training losses since the last evaluation
    start, history, best_step, best_metric, bad_evals, first_metric, resumed = 0, [], 0, -math.inf, 0, None, None
    best_state: dict[str, torch.Tensor] | None = None
    if checkpoints and rank == 0:
        checkpoints.recover()
    if checkpoints and world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    saved = checkpoints.last_state() if checkpoints else None
    if saved is not None:
        checkpoints.restore(objective, optimizer, scheduler, rank)
        start, history = int(saved["step"]), list(saved["history"])
        best_step, best_metric, bad_evals = int(saved["best_step"]), float(saved["best_metric"]), int(saved["bad_evals"])
        first_metric, resumed = float(saved["first_metric"]), start
        losses.extend(saved.get("pending_losses", []))
        log.info("resuming from the checkpoint at step %d (%s)", start, checkpoint_dir)

    def run_eval(step: int) -> float:
        nonlocal best_step, best_metric, bad_evals, best_state, first_metric
        objective.eval()
        with torch.no_grad(), _autocast(device, precision):
            metric = float(evaluate(objective))
        objective.train()
        entry = {"step": step, "metric": metric}
        if losses:
            entry["loss"] = sum(losses) / len(losses)  # mean training loss since the last evaluation
            losses.clear()
        history.append(entry)
        if first_metric is None:
            first_metric = metric
        # patience counts evaluations that improve on the best by less than min_delta
        bad_evals = 0 if metric > best_metric + settings.min_delta else bad_evals + 1
        if metric > best_metric:
            best_step, best_metric = step, metric
            best_state = _state_tensors(objective)
            if checkpoints and rank == 0:
                checkpoints.write_best(objective, step, metric)
        return metric

    objective.train()
    if saved is None:
        run_eval(0)
    bar = _Progress(progress, settings.steps, start, label)
    started, samples, step, stopped_early, last_loss = time.perf_counter(), 0, start, False, float("nan")
    try:
        for step in range(start + 1, settings.steps + 1):
            last_loss, n = _one_step(model, objective, optimizer, scheduler, data, settings, step - 1, device,
                                     precision, rank, world_size)
            samples += n * world_size
            losses.append(last_loss)
            metric = None
            if step % settings.eval_every == 0 or step == settings.steps:
                metric = run_eval(step)
                if settings.patience is not None and bad_evals >= settings.patience:
                    stopped_early = True
            if checkpoints and settings.checkpoint_every and step % settings.checkpoint_every == 0:
                rng = _gather_rng(world_size)
                if rank == 0:
                    checkpoints.write_last(objective, optimizer, scheduler, rng, {
                        "step": step, "history": history, "best_step": best_step, "best_metric": best_metric,
                        "bad_evals": bad_evals, "first_metric": first_metric, "pending_losses": losses})
            bar.update(step, last_loss, samples / max(1e-9, time.perf_counter() - started), metric)
            if on_step is not None:
                on_step(step)
            if stopped_early:
                log.info("early stop at step %d: no improvement in %d evaluations", step, settings.patience)
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    _restore_best(objective, best_state, checkpoints)
    return TrainResult(steps_run=step, best_step=best_step, best_metric=best_metric,
                       first_metric=float(first_metric if first_metric is not None else best_metric),
                       history=history, seconds=seconds, samples_per_second=samples / max(seconds, 1e-9),
                       stopped_early=stopped_early, resumed_from=resumed, precision=precision,
                       world_size=world_size)


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


def rank_zero_remove(folder: Path) -> None:
    """Remove ``folder`` once every rank is done with it (rank 0 removes it)."""
    import shutil

    rank, world_size = world()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)


# ---------------------------------------------------------------------------------------------
# Entry point: one pass under the process group torchrun sets up
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m edgesmith.training PASS MODEL --options JSON --output FOLDER [--rank-weights DIR]``.

    Under ``torchrun --nproc_per_node N`` every process runs the pass (DDP inside the loop); rank 0
    saves the result to ``--output``. ``--rank-weights`` makes every rank write its final weights
    to ``DIR/rank<r>.safetensors`` (to check that all ranks agree).
    """
    parser = argparse.ArgumentParser(prog="python -m edgesmith.training", description=main.__doc__)
    parser.add_argument("pass_name")
    parser.add_argument("model")
    parser.add_argument("--options", default="{}", help="the pass's options as JSON")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rank-weights", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("EDGESMITH_VERBOSE") else logging.WARNING)

    from edgesmith.artifacts import load
    from edgesmith.compress.base import Context, get_pass
    from edgesmith.errors import EdgesmithError

    created = init_distributed()
    try:
        model = load(args.model)
        out = get_pass(args.pass_name)(**json.loads(args.options))(model, Context(source=model, progress=False))
        rank, _ = world()
        if args.rank_weights is not None:
            args.rank_weights.mkdir(parents=True, exist_ok=True)
            save_weights(out.module, args.rank_weights / f"rank{rank}.safetensors")
        if rank == 0:
            out.save(args.output)
            print(json.dumps({"output": str(args.output), "report": out.lineage[-1]["report"]}, default=str))
    except EdgesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
