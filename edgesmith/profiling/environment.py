"""The environment fingerprint a profile records: the machine, its OS and the library versions.

A latency is only meaningful next to what produced it: the CPU model and core count, the threads
the runtime used, the kernel, Python and the versions of the libraries that run the model, and
the GPU with its driver when one is present.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

#: distributions whose versions a profile records (a missing one is recorded as null)
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "edgesmith")
#: of these, the ones recorded even when absent (so a reader sees "not installed", not "not asked")
CORE_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "edgesmith")

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    count: int = 1
    driver: str | None = None
    cuda: str | None = None
    memory_mb: float | None = None


class Environment(BaseModel):
    """Where a profile was measured."""

    model_config = ConfigDict(extra="forbid")

    cpu_model: str
    cores: int | None
    threads: int | None  # threads the runtime used; None: the runtime's own default
    os: str
    kernel: str
    machine: str
    python: str
    libraries: dict[str, str | None]
    gpu: GpuInfo | None = None
    # recorded for devices profiled over SSH (None where unknown; absent from older profiles)
    host: str | None = None
    uname: str | None = None
    memory_mb: float | None = None
    l4t_release: str | None = None  # Jetson: first line of /etc/nv_tegra_release
    power_mode: str | None = None  # Jetson: `nvpmodel -q`
    clocks: str | None = None  # Jetson: `jetson_clocks --show`


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def os_name() -> str:
    """The distribution's pretty name (Linux), else ``platform``'s system and release."""
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{platform.system()} {platform.release()}".strip()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in LIBRARIES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist in CORE_LIBRARIES:
                versions[dist] = None
    if versions.get("edgesmith") is None:  # run from a source tree that was never installed
        from edgesmith.version import __version__

        versions["edgesmith"] = __version__
    return versions


def nvidia_driver() -> str | None:
    """The NVIDIA driver version, from the kernel module or nvidia-smi; None when neither answers."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text(encoding="utf-8", errors="replace")
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            first = out.stdout.strip().splitlines()
            if out.returncode == 0 and first:
                return first[0].strip()
        except (OSError, subprocess.SubprocessError):
            log.debug("nvidia-smi did not answer", exc_info=True)
    return None


def gpu_info() -> GpuInfo | None:
    """The first CUDA device as torch sees it, or None when torch has no usable CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=props.name, count=torch.cuda.device_count(), driver=nvidia_driver(),
                   cuda=torch.version.cuda, memory_mb=round(props.total_memory / 2**20, 1))


def fingerprint(threads: int | None = None) -> Environment:
    """Describe this machine; ``threads`` is the thread count the runtime used (None: its default)."""
    return Environment(
        cpu_model=cpu_model(),
        cores=os.cpu_count(),
        threads=threads,
        os=os_name(),
        kernel=platform.release(),
        machine=platform.machine(),
        python=platform.python_version(),
        libraries=library_versions(),
        gpu=gpu_info(),
    )
