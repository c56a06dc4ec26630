"""Weak or strong typing: how a precision reaches a TensorRT engine.

TensorRT up to 10.x is *weakly typed* by default: builder flags (FP16, BF16, INT8, FP8) let it
choose lower-precision kernels for an FP32 graph. TensorRT 11 removed those flags, in the Python
API (``BuilderFlag.FP16`` raises AttributeError) and in trtexec (``--fp16``, ``--bf16``, ``--int8``,
``--fp8``, ``--best``): every network is *strongly typed*, so each tensor is computed in the type
the graph gives it. To keep ``--precision fp16`` meaning an FP16 engine on both, edgesmith puts
the precision into the graph before a strongly typed build:

- **fp16**: NVIDIA Model Optimizer's AutoCast when it is installed (NVIDIA's documented path),
  else edgesmith's FP16 conversion (:mod:`edgesmith.onnx_graph.fp16`: onnxruntime's float16
  converter, LayerNorm/Softmax/Pow/ReduceMean/Exp kept FP32, graph inputs and outputs FP32).
- **bf16**: AutoCast (required; there is no BF16 converter in onnxruntime).
- **int8 / fp8**: the Q/DQ graph as given. Its float layers run in the graph's float type; under
  weak typing TensorRT 10 was also allowed FP16 for them. The engine record says which it was.
- **fp32**: the graph as given (TF32 stays off unless asked for, under both typings).

A graph whose weights already are in the asked precision (say, from ``edgesmith quantize --mode
fp16``) is built as it is. The engine record (``engine.json``) keeps the typing and how the graph
was converted, and both are part of the engine's cache key.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

Typing = Literal["weak", "strong"]
#: BuilderFlag names each precision sets under weak typing (int8/fp8: the Q/DQ graph's float
#: layers may run in fp16)
WEAK_BUILDER_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",),
                                                  "int8": ("INT8", "FP16"), "fp8": ("FP8", "FP16")}
#: the same for trtexec (TensorRT 10); trtexec has no --fp8 build path here (FP8 builds need the
#: Python builder)
WEAK_TRTEXEC_FLAGS: dict[str, list[str]] = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"],
                                            "int8": ["--int8", "--fp16"]}
#: the first TensorRT release without weak typing
STRONG_TYPING_MAJOR = 11
#: precisions a strongly typed build needs the graph converted to
CONVERTED = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}


def typing_for_version(version: str | None) -> Typing:
    """``strong`` for TensorRT 11 and later, ``weak`` before (and when the version is unknown:
    the caller then fails on the missing TensorRT anyway)."""
    if not version:
        return "weak"
    head = str(version).split(".")[0]
    return "strong" if head.isdigit() and int(head) >= STRONG_TYPING_MAJOR else "weak"


def typing_of_module(trt) -> Typing:
    """What the imported bindings offer: ``weak`` while ``BuilderFlag.FP16`` exists."""
    return "weak" if hasattr(trt.BuilderFlag, "FP16") else "strong"


def builder_flags(precision: str, typing: Typing, tf32: bool = False) -> tuple[list[str], list[str]]:
    """(BuilderFlag names to set, to clear). Strong typing sets no precision flag (there are none);
    TF32 is cleared unless asked for, so "fp32" means FP32 arithmetic."""
    if precision not in WEAK_BUILDER_FLAGS:
        raise BadInput(f"unknown precision '{precision}'; use one of: {', '.join(WEAK_BUILDER_FLAGS)}")
    enable = list(WEAK_BUILDER_FLAGS[precision]) if typing == "weak" else []
    return enable, ([] if tf32 else ["TF32"])


def trtexec_precision_flags(precision: str, typing: Typing) -> list[str]:
    """trtexec's precision flags: TensorRT 10's ``--fp16``/``--bf16``/``--int8``, none for TensorRT 11."""
    if precision not in WEAK_TRTEXEC_FLAGS:
        raise BadInput(f"trtexec precision must be one of {', '.join(WEAK_TRTEXEC_FLAGS)} (got {precision})")
    return list(WEAK_TRTEXEC_FLAGS[precision]) if typing == "weak" else []


def weight_types(onnx_path: str | Path) -> Counter:
    """Element counts of the graph's float initializers by type name (FLOAT, FLOAT16, BFLOAT16)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: Counter = Counter()
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for init in model.graph.initializer:
        if init.data_type in floats:
            size = 1
            for d in init.dims:
                size *= int(d)
            counts[onnx.TensorProto.DataType.Name(init.data_type)] += size
    return counts


def needs_conversion(precision: str, typing: Typing, onnx_path: str | Path) -> bool:
    """True when a strongly typed build of ``precision`` needs the graph converted first: fp16 or
    bf16 asked, and most weights are not in that type yet."""
    if typing != "strong" or precision not in CONVERTED:
        return False
    counts = weight_types(onnx_path)
    total = sum(counts.values())
    return total > 0 and counts[CONVERTED[precision]] * 2 < total


def autocast_available() -> bool:
    """ModelOpt's AutoCast imports, and polygraphy (its reference run) is there too."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None or importlib.util.find_spec("polygraphy") is None:
        return False
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except Exception:  # ImportError (onnx_graphsurgeon, onnxslim, lief), or modelopt's own import-time failures
        return False
    return True


@dataclass(frozen=True)
class GraphConversion:
    """The graph a strongly typed build parses, and how it was made."""

    path: Path
    converter: str  # "modelopt-autocast" | "edgesmith-fp16"
    precision: str

    def describe(self) -> str:
        how = {"modelopt-autocast": "NVIDIA Model Optimizer AutoCast",
               "edgesmith-fp16": "edgesmith's FP16 conversion (onnxruntime float16 converter, LayerNorm/Softmax/"
                                 "Pow/ReduceMean/Exp kept FP32)"}[self.converter]
        return f"graph converted to {self.precision} by {how}"


def conversion_plan(precision: str) -> str:
    """Which converter a strongly typed ``precision`` build will use here (part of the cache key)."""
    if precision == "bf16":
        if not autocast_available():
            raise BadInput("TensorRT 11 builds bf16 only from a bf16 graph, and converting one needs NVIDIA Model "
                           "Optimizer: pip install nvidia-modelopt (or use --precision fp16)")
        return "modelopt-autocast"
    return "modelopt-autocast" if autocast_available() else "edgesmith-fp16"


def _save(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GiB limit
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


def convert_graph(onnx_path: str | Path, precision: str, out_dir: str | Path, converter: str | None = None) -> GraphConversion:
    """Write ``onnx_path`` converted to ``precision`` (fp16 or bf16) as ``out_dir/model.onnx``."""
    import onnx

    if precision not in CONVERTED:
        raise BadInput(f"only fp16 and bf16 graphs are converted for strongly typed builds (got {precision})")
    converter = converter or conversion_plan(precision)
    target = Path(out_dir) / "model.onnx"
    if converter == "modelopt-autocast":
        from modelopt.onnx import autocast

        try:
            converted = autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=precision,
                                                            keep_io_types=True)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BadInput(f"ModelOpt AutoCast could not convert {onnx_path} to {precision} ({reason})") from exc
    elif converter == "edgesmith-fp16":
        from edgesmith.onnx_graph.fp16 import convert_fp16

        converted = convert_fp16(onnx.load(str(onnx_path)))
    else:
        raise BadInput(f"unknown graph converter '{converter}'")
    _save(converted, target)
    log.info("strongly typed build: %s -> %s (%s)", onnx_path, target, converter)
    return GraphConversion(target, converter, precision)
