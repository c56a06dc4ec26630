"""The environment fingerprint a profile records: the machine, its OS and the library versions.

A latency is only meaningful next to what produced it: the CPU model, its instruction-set
extensions and core count, the threads the runtime used, the kernel, Python and the versions of
the libraries that run the model, and the GPU with its driver when one is present.

The machine facts come from the device agent's standard-library functions
(:mod:`edgesmith.profiling.agent`), so a local profile and a device's remote one describe the
machine the same way; here they become a typed :class:`Environment`.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

from edgesmith.profiling import agent
from edgesmith.profiling.agent import cpu_model, isa_flags, isa_summary, memory_mb, nvidia_driver, os_name

log = logging.getLogger(__name__)

#: distributions whose versions a profile records (a missing one is recorded as null)
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "edgesmith")
#: of these, the ones recorded even when absent (so a reader sees "not installed", not "not asked")
CORE_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "edgesmith")

__all__ = ["CORE_LIBRARIES", "LIBRARIES", "Environment", "GpuInfo", "cpu_model", "fingerprint", "gpu_info",
           "isa_flags", "isa_summary", "library_versions", "memory_mb", "nvidia_driver", "os_name"]


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
    # host and uname: recorded for devices profiled over SSH; the rest below for every profile (None where
    # unknown; absent from older profiles)
    host: str | None = None
    uname: str | None = None
    memory_mb: float | None = None
    isa_flags: list[str] | None = None  # the CPU's extensions of agent.ISA_FLAGS (absent from older profiles)
    l4t_release: str | None = None  # Jetson: first line of /etc/nv_tegra_release
    power_mode: str | None = None  # Jetson: `nvpmodel -q`
    clocks: str | None = None  # Jetson: `jetson_clocks --show`


def library_versions() -> dict[str, str | None]:
    versions = agent.library_versions(LIBRARIES, CORE_LIBRARIES)
    if versions.get("edgesmith") is None:  # run from a source tree that was never installed
        from edgesmith.version import __version__

        versions["edgesmith"] = __version__
    return versions


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
    """Describe this machine (the agent's :func:`~edgesmith.profiling.agent.machine`, this process's
    libraries, the GPU torch sees); ``threads`` is the thread count the runtime used (None: its default)."""
    return Environment(**agent.machine(threads), libraries=library_versions(), gpu=gpu_info())
