"""edgesmith's TensorRT code against the recorded API of TensorRT 10 and 11 (no GPU, no TensorRT).

The surfaces in tests/data/tensorrt-api/ come from NVIDIA's own bindings wheels (on PyPI),
imported against stub libraries by scripts/tensorrt_api_surface.py. Two checks use them:
a static one (every TensorRT attribute the code touches exists in every recorded release) and a
strict fake module (tests/fake_tensorrt.py) that runs the builder code for real.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import FakeTensorRT, load_surface, surface_versions

import edgesmith.tensorrt.build as trt_export
from edgesmith.artifacts import OnnxModel, load
from edgesmith.errors import BadInput
from edgesmith.tensorrt import backends as trt_backends
from edgesmith.tensorrt import ep as trt_ep
from edgesmith.tensorrt import precision as tensorrt_typing
from edgesmith.tensorrt import runtime as trt_runtime
from edgesmith.tensorrt.build import (
    TensorRTConfig,
    build_engine,
    build_python,
    derive_input_shapes,
    graph_input_dims,
    parse_profiles,
)
from edgesmith.tensorrt.identity import DeviceIdentity

WEAK, STRONG = "10.16.1.11", "11.4.0.106"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_both_typings_are_recorded():
    assert surface_versions() == [WEAK, STRONG]
    weak, strong = (load_surface(v)["module"]["BuilderFlag"]["values"] for v in (WEAK, STRONG))
    assert {"FP16", "BF16", "INT8", "FP8", "TF32"} <= set(weak)
    assert "TF32" in strong and not {"FP16", "BF16", "INT8", "FP8"} & set(strong)
    with pytest.raises(AttributeError):
        FakeTensorRT(STRONG).BuilderFlag.FP16  # what last release's code hit on TensorRT 11
    assert FakeTensorRT(WEAK).BuilderFlag.FP16 is not None


def test_typing_follows_the_release():
    assert tensorrt_typing.typing_for_version("10.16.1.11") == "weak"
    assert tensorrt_typing.typing_for_version("11.4.0.106") == "strong"
    assert tensorrt_typing.typing_for_version("12.0") == "strong"
    assert tensorrt_typing.typing_for_version(None) == "weak"
    assert tensorrt_typing.typing_of_module(FakeTensorRT(WEAK)) == "weak"
    assert tensorrt_typing.typing_of_module(FakeTensorRT(STRONG)) == "strong"


# ---------------------------------------------------------------------------------------------
# Static check: every TensorRT attribute the code touches exists in every recorded release
# ---------------------------------------------------------------------------------------------

#: per function: the local names (or self attributes) that hold TensorRT objects, and their class
BINDINGS = {
    (trt_backends, "build_python"): {"builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition",
                                   "parser": "OnnxParser", "profile": "IOptimizationProfile", "cache": "ITimingCache",
                                   "logger": "Logger"},
    (trt_backends, "_set_flags"): {"config": "IBuilderConfig"},
    (trt_runtime, "profile_ranges"): {"engine": "ICudaEngine"},
    (trt_runtime, "TensorRTSession"): {"engine": "ICudaEngine", "self.engine": "ICudaEngine",
                                       "self.context": "IExecutionContext", "self._runtime": "Runtime",
                                       "self._logger": "Logger", "inspector": "EngineInspector"},
    (trt_runtime, "_layer_recorder"): {},
    (trt_runtime, "_torch_dtype"): {},
}


def _returns(surface: dict, cls: str, member: str) -> str | None:
    info = surface[cls].get("members", {}).get(member)
    if not info or "->" not in info.get("doc", ""):
        return None
    declared = info["doc"].rsplit("->", 1)[1].strip()
    name = declared.rsplit(".", 1)[-1]
    return name if name in surface else None


class ApiCheck(ast.NodeVisitor):
    """Resolves expressions to TensorRT classes and reports attributes a class does not have."""

    def __init__(self, surface: dict, names: dict[str, str]):
        self.surface, self.names = surface, names
        self.problems: list[str] = []
        self.checked = 0

    def type_of(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return "<module>" if node.id == "trt" else self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return self.names.get(f"self.{node.attr}")
            owner = self.type_of(node.value)
            if owner == "<module>":
                return node.attr if node.attr in self.surface else None
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = self.type_of(node.func.value)
            if owner == "<module>":
                return node.func.attr if node.func.attr in self.surface else None
            if owner is not None:
                return _returns(self.surface, owner, node.func.attr)
        return None

    def visit_Call(self, node: ast.Call) -> None:
        """Keyword arguments must be parameters of the method's signature (any of its overloads)."""
        if isinstance(node.func, ast.Attribute) and node.keywords:
            owner = self.type_of(node.func.value)
            info = self.surface.get(owner, {}).get("members", {}).get(node.func.attr) if owner else None
            if info and info.get("kind") == "method" and "(*args" not in info["doc"]:
                params = set(re.findall(r"(\w+): ", info["doc"]))
                for keyword in node.keywords:
                    self.checked += 1
                    if keyword.arg not in params:
                        self.problems.append(f"line {node.lineno}: tensorrt.{owner}.{node.func.attr} has no "
                                             f"parameter '{keyword.arg}'")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = None if (isinstance(node.value, ast.Name) and node.value.id == "self") else self.type_of(node.value)
        if owner == "<module>":
            self.checked += 1
            if node.attr not in self.surface and node.attr != "__version__":  # __version__: the package's
                self.problems.append(f"line {node.lineno}: tensorrt.{node.attr} does not exist")
        elif owner is not None:
            entry = self.surface[owner]
            self.checked += 1
            if node.attr not in entry.get("members", {}) and node.attr not in entry.get("values", []):
                self.problems.append(f"line {node.lineno}: tensorrt.{owner}.{node.attr} does not exist")
        self.generic_visit(node)


def api_problems(source: str, surface: dict, names: dict[str, str]) -> tuple[list[str], int]:
    check = ApiCheck(surface, names)
    check.visit(ast.parse(textwrap.dedent(source)))
    return check.problems, check.checked


@pytest.mark.parametrize("version", [WEAK, STRONG])
def test_tensorrt_code_uses_only_api_of_every_release(version):
    surface = load_surface(version)["module"]
    problems, checked = [], 0
    for (module, name), names in BINDINGS.items():
        found, count = api_problems(inspect.getsource(getattr(module, name)), surface, names)
        problems += [f"{module.__name__}.{name} {p}" for p in found]
        checked += count
    assert not problems, f"TensorRT {version}: " + "; ".join(problems)
    assert checked >= 45  # the check reached the code (builder, engine, context, enums)


def test_api_check_catches_what_tensorrt_11_removed():
    code = """
    def build():
        config.set_flag(trt.BuilderFlag.FP16)
        size = engine.device_memory_size
        trt.IInt8EntropyCalibrator2
        config.set_timing_cache(cache, ignore_mismatch=False)
    """
    problems, _ = api_problems(code, load_surface(STRONG)["module"], {"config": "IBuilderConfig",
                                                                      "engine": "ICudaEngine"})
    assert len(problems) == 3 and "BuilderFlag.FP16" in problems[0] and "device_memory_size" in problems[1]
    wrong, _ = api_problems("config.set_timing_cache(cache, ignore=False)", load_surface(STRONG)["module"],
                            {"config": "IBuilderConfig"})
    assert wrong == ["line 1: tensorrt.IBuilderConfig.set_timing_cache has no parameter 'ignore'"]
    assert not api_problems(code, load_surface(WEAK)["module"], {"config": "IBuilderConfig",
                                                                  "engine": "ICudaEngine"})[0]


# ---------------------------------------------------------------------------------------------
# The builder run against the strict fake
# ---------------------------------------------------------------------------------------------


def _fake(version: str, seen_graphs: list | None = None) -> FakeTensorRT:
    def parse(parser, path):
        if seen_graphs is not None:
            seen_graphs.append((path, tensorrt_typing.weight_types(path)))
        return True

    return FakeTensorRT(version, {"OnnxParser.parse_from_file": parse, "IHostMemory.__bytes__": b"engine-bytes"})


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory, tiny_bert_dir) -> OnnxModel:
    from edgesmith.export import to_onnx

    exported = to_onnx(load(tiny_bert_dir))
    return load(exported.save(tmp_path_factory.mktemp("trt-api") / "onnx"))


def _shapes(model: OnnxModel, spec: str = "batch=1:2:4,seq=8:16:32"):
    return [derive_input_shapes(graph_input_dims(model.path), p) for p in parse_profiles([spec])]


def test_weak_build_sets_precision_flags(tmp_path, bert_onnx, monkeypatch):
    fake = _fake(WEAK)
    monkeypatch.setattr(trt_backends, "import_tensorrt", lambda: fake)
    timing = tmp_path / "timing.cache"
    cfg = TensorRTConfig(precision="fp16", shapes=["batch=1:2:4,seq=8:16:32"], workspace_mib=512)
    data = build_python(bert_onnx.path, _shapes(bert_onnx), cfg, timing)
    assert data == b"engine-bytes" and timing.read_bytes() == b"engine-bytes"
    flags = fake._class("BuilderFlag")
    assert [a for a, _ in fake.called("IBuilderConfig", "set_flag")] == [(flags.FP16,)]
    assert [a for a, _ in fake.called("IBuilderConfig", "clear_flag")] == [(flags.TF32,)]
    assert fake.called("Builder", "create_network") == [((0,), {})]
    pool = fake._class("MemoryPoolType")
    assert fake.called("IBuilderConfig", "set_memory_pool_limit") == [((pool.WORKSPACE, 512 * 2**20), {})]
    shapes = {args[0]: args[1:] for args, _ in fake.called("IOptimizationProfile", "set_shape")}
    assert shapes["input_ids"] == ((1, 8), (2, 16), (4, 32)) and set(shapes) == set(bert_onnx.input_names)
    assert fake.called("IBuilderConfig", "set_timing_cache")[0][1] == {"ignore_mismatch": False}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "fp8"])
def test_strong_build_sets_no_precision_flag(tmp_path, bert_onnx, monkeypatch, precision):
    fake = _fake(STRONG)
    monkeypatch.setattr(trt_backends, "import_tensorrt", lambda: fake)
    cfg = TensorRTConfig(precision=precision, shapes=["batch=1:2:4,seq=8:16:32"])
    assert build_python(bert_onnx.path, _shapes(bert_onnx), cfg, None) == b"engine-bytes"
    assert fake.called("IBuilderConfig", "set_flag") == []
    assert [a for a, _ in fake.called("IBuilderConfig", "clear_flag")] == [(fake._class("BuilderFlag").TF32,)]


def _build_with(version: str, model: OnnxModel, cache: Path, monkeypatch, precision="fp16"):
    seen: list = []
    fake = _fake(version, seen)
    monkeypatch.setattr(trt_backends, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_export, "device_identity", lambda: DeviceIdentity(version, "NVIDIA H200", "9.0"))
    cfg = TensorRTConfig(precision=precision, shapes=["batch=1:2:4,seq=8:16:32"], backend="python")
    folder = build_engine(model, cfg, cache_root=cache)
    return folder, json.loads((folder / "engine.json").read_text()), seen


def test_strong_build_parses_a_graph_converted_to_fp16(tmp_path, bert_onnx, monkeypatch):
    monkeypatch.setattr(tensorrt_typing, "autocast_available", lambda: False)
    folder, meta, seen = _build_with(STRONG, bert_onnx, tmp_path / "cache", monkeypatch)
    (path, types), = seen
    assert Path(path) != bert_onnx.path and types["FLOAT16"] > 10 * types["FLOAT"]
    assert not Path(path).exists()  # the converted graph was scratch, gone after the build
    assert meta["typing"] == "strong" and "edgesmith's FP16 conversion" in meta["graph"]
    assert meta["options"]["graph_converter"] == "edgesmith-fp16" and meta["tensorrt_version"] == STRONG
    assert (folder / "model.engine").read_bytes() == b"engine-bytes"
    # a weak build of the same model parses the fp32 graph itself, and is cached apart
    weak_folder, weak_meta, weak_seen = _build_with(WEAK, bert_onnx, tmp_path / "cache", monkeypatch)
    assert Path(weak_seen[0][0]) == bert_onnx.path and weak_seen[0][1]["FLOAT16"] == 0
    assert weak_meta["typing"] == "weak" and weak_meta["options"]["graph_converter"] is None
    assert weak_folder != folder


def test_strong_build_of_an_fp16_graph_keeps_it(tmp_path, bert_onnx, monkeypatch):
    from edgesmith.compress.quantization import QuantizePass

    fp16 = QuantizePass(mode="fp16")(bert_onnx)
    _, meta, seen = _build_with(STRONG, fp16, tmp_path / "cache", monkeypatch)
    assert Path(seen[0][0]) == fp16.path and meta["options"]["graph_converter"] is None
    assert "graph's own types" in meta["graph"]


def test_strong_bf16_without_model_optimizer_is_refused(tmp_path, bert_onnx, monkeypatch):
    monkeypatch.setattr(tensorrt_typing, "autocast_available", lambda: False)
    with pytest.raises(BadInput, match="nvidia-modelopt"):
        _build_with(STRONG, bert_onnx, tmp_path / "cache", monkeypatch, precision="bf16")
    assert not (tmp_path / "cache" / "engines").exists() or not any((tmp_path / "cache" / "engines").iterdir())


def test_converted_fp16_graph_stays_close_to_fp32(tmp_path, bert_onnx):
    import onnxruntime as ort

    from edgesmith.profiling import build_feeds

    conversion = tensorrt_typing.convert_graph(bert_onnx.path, "fp16", tmp_path, "edgesmith-fp16")
    assert "FP16" in conversion.describe()
    feeds = build_feeds(bert_onnx.tokenizer, bert_onnx.input_names, batch=2, seq=16)[0]
    ref = ort.InferenceSession(str(bert_onnx.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(conversion.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.dtype == np.float32 and _cosine(ref, got) > 0.999  # graph outputs stay fp32


# ---------------------------------------------------------------------------------------------
# trtexec, remote devices and the ONNX Runtime provider under strong typing
# ---------------------------------------------------------------------------------------------


def test_trtexec_of_tensorrt_11_gets_no_precision_flag():
    from edgesmith.tensorrt.trtexec import trtexec_build_argv

    weak = trtexec_build_argv("trtexec", "m.onnx", "m.engine", input_names=["x"], batch=1, seq=8, precision="int8")
    strong = trtexec_build_argv("trtexec", "m.onnx", "m.engine", input_names=["x"], batch=1, seq=8, precision="int8",
                                typing="strong")
    assert {"--int8", "--fp16"} <= set(weak)
    assert not {"--int8", "--fp16", "--bf16", "--best", "--stronglyTyped"} & set(strong)
    assert [a for a in strong if a.startswith("--onnx=")] == ["--onnx=m.onnx"]


def test_device_with_tensorrt_11_gets_an_fp16_graph(bert_onnx):
    from edgesmith.profiling.remote import strongly_typed_source

    assert strongly_typed_source(bert_onnx, "fp16", "10.3.0") is bert_onnx
    assert strongly_typed_source(bert_onnx, "int8", "11.4.0") is bert_onnx
    converted = strongly_typed_source(bert_onnx, "fp16", "11.4.0")
    types = tensorrt_typing.weight_types(converted.path)
    assert types["FLOAT16"] > 10 * types["FLOAT"] and converted.meta["precision"] == "fp16"
    assert converted.content_hash() != bert_onnx.content_hash()
    with pytest.raises(BadInput, match="bf16 only from a bf16 graph"):
        strongly_typed_source(bert_onnx, "bf16", "11.4.0")


def test_ort_tensorrt_provider_warns_that_fp16_flag_cannot_work_on_tensorrt_11(bert_onnx, monkeypatch, caplog,
                                                                                tmp_path):
    from edgesmith.runtimes import onnxruntime as ort_runtime

    monkeypatch.setattr(trt_ep, "device_identity", lambda: DeviceIdentity(STRONG, "NVIDIA H200", "9.0"))
    with caplog.at_level("WARNING"):
        ort_runtime.tensorrt_ep_options(bert_onnx, {"trt_fp16_enable": "True"}, cache_root=str(tmp_path))
    assert "strongly typed" in caplog.text and "trt_fp16_enable" in caplog.text
    caplog.clear()
    monkeypatch.setattr(trt_ep, "device_identity", lambda: DeviceIdentity(WEAK, "NVIDIA H200", "9.0"))
    with caplog.at_level("WARNING"):
        options = ort_runtime.tensorrt_ep_options(bert_onnx, {"trt_fp16_enable": "True"}, cache_root=str(tmp_path))
    assert "strongly typed" not in caplog.text and options["trt_fp16_enable"] == "True"


# ---------------------------------------------------------------------------------------------
# NVIDIA Model Optimizer's AutoCast, the converter strong typing prefers where it is installed
# ---------------------------------------------------------------------------------------------


@pytest.mark.modelopt
def test_autocast_makes_fp16_and_bf16_graphs(tmp_path, bert_onnx):
    import onnx
    import onnxruntime as ort

    from edgesmith.profiling import build_feeds

    assert tensorrt_typing.conversion_plan("fp16") == "modelopt-autocast"
    assert tensorrt_typing.conversion_plan("bf16") == "modelopt-autocast"
    fp16 = tensorrt_typing.convert_graph(bert_onnx.path, "fp16", tmp_path / "fp16")
    bf16 = tensorrt_typing.convert_graph(bert_onnx.path, "bf16", tmp_path / "bf16")
    assert fp16.converter == bf16.converter == "modelopt-autocast" and "AutoCast" in bf16.describe()
    half, brain = tensorrt_typing.weight_types(fp16.path), tensorrt_typing.weight_types(bf16.path)
    assert half["FLOAT16"] > 10 * half["FLOAT"] and brain["BFLOAT16"] > 10 * brain["FLOAT"]
    assert not tensorrt_typing.needs_conversion("bf16", "strong", bf16.path)
    graph = onnx.load(str(bf16.path)).graph
    assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}  # keep_io_types
    onnx.checker.check_model(str(bf16.path))
    # onnxruntime's CPU build has no bf16 kernels; the fp16 graph it runs
    feeds = build_feeds(bert_onnx.tokenizer, bert_onnx.input_names, batch=2, seq=16)[0]
    ref = ort.InferenceSession(str(bert_onnx.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(fp16.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.dtype == np.float32 and _cosine(ref, got) > 0.999


@pytest.mark.modelopt
def test_strong_build_prefers_autocast_where_installed(tmp_path, bert_onnx, monkeypatch):
    _, meta, seen = _build_with(STRONG, bert_onnx, tmp_path / "cache", monkeypatch, precision="bf16")
    assert meta["options"]["graph_converter"] == "modelopt-autocast" and "AutoCast" in meta["graph"]
    assert seen[0][1]["BFLOAT16"] > 10 * seen[0][1]["FLOAT"]


@pytest.mark.parametrize("version, strong", [(WEAK, False), (STRONG, True)])
def test_doctor_says_which_typing_tensorrt_uses(monkeypatch, version, strong):
    from edgesmith.cli import doctor
    from edgesmith.runtimes.base import Availability

    monkeypatch.setattr(trt_runtime.TensorRTRuntime, "availability",
                        lambda self: Availability(True, "", version, ["cuda:0 NVIDIA H200"]))
    row = doctor._tensorrt_row("NVIDIA H200 (compute capability 9.0)")
    assert row["usable"] and row["version"] == version
    assert ("strongly typed" in row["reason"]) == strong
