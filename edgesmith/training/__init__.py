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
process group (see :mod:`edgesmith.training.__main__`), e.g. ``torchrun --nproc_per_node 2 -m
edgesmith.training distill ...``.

The package: :mod:`~edgesmith.training.settings` (settings and results), :mod:`~edgesmith.training.ddp`
(ranks, devices, precision), :mod:`~edgesmith.training.batches` (the data),
:mod:`~edgesmith.training.checkpoints`, :mod:`~edgesmith.training.loop` (optimizer, schedule, progress
and :func:`train`).
"""

from edgesmith.training.batches import TextBatches, padded_batches
from edgesmith.training.checkpoints import (
    BEST,
    LAST,
    OPTIMIZER,
    STATE,
    WEIGHTS,
    Checkpoints,
    load_weights,
    save_weights,
)
from edgesmith.training.ddp import default_device, init_distributed, rank_zero_remove, resolve_precision, world
from edgesmith.training.loop import lr_factor, make_optimizer, train
from edgesmith.training.settings import TrainResult, TrainSettings, settings_dict

__all__ = ["BEST", "LAST", "OPTIMIZER", "STATE", "WEIGHTS", "Checkpoints", "TextBatches", "TrainResult",
           "TrainSettings", "default_device", "init_distributed", "load_weights", "lr_factor", "make_optimizer",
           "padded_batches", "rank_zero_remove", "resolve_precision", "save_weights", "settings_dict", "train",
           "world"]
