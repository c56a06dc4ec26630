"""Where TensorRT engines and timing caches live in edgesmith's cache, and the keys that keep a
change of graph, options, GPU or TensorRT release from reusing a stale engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.storage import sha256_json
from edgesmith.tensorrt.identity import DeviceIdentity


def engine_key(onnx_hash: str, options: dict[str, Any], identity: DeviceIdentity) -> str:
    """Key of an engine: the ONNX model's content hash, the build options, TensorRT version and GPU."""
    return sha256_json({"onnx": onnx_hash, "options": options, **identity.as_dict()})


def timing_cache_key(identity: DeviceIdentity) -> str:
    """A timing cache is specific to the TensorRT version and the GPU, not to a model."""
    return sha256_json({"timing-cache": 1, **identity.as_dict()})


def tensorrt_cache_root(root: str | Path | None = None) -> Path:
    from edgesmith.cache import default_cache_dir

    return Path(root) if root is not None else default_cache_dir() / "tensorrt"


def engine_dir(key: str, root: str | Path | None = None) -> Path:
    return tensorrt_cache_root(root) / "engines" / key


def timing_cache_path(identity: DeviceIdentity, root: str | Path | None = None) -> Path:
    return tensorrt_cache_root(root) / "timing" / f"{timing_cache_key(identity)}.cache"


def ort_engine_cache_dir(onnx_hash: str, provider_options: dict[str, Any], identity: DeviceIdentity,
                         root: str | Path | None = None) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps engines for one model: the same key parts as
    ours, so a changed model, option, TensorRT or GPU gets a fresh folder and nothing stale is
    reused (nobody clears this cache by hand)."""
    options = {k: str(v) for k, v in provider_options.items() if not k.endswith("_path")}
    key = sha256_json({"ort-trt-ep": onnx_hash, "options": options, **identity.as_dict()})
    return tensorrt_cache_root(root) / "ort-ep" / key


