"""Encoder contenders in worker processes (``bench/encoder_worker.py``), seen from the orchestrator:
start one, hand it a shape's input batches, and time it block by block in ``rounds.run_block_rounds``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.core.workers import Worker

WORKER = Path(__file__).resolve().parents[1] / "encoder_worker.py"


def start(name: str, where: str | Path, runtime: str, threads: int, log_dir: Path, *, kind: str | None = None,
          timeout: float = 900.0) -> Worker:
    """A ready worker serving ``where`` (an artifact folder or a model name) on ``runtime``; raises with
    the worker's own reason when it cannot load."""
    cmd = [sys.executable, str(WORKER), "serve", "--artifact", str(where), "--runtime", runtime,
           "--threads", str(threads), *(["--kind", kind] if kind else [])]
    worker = Worker(name, cmd, log_dir, timeout, cwd=WORKER.parent.parent)
    if not worker.ready.get("ready"):
        worker.close()
        raise RuntimeError(worker.ready.get("error", "not ready"))
    return worker


def input_names(worker: Worker) -> list[str]:
    return list(worker.ready["info"]["input_names"])


def send_feeds(worker: Worker, key: str, feeds: list[dict[str, np.ndarray]], folder: Path) -> None:
    """The distinct input batches of one shape, saved once and loaded by the worker under ``key``."""
    path = folder / f"{worker.name}-{key}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"i{i}__{name}": a for i, f in enumerate(feeds) for name, a in f.items()})
    worker.request(op="feeds", key=key, path=str(path))


def block_runner(worker: Worker, key: str) -> Callable[[int, int], list[float]]:
    """``(block, warmup) -> latencies``: one block of the worker's runs on the batches of ``key``."""
    return lambda n, warmup: worker.request(op="block", key=key, n=n, warmup=warmup)["ms"]
