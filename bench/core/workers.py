"""One contender in a process of its own: the orchestrator's side of the JSON-lines worker protocol.

The worker (``bench/llm_worker.py`` for decoders, ``bench/encoder_worker.py`` for encoders) loads its
model once and answers one JSON line per request on its original stdout (the worker points fd 1 at
stderr, so a library that prints cannot corrupt the protocol); the first line says it is ready. Its
stderr goes to ``LOG_DIR/NAME.log``. A worker runs with its runtime's own threading and its own
peak RSS, and a crash or hang stays in it (a failed row, not a failed benchmark).
"""

from __future__ import annotations

import json
import logging
import select
import shlex
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.workers")


class Worker:
    def __init__(self, name: str, cmd: list[str], log_dir: Path, timeout: float, cwd: Path | None = None) -> None:
        self.name, self.timeout = name, timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{name}.log"
        self._stderr = self.stderr_path.open("w")
        log.info("worker %s: %s", name, " ".join(shlex.quote(c) for c in cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=cwd)
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"{self.name}: no answer within {self.timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{self.name} exited (code {self.proc.poll()}): {' / '.join(tail)[-400:]}")
        return json.loads(line)

    def request(self, **req) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.name} {req.get('op')}: {answer['error']}")
        return answer

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.request(op="quit")
                self.proc.wait(timeout=30)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
