"""What is here for TensorRT: its version (from the bindings, or from libnvinfer without them) and
the GPU (name and compute capability); an engine records both and runs only where they match."""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from edgesmith.errors import BadInput, first_line

log = logging.getLogger(__name__)

NOT_INSTALLED = ("tensorrt is not installed (its wheels come only from NVIDIA's package index: "
                 "pip install --extra-index-url https://pypi.nvidia.com 'edgesmith[tensorrt]')")
#: shared libraries that answer getInferLibVersion() when the Python bindings are absent
NVINFER_LIBRARIES = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")


# ---------------------------------------------------------------------------------------------
# What is here: TensorRT version and GPU
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """What an engine is specific to: the TensorRT version and the GPU (name, compute capability)."""

    tensorrt_version: str | None
    gpu_name: str | None
    compute_capability: str | None  # "9.0"

    def as_dict(self) -> dict[str, str | None]:
        return {"tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability}


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BadInput` saying why it cannot be used here."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BadInput(NOT_INSTALLED) from exc
    except OSError as exc:  # the bindings are there, libnvinfer is not loadable
        raise BadInput(f"tensorrt is installed but its libraries cannot be loaded ({first_line(exc)}); "
                       "reinstall tensorrt for this CUDA version") from exc
    return trt


def tensorrt_version() -> str | None:
    """TensorRT's version: from the Python bindings, else from libnvinfer (as ONNX Runtime's
    TensorRT provider loads it); None when neither is here."""
    try:
        import tensorrt as trt

        return str(trt.__version__)
    except (ImportError, OSError):
        pass
    for name in NVINFER_LIBRARIES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        number = int(lib.getInferLibVersion())
        return decode_nvinfer_version(number)
    return None


def decode_nvinfer_version(number: int) -> str:
    """``getInferLibVersion()`` as a version string: TensorRT 10 and 11 encode major*10000 + minor*100 +
    patch (100800 → 10.8.0), TensorRT 8 major*1000 + minor*100 + patch (8601 → 8.6.1)."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def _nvidia_smi_gpu() -> tuple[str | None, str | None]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None, None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None, None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None, None
    name, _, cap = lines[0].partition(",")
    return name.strip() or None, cap.strip() or None


def gpu_identity(device: int = 0) -> tuple[str | None, str | None]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device``, from torch, else
    from nvidia-smi; (None, None) when no GPU answers."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    return _nvidia_smi_gpu()


def device_identity(device: int = 0) -> DeviceIdentity:
    name, cap = gpu_identity(device)
    return DeviceIdentity(tensorrt_version(), name, cap)


def _release(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def check_engine_compatible(record: dict[str, Any], here: DeviceIdentity, *, where: str = "engine") -> None:
    """Refuse (:class:`BadInput`) an engine whose record does not match this machine: another
    TensorRT release (major.minor.patch), another compute capability or another GPU model.

    TensorRT engines are not portable: deserialising one built by another TensorRT version fails,
    and tactics chosen for one GPU are wrong or invalid on another.
    """
    rebuild = "rebuild it here: edgesmith export MODEL.onnx --to tensorrt"
    if here.tensorrt_version is None:
        raise BadInput(NOT_INSTALLED)
    if here.gpu_name is None:
        raise BadInput(f"{where} needs a CUDA GPU and none is visible here")
    built_trt = record.get("tensorrt_version")
    if _release(built_trt) != _release(here.tensorrt_version):
        raise BadInput(f"{where} was built with TensorRT {built_trt}, this machine has TensorRT "
                       f"{here.tensorrt_version}; engines only load in the TensorRT release that built them; {rebuild}")
    built_cap = record.get("compute_capability")
    if str(built_cap) != str(here.compute_capability):
        raise BadInput(f"{where} was built for compute capability {built_cap} ({record.get('gpu_name')}), this GPU "
                       f"({here.gpu_name}) is {here.compute_capability}; {rebuild}")
    if record.get("gpu_name") != here.gpu_name:
        raise BadInput(f"{where} was built on a {record.get('gpu_name')}, this GPU is a {here.gpu_name}; its kernels "
                       f"were chosen for the other GPU; {rebuild}")


