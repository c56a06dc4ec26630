"""The local backend: builds in ``parallel`` spawned worker processes (in-process when 1), profiles
in the driver process, which starts one only while no build runs."""

from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any

from edgesmith.sweep.trials import build_trial, profile_trial


def _done(value: Any) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_result(value)
    return future


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class LocalBackend:
    """``parallel`` worker processes for builds (in-process when 1); profiles run in the driver.

    ``profile_needs_quiet`` tells the scheduler to start a profile only when no build is running."""

    profile_needs_quiet = True

    def __init__(self, parallel: int):
        self.parallel = max(1, parallel)
        self.pool: cf.ProcessPoolExecutor | None = None
        if self.parallel > 1:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // self.parallel)
            self.pool = cf.ProcessPoolExecutor(self.parallel, mp_context=mp.get_context("spawn"),
                                               initializer=_worker_init, initargs=(threads,))

    def describe(self) -> str:
        return f"local, {self.parallel} worker{'s' if self.parallel > 1 else ''}"

    def submit_build(self, task: dict[str, Any]) -> cf.Future:
        if self.pool is None:
            return _done(build_trial(task))
        return self.pool.submit(build_trial, task)

    def submit_profile(self, task: dict[str, Any]) -> cf.Future:
        return _done(profile_trial(task))

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
