"""ONNX Runtime's TensorRT execution provider: its options, with the engine cache placed in
edgesmith's cache under a key, and a warning where TensorRT 11's strong typing ignores a flag."""

from __future__ import annotations

import logging
from typing import Any

from edgesmith.artifacts import OnnxModel
from edgesmith.tensorrt.cache import ort_engine_cache_dir, tensorrt_cache_root, timing_cache_key
from edgesmith.tensorrt.identity import device_identity
from edgesmith.tensorrt.precision import typing_for_version

log = logging.getLogger(__name__)

#: TensorRT provider defaults: engines and timing caches kept (in edgesmith's cache, under a key)
TENSORRT_EP_DEFAULTS = {"trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True"}
#: provider options that work through TensorRT's weak typing (builder flags), gone in TensorRT 11
WEAK_TYPING_EP_OPTIONS = ("trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable")


def tensorrt_ep_options(model: OnnxModel, options: dict[str, Any], cache_root: str | None = None) -> dict[str, Any]:
    """The TensorRT provider's options: the user's, over :data:`TENSORRT_EP_DEFAULTS`, with its
    engine cache placed in edgesmith's cache under a key of the ONNX hash, these options, the
    TensorRT version and the GPU (so a change in any of them gets a fresh folder, and nothing stale
    is reused), and its timing cache per TensorRT version and GPU."""
    merged = {**TENSORRT_EP_DEFAULTS, **{k: v for k, v in options.items()}}
    identity = device_identity()
    weak = [k for k in WEAK_TYPING_EP_OPTIONS if str(merged.get(k, "")).lower() in ("1", "true")]
    if weak and typing_for_version(identity.tensorrt_version) == "strong":
        log.warning("TensorRT %s is strongly typed: %s cannot lower the precision of an fp32 graph; give the "
                    "provider an fp16 graph (edgesmith quantize MODEL --mode fp16) or a Q/DQ graph",
                    identity.tensorrt_version, ", ".join(weak))
    if "trt_engine_cache_path" not in merged:
        folder = ort_engine_cache_dir(model.content_hash(), merged, identity, cache_root)
        folder.mkdir(parents=True, exist_ok=True)
        merged["trt_engine_cache_path"] = str(folder)
    if "trt_timing_cache_path" not in merged:
        timing = tensorrt_cache_root(cache_root) / "ort-ep-timing" / timing_cache_key(identity)
        timing.mkdir(parents=True, exist_ok=True)
        merged["trt_timing_cache_path"] = str(timing)
    return merged
