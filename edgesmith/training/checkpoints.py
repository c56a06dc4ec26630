"""Checkpoints of a training run (``last`` to resume from, ``best`` weights), each written atomically.

``last`` holds the weights, optimizer, scheduler and RNG states; ``best`` the best weights so far.
Nothing untrusted is unpickled: weights are safetensors, the rest is read with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

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
