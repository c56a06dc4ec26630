"""The content-addressed step cache.

A step's key is the SHA-256 of its input's content hash, the pass name, its resolved config and the
versions of the libraries that shape its output. Outputs are written to a temp folder and renamed
into place, so a killed run leaves no entry that looks finished; the next run clears the debris
and recomputes only what is missing.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.storage import remove_stale_temps, sha256_json

log = logging.getLogger(__name__)

#: distributions whose version changes what a pass produces
KEY_PACKAGES = ("edgesmith", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                "torch-pruning")


def default_cache_dir() -> Path:
    env = os.environ.get("EDGESMITH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgesmith"


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class StepCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.steps = self.root / "steps"
        self.steps.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(self.steps)
        if removed:
            log.info("removed %d unfinished cache entr%s left by an interrupted run", removed, "y" if removed == 1 else "ies")
        self._versions = package_versions()

    def key(self, input_hash: str, pass_name: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        return sha256_json({"input": input_hash, "pass": pass_name, "config": config,
                            "versions": self._versions, "extra": extra or {}})

    def path(self, key: str) -> Path:
        return self.steps / key

    def has(self, key: str) -> bool:
        return (self.path(key) / "edgesmith.json").exists()
