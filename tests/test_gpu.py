"""GPU paths: TensorRT export (shape profiles, precisions, metadata, cache keys, trtexec), the
TensorRT runtime's refusals, torch CUDA options and ONNX Runtime GPU provider options.

Everything here runs on a CPU-only machine except the tests marked ``gpu`` (a CUDA device) and
``tensorrt`` (TensorRT's Python package), which tests/conftest.py skips with the reason.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edgesmith.tensorrt.build as trt_export
from edgesmith.artifacts import ENGINE_FILE, OnnxModel, TensorRTEngine, load
from edgesmith.cli.app import main
from edgesmith.errors import BadInput
from edgesmith.tensorrt.build import (
    TensorRTConfig,
    build_identity,
    check_precision,
    derive_input_shapes,
    engine_key,
    graph_input_dims,
    parse_profiles,
)
from edgesmith.tensorrt.cache import ort_engine_cache_dir, timing_cache_key
from edgesmith.tensorrt.identity import DeviceIdentity, decode_nvinfer_version
from edgesmith.tensorrt.options import TOLERANCES, builder_flags
from edgesmith.tensorrt.runtime import check_engine_compatible
from edgesmith.tensorrt.shapes import DimRange, parse_shapes
from edgesmith.tensorrt.trtexec import trtexec_build_argv

H200 = DeviceIdentity("10.8.0.43", "NVIDIA H200", "9.0")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---------------------------------------------------------------------------------------------
# Small ONNX graphs made by hand (no export needed)
# ---------------------------------------------------------------------------------------------


def _save(model, folder: Path) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _token_graph(folder: Path, batch=("batch", "batch"), seq=("sequence", "sequence")) -> Path:
    """input_ids and attention_mask (int64, [batch, sequence]) -> last_hidden_state (float)."""
    from onnx import TensorProto, helper

    def dims(b, s):
        return [b, s]

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims(batch[0], seq[0]))
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims(batch[1], seq[1]))
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims(batch[0], seq[0]))
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
             helper.make_node("Cast", ["masked"], ["last_hidden_state"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "tokens", [ids, mask], [out])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder)


def _qdq_graph(folder: Path, zero_type) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zero", zero_type, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], initializer=[scale, zero])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), folder)


@pytest.fixture()
def token_model(tmp_path, minilm_tokenizer) -> OnnxModel:
    folder = tmp_path / "onnx"
    _token_graph(folder)
    minilm_tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    return OnnxModel(name="tokens", folder=folder)


# ---------------------------------------------------------------------------------------------
# Shape profiles
# ---------------------------------------------------------------------------------------------


def test_parse_shapes_ranges_single_values_and_aliases():
    assert parse_shapes("batch=1:8:32,seq=16:128:256") == {"batch": DimRange(1, 8, 32), "seq": DimRange(16, 128, 256)}
    assert parse_shapes("batch_size=4, sequence=64") == {"batch": DimRange(4, 4, 4), "seq": DimRange(64, 64, 64)}
    profiles = parse_profiles(["batch=1,seq=128", "batch=8:16:32,seq=8:64:128;batch=64,seq=512"])
    assert [p["batch"].max for p in profiles] == [1, 32, 64]


@pytest.mark.parametrize("spec, words", [
    ("batch=8:1:32,seq=128", "MIN <= OPT <= MAX"),
    ("batch=0:1:2", "at least 1"),
    ("batch=1:2", "not N or MIN:OPT:MAX"),
    ("batch=a", "not N or MIN:OPT:MAX"),
    ("heads=4", "unknown dimension 'heads'"),
    ("batch=1,batch=2", "given twice"),
    ("batch", "is not NAME=RANGE"),
    ("", "empty shape spec"),
])
def test_parse_shapes_errors_say_what_is_wrong(spec, words):
    with pytest.raises(BadInput, match=words.replace("(", r"\(")):
        parse_shapes(spec)


def test_config_normalises_shapes_and_refuses_bad_ones():
    cfg = TensorRTConfig(shapes=["sequence=16:128:256,batch_size=1:8:32"])
    assert cfg.shapes == ["seq=16:128:256,batch=1:8:32"]
    from edgesmith.passes import make_config

    with pytest.raises(BadInput, match="MIN <= OPT <= MAX"):
        make_config(TensorRTConfig, {"shapes": ["batch=9:8:7"]}, where="tensorrt")
    with pytest.raises(BadInput, match="optimization_level"):
        make_config(TensorRTConfig, {"optimization_level": 7}, where="tensorrt")


def test_input_shapes_derive_from_dimension_names(tmp_path):
    dims = graph_input_dims(_token_graph(tmp_path / "named"))
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    shapes = derive_input_shapes(dims, parse_shapes("batch=1:8:32,seq=16:128:256"))
    assert shapes["input_ids"] == ((1, 16), (8, 128), (32, 256)) == shapes["attention_mask"]


def test_unnamed_axes_map_by_position_and_fixed_axes_must_agree(tmp_path):
    dims = graph_input_dims(_token_graph(tmp_path / "fixed", batch=(1, 1), seq=("s0", "s0")))
    assert dims["input_ids"] == [1, "s0"]
    shapes = derive_input_shapes(dims, parse_shapes("seq=8:64:128"))
    assert shapes["input_ids"] == ((1, 8), (1, 64), (1, 128))
    with pytest.raises(BadInput, match="fixed batch of 1"):
        derive_input_shapes(dims, parse_shapes("batch=1:4:8,seq=8:64:128"))
    named = graph_input_dims(_token_graph(tmp_path / "named"))
    with pytest.raises(BadInput, match="add seq=MIN:OPT:MAX"):
        derive_input_shapes(named, parse_shapes("batch=1:4:8"))


def test_profiles_longer_than_the_model_are_refused():
    trt_export.check_profiles_fit(parse_profiles("seq=1:64:128"), 128)
    with pytest.raises(BadInput, match="only 128 positions"):
        trt_export.check_profiles_fit(parse_profiles("batch=1,seq=1:64:129"), 128)


# ---------------------------------------------------------------------------------------------
# Precisions and options
# ---------------------------------------------------------------------------------------------


def test_precision_maps_to_builder_flags():
    assert builder_flags("fp32") == ([], ["TF32"])
    assert builder_flags("fp32", tf32=True) == ([], [])
    assert builder_flags("fp16")[0] == ["FP16"]
    assert builder_flags("bf16")[0] == ["BF16"]
    assert builder_flags("int8")[0] == ["INT8", "FP16"]
    assert builder_flags("fp8")[0] == ["FP8", "FP16"]
    with pytest.raises(BadInput, match="unknown precision"):
        builder_flags("int4")


def test_int8_and_fp8_need_matching_qdq_graphs(tmp_path):
    from onnx import TensorProto

    plain = _token_graph(tmp_path / "plain")
    int8 = _qdq_graph(tmp_path / "int8", TensorProto.INT8)
    fp8 = _qdq_graph(tmp_path / "fp8", TensorProto.FLOAT8E4M3FN)
    check_precision("fp16", plain, "9.0")
    with pytest.raises(BadInput, match="Q/DQ"):
        check_precision("int8", plain, "9.0")
    check_precision("int8", int8, "8.7")
    with pytest.raises(BadInput, match="FP8 Q/DQ graph"):
        check_precision("fp8", int8, "9.0")
    check_precision("fp8", fp8, "9.0")
    with pytest.raises(BadInput, match="compute capability 8.9"):
        check_precision("fp8", fp8, "8.6")


def test_tolerances_default_per_precision_and_can_be_set():
    assert trt_export.tolerances(TensorRTConfig(precision="fp32")) == TOLERANCES["fp32"]
    assert trt_export.tolerances(TensorRTConfig(precision="bf16", min_cosine=0.99))[1] == 0.99


def test_trtexec_command_line_has_one_flag_triple_per_profile():
    shapes = [derive_input_shapes({"input_ids": ["batch", "sequence"]}, p)
              for p in parse_profiles("batch=1:1:4,seq=16:128:256;batch=8:16:32,seq=128")]
    argv = trtexec_build_argv("trtexec", "m.onnx", "e.engine", input_names=["input_ids"], precision="bf16",
                              workspace_mib=2048, profiles=shapes, optimization_level=5, timing_cache="t.cache")
    assert [a for a in argv if a.startswith("--minShapes=")] == ["--minShapes=input_ids:1x16",
                                                                   "--minShapes=input_ids:8x128"]
    assert [a for a in argv if a.startswith("--maxShapes=")] == ["--maxShapes=input_ids:4x256",
                                                                   "--maxShapes=input_ids:32x128"]
    # each profile's triple stays together, in order (trtexec pairs them by position)
    first = argv.index("--minShapes=input_ids:1x16")
    assert argv[first + 1:first + 3] == ["--optShapes=input_ids:1x128", "--maxShapes=input_ids:4x256"]
    assert {"--bf16", "--builderOptimizationLevel=5", "--memPoolSize=workspace:2048", "--timingCacheFile=t.cache",
            "--skipInference", "--onnx=m.onnx", "--saveEngine=e.engine"} <= set(argv)
    with pytest.raises(BadInput, match="0-5"):
        trtexec_build_argv("trtexec", "m.onnx", "e.engine", input_names=["input_ids"], profiles=shapes,
                           optimization_level=6)
    with pytest.raises(BadInput, match="no shapes for input"):
        trtexec_build_argv("trtexec", "m.onnx", "e.engine", input_names=["input_ids", "attention_mask"],
                           profiles=shapes)


# ---------------------------------------------------------------------------------------------
# Cache keys
# ---------------------------------------------------------------------------------------------


def test_engine_key_changes_with_every_input():
    base_cfg = TensorRTConfig(precision="fp16", shapes=["batch=1:8:32,seq=16:128:256"])
    base = engine_key("a" * 64, build_identity(base_cfg, "python"), H200)
    assert base == engine_key("a" * 64, build_identity(TensorRTConfig(**base_cfg.model_dump()), "python"), H200)
    changed = {
        "onnx hash": engine_key("b" * 64, build_identity(base_cfg, "python"), H200),
        "backend": engine_key("a" * 64, build_identity(base_cfg, "trtexec"), H200),
        "trt version": engine_key("a" * 64, build_identity(base_cfg, "python"),
                                  DeviceIdentity("10.9.0", "NVIDIA H200", "9.0")),
        "gpu": engine_key("a" * 64, build_identity(base_cfg, "python"), DeviceIdentity("10.8.0.43", "NVIDIA H100", "9.0")),
        "capability": engine_key("a" * 64, build_identity(base_cfg, "python"),
                                 DeviceIdentity("10.8.0.43", "NVIDIA H200", "8.9")),
    }
    for field, value in (("precision", "bf16"), ("shapes", ["batch=1:8:32,seq=16:128:512"]), ("workspace_mib", 1024),
                         ("optimization_level", 5), ("tf32", True)):
        cfg = base_cfg.model_copy(update={field: value})
        changed[field] = engine_key("a" * 64, build_identity(cfg, "python"), H200)
    assert len(set(changed.values()) | {base}) == len(changed) + 1
    # tolerances and tool paths do not change the engine
    same = base_cfg.model_copy(update={"atol": 0.5, "trtexec": "/opt/trtexec", "min_cosine": 0.9})
    assert engine_key("a" * 64, build_identity(same, "python"), H200) == base


def test_timing_cache_is_per_tensorrt_and_gpu_not_per_model():
    assert timing_cache_key(H200) == timing_cache_key(DeviceIdentity("10.8.0.43", "NVIDIA H200", "9.0"))
    assert timing_cache_key(H200) != timing_cache_key(DeviceIdentity("10.9.0", "NVIDIA H200", "9.0"))
    assert timing_cache_key(H200) != timing_cache_key(DeviceIdentity("10.8.0.43", "NVIDIA A100", "8.0"))


def test_ort_tensorrt_ep_cache_folder_is_keyed(tmp_path, token_model, monkeypatch):
    from edgesmith.tensorrt import ep as ort_rt
    from edgesmith.tensorrt import ep as trt_rt

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trt_rt, "device_identity", lambda device=0: H200)
    opts = ort_rt.tensorrt_ep_options(token_model, {})
    folder = Path(opts["trt_engine_cache_path"])
    assert folder.is_dir() and folder.parent == tmp_path / "cache" / "tensorrt" / "ort-ep"
    assert opts["trt_engine_cache_enable"] == "True" and Path(opts["trt_timing_cache_path"]).is_dir()
    fp16 = ort_rt.tensorrt_ep_options(token_model, {"trt_fp16_enable": "True"})
    assert Path(fp16["trt_engine_cache_path"]) != folder
    mine = ort_rt.tensorrt_ep_options(token_model, {"trt_engine_cache_path": str(tmp_path / "mine")})
    assert mine["trt_engine_cache_path"] == str(tmp_path / "mine")
    # the same key parts give the same folder; another GPU or TensorRT a new one
    assert ort_engine_cache_dir(token_model.content_hash(), {**opts}, H200) == folder
    assert ort_engine_cache_dir(token_model.content_hash(), opts, DeviceIdentity("10.9.0", "NVIDIA H200", "9.0")) != folder


def test_provider_options_parse_key_value_pairs():
    from edgesmith.runtimes.onnxruntime import parse_provider_options

    assert parse_provider_options(["trt_fp16_enable=True", "device_id = 1"]) == {"trt_fp16_enable": "True",
                                                                                  "device_id": "1"}
    with pytest.raises(BadInput, match="KEY=VALUE"):
        parse_provider_options(["trt_fp16_enable"])


# ---------------------------------------------------------------------------------------------
# Engine metadata and refusals
# ---------------------------------------------------------------------------------------------


def test_engines_from_another_gpu_or_tensorrt_are_refused():
    record = {"tensorrt_version": "10.8.0.43", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
    check_engine_compatible(record, H200)
    check_engine_compatible(record, DeviceIdentity("10.8.0", "NVIDIA H200", "9.0"))  # same release
    with pytest.raises(BadInput, match="built with TensorRT 10.8.0.43, this machine has TensorRT 10.9.0"):
        check_engine_compatible(record, DeviceIdentity("10.9.0", "NVIDIA H200", "9.0"))
    with pytest.raises(BadInput, match="compute capability 9.0.*is 8.0"):
        check_engine_compatible(record, DeviceIdentity("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0"))
    with pytest.raises(BadInput, match="built on a NVIDIA H200, this GPU is a NVIDIA H100"):
        check_engine_compatible(record, DeviceIdentity("10.8.0.43", "NVIDIA H100", "9.0"))
    with pytest.raises(BadInput, match="NVIDIA's package index"):
        check_engine_compatible(record, DeviceIdentity(None, "NVIDIA H200", "9.0"))
    with pytest.raises(BadInput, match="no.*visible"):
        check_engine_compatible(record, DeviceIdentity("10.8.0.43", None, None))


def test_nvinfer_version_numbers_decode():
    assert decode_nvinfer_version(100800) == "10.8.0"
    assert decode_nvinfer_version(101300) == "10.13.0"
    assert decode_nvinfer_version(8601) == "8.6.1"


def _fake_engine(token_model: OnnxModel, folder: Path, engine_bytes: bytes = b"not a real engine") -> TensorRTEngine:
    cfg = TensorRTConfig()
    shapes = [derive_input_shapes(graph_input_dims(token_model.path), p) for p in parse_profiles(cfg.shapes)]
    meta = trt_export.engine_meta(H200, cfg, token_model.content_hash(), "python", shapes)
    cached = folder.parent / "cached"
    cached.mkdir()
    (cached / ENGINE_FILE).write_bytes(engine_bytes)
    (cached / "engine.json").write_text(json.dumps(meta))
    folder.mkdir()
    return trt_export.engine_artifact(token_model, cached, folder)


def test_engine_artifact_saves_loads_and_records_what_it_needs(tmp_path, token_model):
    engine = _fake_engine(token_model, tmp_path / "scratch")
    saved = engine.save(tmp_path / "engine")
    back = load(saved)
    assert isinstance(back, TensorRTEngine) and back.kind == "tensorrt"
    record = back.engine_meta
    assert record["gpu_name"] == "NVIDIA H200" and record["compute_capability"] == "9.0"
    assert record["tensorrt_version"] == "10.8.0.43" and record["precision"] == "fp16"
    assert record["source_onnx_hash"] == token_model.content_hash()
    assert record["profiles"][0]["input_ids"] == {"min": [1, 8], "opt": [1, 128], "max": [32, 256]}
    assert back.input_names == ["input_ids", "attention_mask"] and back.output_names == ["last_hidden_state"]
    assert back.tokenizer is not None and not (saved / "model.onnx").exists()
    first = back.content_hash()
    assert first == engine.content_hash()
    (saved / ENGINE_FILE).write_bytes(b"another engine")
    assert load(saved).content_hash() != first
    assert load(saved / ENGINE_FILE).kind == "tensorrt"  # the engine file inside its folder


def test_engine_folders_without_metadata_are_refused(tmp_path, token_model):
    saved = _fake_engine(token_model, tmp_path / "scratch").save(tmp_path / "engine")
    meta = json.loads((saved / "edgesmith.json").read_text())
    del meta["meta"]["tensorrt"]["compute_capability"]
    (saved / "edgesmith.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="lacks compute_capability"):
        load(saved)
    bare = tmp_path / "bare" / "model.engine"
    bare.parent.mkdir()
    bare.write_bytes(b"x")
    with pytest.raises(BadInput, match="bare TensorRT engine"):
        load(bare)


def test_probe_filter_keeps_probes_inside_the_profiles(tmp_path, token_model):
    meta = _fake_engine(token_model, tmp_path / "scratch").engine_meta
    accept = trt_export.profile_accepts(meta)
    assert accept({"batch": 3, "seq": 48}) and not accept({"batch": 33, "seq": 48}) and not accept({"batch": 1, "seq": 4})
    assert trt_export.probe_shapes(meta) == ([1, 3], [48])


# ---------------------------------------------------------------------------------------------
# The trtexec backend, end to end with a stand-in tool
# ---------------------------------------------------------------------------------------------


FAKE_TRTEXEC = """#!{python}
import json, sys
from pathlib import Path
with open({log!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
engine = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--saveEngine="))
Path(engine).write_bytes(b"engine built by the stand-in trtexec")
"""


def test_trtexec_backend_builds_once_and_reuses_the_cached_engine(tmp_path, token_model, monkeypatch):
    tool = tmp_path / "bin" / "trtexec"
    tool.parent.mkdir()
    calls = tmp_path / "calls.jsonl"
    tool.write_text(FAKE_TRTEXEC.format(python=sys.executable, log=str(calls)))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(trt_export, "device_identity", lambda device=0: H200)
    cfg = TensorRTConfig(precision="fp16", shapes=["batch=1:2:4,seq=8:32:64"], backend="trtexec")
    root = tmp_path / "cache"
    folder = trt_export.build_engine(token_model, cfg, cache_root=root)
    assert (folder / ENGINE_FILE).read_bytes() == b"engine built by the stand-in trtexec"
    meta = json.loads((folder / "engine.json").read_text())
    assert meta["backend"] == "trtexec" and meta["gpu_name"] == "NVIDIA H200"
    argv = json.loads(calls.read_text().splitlines()[0])
    assert "--minShapes=input_ids:1x8,attention_mask:1x8" in argv
    assert "--maxShapes=input_ids:4x64,attention_mask:4x64" in argv
    assert {"--fp16", "--noTF32", "--builderOptimizationLevel=3", "--memPoolSize=workspace:4096"} <= set(argv)
    assert f"--timingCacheFile={trt_export.timing_cache_path(H200, root)}" in argv
    assert trt_export.build_engine(token_model, cfg, cache_root=root) == folder
    assert len(calls.read_text().splitlines()) == 1  # reused, not rebuilt
    other = trt_export.build_engine(token_model, cfg.model_copy(update={"precision": "fp32"}), cache_root=root)
    assert other != folder and len(calls.read_text().splitlines()) == 2


def test_backend_auto_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BadInput, match="tensorrt is not installed.*nor is trtexec on PATH"):
        trt_export.resolve_backend("auto", "trtexec")
    with pytest.raises(BadInput, match="trtexec not found"):
        trt_export.resolve_backend("trtexec", "trtexec")


# ---------------------------------------------------------------------------------------------
# Torch: dtypes and devices, never touching the artifact's module
# ---------------------------------------------------------------------------------------------


def test_torch_bf16_session_works_on_a_copy(tiny_bert_dir):
    from edgesmith.inputs import tokenize
    from edgesmith.runtimes.base import get_runtime

    torch.set_num_threads(1)
    model = load(tiny_bert_dir)
    before = next(model.module.parameters())
    feeds = tokenize(model.tokenizer, ["a short sentence", "another one here"], input_names=model.input_names)
    ref = get_runtime("torch").load(model).run(feeds)["last_hidden_state"]
    session = get_runtime("torch").load(model, dtype="bf16")
    out = session.run(feeds)["last_hidden_state"]
    assert out.dtype == np.float32 and out.shape == ref.shape
    cos = (ref * out).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1))
    assert cos.min() > 0.99
    assert next(model.module.parameters()) is before and before.dtype == torch.float32
    assert session.options["dtype"] == "bf16" and session.providers == ["torch-cpu"]


def test_torch_refuses_what_it_cannot_do_here(tiny_bert_dir):
    from edgesmith.runtimes.base import get_runtime

    model = load(tiny_bert_dir)
    with pytest.raises(BadInput, match="CUDA graphs need a CUDA device"):
        get_runtime("torch").load(model, cuda_graphs=True)
    with pytest.raises(BadInput, match="dtype 'int8'"):
        get_runtime("torch").load(model, dtype="int8")
    with pytest.raises(BadInput, match="known: device, threads, dtype, compile, cuda_graphs"):
        get_runtime("torch").load(model, precision="fp16")


def test_measure_uses_a_gpu_sessions_own_timer():
    from edgesmith.profiling.measure import _device_memory_mb, measure
    from edgesmith.runtimes.base import Session

    class FakeGpuSession(Session):
        device = "cuda:0"
        times_on_device = True
        runs = 0
        input_names = ["input_ids"]

        def run(self, feeds):
            raise AssertionError("a GPU session is timed through time_run")

        def time_run(self, feeds):
            self.runs += 1
            return 0.25 * self.runs

        def synchronize(self):
            pass

        def device_memory_mb(self):
            return 123.0

    session = FakeGpuSession()
    latencies = measure(session, [{"input_ids": np.zeros((1, 4), np.int64)}], warmup=2, iterations=3)
    assert latencies == [0.75, 1.0, 1.25] and session.runs == 5
    assert _device_memory_mb(session) == 123.0


# ---------------------------------------------------------------------------------------------
# The command line: clear exit-2 refusals where the GPU stack is missing
# ---------------------------------------------------------------------------------------------


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_gpu_requests_fail_with_exit_2_here(capsys, tmp_path, token_model):
    code, _, err = _cli(capsys, "profile", "minilm", "--runtime", "torch", "--device", "cuda", "--dtype", "bf16",
                        "--compile")
    assert code == 2 and "torch device 'cuda'" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "profile", str(token_model.path), "--runtime", "onnxruntime", "--provider", "cuda")
    assert code == 2 and "CUDAExecutionProvider" in err
    code, _, err = _cli(capsys, "profile", str(token_model.path), "--provider", "tensorrt",
                        "--provider-option", "trt_fp16_enable=True")
    assert code == 2 and "TensorrtExecutionProvider" in err
    engine = _fake_engine(token_model, tmp_path / "scratch").save(tmp_path / "engine")
    code, _, err = _cli(capsys, "profile", str(engine), "--runtime", "tensorrt")
    assert code == 2 and ("tensorrt is not installed" in err or "CUDA" in err)
    code, _, err = _cli(capsys, "export", str(token_model.path), "--to", "tensorrt", "--precision", "fp16",
                        "--shapes", "batch=1:8:32,seq=16:128:256")
    assert code == 2 and ("tensorrt is not installed" in err or "CUDA GPU" in err)
    assert len(err.strip().splitlines()) <= 3  # one message (rich may wrap it), no traceback


def test_cli_flags_that_do_not_fit_the_runtime_are_refused(capsys, token_model):
    code, _, err = _cli(capsys, "profile", str(token_model.path), "--dtype", "bf16")
    assert code == 2 and "--dtype applies to --runtime torch" in err
    code, _, err = _cli(capsys, "profile", "minilm", "--provider-option", "a=b")
    assert code == 2 and "--provider-option applies to --runtime onnxruntime" in err
    code, _, err = _cli(capsys, "export", "minilm", "--to", "tensorrt")
    assert code == 2 and "builds from an ONNX model" in err
    code, _, err = _cli(capsys, "export", str(token_model.path), "--to", "tensorrt", "--shapes", "batch=4:2:1")
    assert code == 2 and "MIN <= OPT <= MAX" in err
    code, _, err = _cli(capsys, "export", str(token_model.path), "--to", "coreml")
    assert code == 2 and "only 'onnx', 'genai', 'gguf' and 'tensorrt'" in err


def test_doctor_names_each_gpu_runtime_with_a_reason(capsys):
    code, out, _ = _cli(capsys, "doctor", "--json")
    assert code == 0
    rows = {r["runtime"]: r for r in json.loads(out)}
    for name in ("torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "trtexec"):
        assert name in rows
        assert rows[name]["usable"] or rows[name]["reason"]
    if not rows["tensorrt"]["usable"] and rows["tensorrt"]["version"] is None:
        assert "NVIDIA's package index" in rows["tensorrt"]["reason"]


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here with the reason)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, compile_, graphs", [("fp32", False, False), ("fp16", False, True),
                                                     ("bf16", True, False)])
def test_torch_cuda_profiles_record_what_ran(tiny_bert_dir, dtype, compile_, graphs):
    from edgesmith.profiling import profile

    model = load(tiny_bert_dir)
    prof = profile(model, "torch", provider="cuda", batch=2, seq=32, warmup=3, iterations=10, dtype=dtype,
                   compile=compile_ or None, cuda_graphs=graphs or None)
    assert prof.runtime.providers == ["torch-cuda"] and prof.runtime.options["dtype"] == dtype
    assert prof.peak_device_memory_mb and prof.peak_device_memory_mb > 0
    assert prof.environment.gpu is not None and prof.stats.n == 10
    assert next(model.module.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_builds_validates_and_profiles(tiny_bert_dir, tmp_path, monkeypatch):
    from edgesmith.export import to_onnx, to_tensorrt
    from edgesmith.profiling import profile

    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    onnx_model = to_onnx(load(tiny_bert_dir))
    engine = to_tensorrt(onnx_model, precision="fp16", shapes=["batch=1:2:4,seq=8:32:64"])
    report = engine.lineage[-1]["report"]
    assert report["min_cosine"] >= 0.999 and engine.engine_meta["precision"] == "fp16"
    prof = profile(engine, "tensorrt", batch=2, seq=32, warmup=3, iterations=10, per_op=True, per_op_runs=3)
    assert prof.runtime.providers == ["TensorRT"] and prof.per_op and prof.peak_device_memory_mb
    with pytest.raises(BadInput, match="outside every optimization profile"):
        profile(engine, "tensorrt", batch=8, seq=32, warmup=0, iterations=1)
