"""Named fault points: where a test makes edgesmith kill itself or wait, deterministically.

Code that commits work calls :func:`point` at its boundaries (``step:<id>:start``,
``step:<id>:computed``, ``step:<id>:stored``, ``scratch:<name>`` when a pass makes its scratch
folder, ``write:``/``commit:<folder name>`` around an atomic folder write, ``seal:<key>`` before a
cache entry is sealed, ``train:step:<n>`` after a training step and its checkpoint,
``run:<state>``, ``sweep:trial:<n>:told``, ``profile-worker:round:<n>``). With no
``EDGESMITH_FAULT`` in the environment a point does nothing. Otherwise the variable holds
comma-separated rules ``ACTION@PATTERN[#N]``: the N-th time (default: every time) a point whose
name matches the shell-style ``PATTERN`` is reached, ACTION runs:

- ``kill``: the process sends itself SIGKILL (what a user's ``kill -9``, an OOM kill or a power
  cut does: no cleanup code runs);
- ``pause``: the process writes ``<pid>.paused`` (holding the point's name) into
  ``EDGESMITH_FAULT_DIR`` and waits until a file ``release`` appears there, so a test can act
  while the process stands at a known place (start a second process, delete a folder).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import time
from pathlib import Path

ENV = "EDGESMITH_FAULT"
DIR_ENV = "EDGESMITH_FAULT_DIR"

_counts: dict[str, int] = {}


def point(name: str) -> None:
    """A fault point called ``name``; see the module's doc."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rule in spec.split(","):
        action, _, target = rule.strip().partition("@")
        pattern, _, nth = target.partition("#")
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        _counts[rule] = _counts.get(rule, 0) + 1
        if nth and _counts[rule] != int(nth):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "pause":
            _pause(name)


def _pause(name: str) -> None:
    folder = Path(os.environ.get(DIR_ENV) or ".")
    (folder / f"{os.getpid()}.paused").write_text(name + "\n")
    while not (folder / "release").exists():
        time.sleep(0.02)
