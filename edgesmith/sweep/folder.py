"""The sweep folder: the names of the files in it, a new folder per sweep, the claim of a folder by
its driver process, and the step cache the trials share."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path

from edgesmith.errors import BadInput
from edgesmith.storage import write_json_atomic

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
STUDY_FILE = "study.journal"
META_FILE = "sweep.json"
PARETO_FILE = "pareto.json"
TRIALS_DIR = "trials"


def _new_folder(root: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / f"{name}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{stamp}-{n}"
    return candidate


def claim_folder(folder: Path) -> None:
    """Record this process as the sweep's driver. A driver still alive elsewhere is refused; the
    journal's lock file left by a killed driver is removed (it would hold the study for 30 s)."""
    from edgesmith.storage import _pid_alive

    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    pid = meta.get("pid")
    if pid and pid != os.getpid() and _pid_alive(int(pid)):
        raise BadInput(f"{folder}: the sweep is running in process {pid}; wait for it or stop it first")
    lock = folder / (STUDY_FILE + ".lock")
    if lock.is_symlink() or lock.exists():
        lock.unlink()
        log.info("removed the journal lock left by a stopped sweep")
    write_json_atomic(meta_path, {**meta, "pid": os.getpid()})


def _cache_for(cache_dir: str | Path | None, folder: Path, ray: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).resolve()
    if ray is not None:
        return folder / "cache"  # the sweep folder must be shared by all nodes anyway
    from edgesmith.cache import default_cache_dir

    return default_cache_dir().resolve()
