"""Weight-only INT4/INT8 of decoder ONNX graphs with ONNX Runtime's MatMulNBitsQuantizer
(edgesmith.compress.quantization.weight_only): structure, fidelity, the accuracy-aware fallback, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_lm import build_tiny_decoder

from edgesmith.artifacts import OnnxModel, load
from edgesmith.compress.quantization.weight_only import WeightOnlyConfig, kquant_available, quantize_weight_only
from edgesmith.errors import BadInput, GateFailed
from edgesmith.passes import Context


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory)


MATMULS = 15  # 2 layers x (q, k, v, o, gate, up, down) + the LM head


def _ops(model: OnnxModel) -> dict[str, list]:
    graph = onnx.load(str(model.path)).graph
    found: dict[str, list] = {}
    for node in graph.node:
        found.setdefault(node.op_type, []).append(node)
    return found


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_matmuls(model: OnnxModel) -> list[str]:
    graph = onnx.load(str(model.path)).graph
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_int4_round_trip(tiny_decoder):
    parent = tiny_decoder.plain
    ctx = Context()
    quantized = quantize_weight_only(parent, {}, ctx)
    report = ctx.report
    nbits = _ops(quantized)["MatMulNBits"]
    assert len(nbits) == MATMULS and not _weight_matmuls(quantized)
    assert {(_attrs(n)["bits"], _attrs(n)["block_size"], _attrs(n)["accuracy_level"]) for n in nbits} == {(4, 32, 4)}
    assert report["size_after"] < 0.6 * report["size_before"]
    assert 0 < report["fidelity"]["kld"] < 1.0 and report["fidelity"]["top1"] > 0.5
    assert report["lm_head"]["precision"] == "int4" and report["nodes"] == {"int4": report["nodes"]["int4"]}
    # a real artifact: companions copied, decoder meta kept, loads and runs like its parent
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (quantized.folder / name).exists()
    quantized.save(quantized.folder)
    again = load(quantized.folder)
    assert again.meta["decoder"] == parent.meta["decoder"] and again.meta["precision"] == "int4"
    assert json.loads((quantized.folder / "edgesmith.json").read_text())["meta"]["quantization"]["method"] == "rtn"
    from edgesmith.lm_quality import lm_fidelity

    assert lm_fidelity(again, parent)["kld"] == pytest.approx(report["fidelity"]["kld"], rel=1e-4)


@pytest.mark.parametrize("options", [{"method": "hqq"}, {"method": "gptq", "calibration_passages": 2},
                                     {"method": "k-quant"}, {"symmetric": True}, {"bits": 8}])
def test_methods(tiny_decoder, options):
    if options.get("method") == "k-quant" and not kquant_available():
        pytest.skip("this onnxruntime has no k-quant")
    ctx = Context()
    quantized = quantize_weight_only(tiny_decoder.plain, options, ctx)
    nbits = _ops(quantized)["MatMulNBits"]
    assert len(nbits) == MATMULS
    assert {_attrs(n)["bits"] for n in nbits} == {options.get("bits", 4)}
    assert all(_attrs(n).get("accuracy_level") == 4 for n in nbits)  # also for HQQ, which does not set it
    assert all(len(n.input) == (3 if options.get("symmetric") else 4) for n in nbits)
    kld = ctx.report["fidelity"]["kld"]
    assert 0 < kld < (0.01 if options.get("bits") == 8 else 1.0)


def test_gptq_on_the_full_layout(tiny_decoder):
    """GPTQ's calibration feeds follow the decoder layout (position ids, empty KV cache)."""
    ctx = Context()
    quantized = quantize_weight_only(tiny_decoder.past, {"method": "gptq", "calibration_passages": 2}, ctx)
    assert len(_ops(quantized)["MatMulNBits"]) == MATMULS
    assert 0 < ctx.report["fidelity"]["kld"] < 1.0


def test_lm_head_and_embedding_options(tiny_decoder):
    ctx = Context()
    kept = quantize_weight_only(tiny_decoder.plain, {"quantize_lm_head": False}, ctx)
    assert ctx.report["lm_head"]["precision"] == "float"
    assert _weight_matmuls(kept) == [ctx.report["lm_head"]["node"]]
    assert kept.meta["precision"] == "int4+float"
    plain = Context()
    quantize_weight_only(tiny_decoder.plain, {}, plain)
    ctx = Context()
    small = quantize_weight_only(tiny_decoder.plain, {"quantize_embedding": True}, ctx)
    assert ctx.report["size_after"] < plain.report["size_after"] - 60_000  # the 100 kB float table is gone
    gathers = _ops(small)["GatherBlockQuantized"]
    assert len(gathers) == 1 and ctx.report["embedding"]["precision"] == "int4"
    assert ctx.report["size_after"] < 0.55 * ctx.report["size_before"]
    assert 0 < ctx.report["fidelity"]["kld"] < 1.0


def test_accuracy_aware_fallback(tiny_decoder):
    full = Context()
    quantize_weight_only(tiny_decoder.plain, {}, full)
    budget = full.report["fidelity"]["kld"] * 0.6
    ctx = Context()
    quantized = quantize_weight_only(tiny_decoder.plain, {"max_kld": budget}, ctx)
    fallback = ctx.report["fallback"]
    kept = fallback["groups_at_fallback"]
    assert kept and all(v["precision"] == "int8" for v in kept.values())
    assert set(fallback["group_costs"]) == {"layer.0", "layer.1", "lm_head"}
    costs = list(fallback["group_costs"].values())
    assert costs == sorted(costs, reverse=True) and costs[-1] > 0
    assert list(kept) == list(fallback["group_costs"])[:len(kept)]  # the most sensitive first
    assert ctx.report["fidelity"]["kld"] <= budget < fallback["all_quantized"]["kld"]
    eight = {n for v in kept.values() for n in v["nodes"]}
    assert set(ctx.report["nodes"]["int8"]["names"]) == eight
    bits = {n.name: _attrs(n)["bits"] for n in _ops(quantized)["MatMulNBits"]}
    assert sorted(b for b in bits.values()) == sorted([8] * len(eight) + [4] * (MATMULS - len(eight)))
    assert quantized.meta["precision"] == "int4+int8"
    # to float instead
    ctx = Context()
    floated = quantize_weight_only(tiny_decoder.plain, {"max_kld": budget, "fallback": "float"}, ctx)
    assert len(_weight_matmuls(floated)) == len(ctx.report["nodes"]["float"]["names"]) > 0
    assert ctx.report["fidelity"]["kld"] <= budget
    # a generous budget changes nothing
    ctx = Context()
    quantize_weight_only(tiny_decoder.plain, {"max_kld": 10.0}, ctx)
    assert ctx.report["fallback"]["groups_at_fallback"] == {} and ctx.report["nodes"].keys() == {"int4"}


def test_impossible_budget_is_a_failed_gate(tiny_decoder):
    with pytest.raises(GateFailed, match="every layer group at int8") as err:
        quantize_weight_only(tiny_decoder.plain, {"max_kld": 1e-9})
    assert "\n" not in str(err.value) and err.value.exit_code == 3
    with pytest.raises(GateFailed, match="no layer group can be quantized"):
        quantize_weight_only(tiny_decoder.plain, {"max_kld": 0.0, "fallback": "float"})


def _encoder_without_matmul_weights(folder) -> OnnxModel:
    """A Gemm classifier head: nothing a MatMulNBits can take."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="head")], "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.normal(size=(64, 4)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return OnnxModel(task="feature-extraction", name="encoder", folder=folder)


def test_bad_inputs(tiny_decoder, tmp_path):
    encoder = _encoder_without_matmul_weights(tmp_path / "encoder")
    with pytest.raises(BadInput, match="no MatMul with a constant 2-D float weight") as err:
        quantize_weight_only(encoder, {"bits": 4})
    assert "\n" not in str(err.value)
    for options, message in [({"block": 48}, "power of two"), ({"block": 8}, "at least 16"),
                             ({"method": "gptq", "bits": 8}, "4-bit weights only"),
                             ({"method": "rtn", "gptq_damp": 0.1}, "apply to method gptq"),
                             ({"fallback": "float"}, "set max_kld"), ({"max_kld": -1}, "0 or more"),
                             ({"bits": 3}, "bits")]:
        with pytest.raises(BadInput, match=message) as err:
            quantize_weight_only(tiny_decoder.plain, options)
        assert "\n" not in str(err.value)
    # an already quantized graph has nothing left to quantize
    once = quantize_weight_only(tiny_decoder.plain, {})
    with pytest.raises(BadInput, match="already quantized"):
        quantize_weight_only(once, {})
    with pytest.raises(BadInput, match="causal LM"):
        quantize_weight_only(OnnxModel(task="feature-extraction", name="x", folder=tiny_decoder.plain.folder),
                             {"max_kld": 0.1})


def test_config_defaults():
    cfg = WeightOnlyConfig()
    assert (cfg.bits, cfg.block, cfg.method, cfg.accuracy_level, cfg.quantize_lm_head) == (4, 32, "rtn", 4, True)
    assert cfg.max_kld is None and cfg.precision == "int4"


def test_method_names_help_and_checks_come_from_the_tables():
    """The config literals, the quantize CLI's help and the validators read the method tables."""
    import inspect
    import typing

    from edgesmith.cli.passes import quantize_command
    from edgesmith.compress.quantization.config import QuantizeConfig
    from edgesmith.compress.quantization.weight_only import ALGORITHMS, METHODS, SOURCES
    from edgesmith.passes import make_config as _make

    def make_config(cls, options):
        return _make(cls, options, where="weight-only quantization")

    assert METHODS == (*ALGORITHMS, *SOURCES)
    assert typing.get_args(WeightOnlyConfig.model_fields["method"].annotation) == METHODS
    assert set(METHODS) <= set(typing.get_args(QuantizeConfig.model_fields["method"].annotation))
    method_help = inspect.signature(quantize_command).parameters["method"].default.help
    assert all(name in method_help for name in METHODS)
    for algorithm in ALGORITHMS.values():
        if not algorithm.available():
            continue
        for bits in (4, 8):
            if bits in algorithm.bits:
                assert make_config(WeightOnlyConfig, {"method": algorithm.name, "bits": bits}).bits == bits
            else:
                with pytest.raises(BadInput, match=f"{bits}-bit|{algorithm.bits[0]}-bit weights only"):
                    make_config(WeightOnlyConfig, {"method": algorithm.name, "bits": bits})
        others = [o for o in ALGORITHMS if o != algorithm.name and ALGORITHMS[o].options]
        for other in others:
            with pytest.raises(BadInput, match=f"apply to method {other} only"):
                make_config(WeightOnlyConfig, {"method": algorithm.name, ALGORITHMS[other].options[0]: 1})
    for source in SOURCES.values():
        with pytest.raises(BadInput, match=f"needs {source.file_option}"):
            make_config(WeightOnlyConfig, {"method": source.name})
        with pytest.raises(BadInput, match=f"not apply to method {source.name}"):
            make_config(WeightOnlyConfig, {"method": source.name, source.file_option: "x", "bits": 4})


def test_on_the_edgesmith_decoder_export(tiny_decoder, tmp_path):
    """The real layout (dynamo export: logits_to_keep, the tied LM head as Transpose(embedding),
    module paths only in node metadata) quantizes and scores the same way."""
    decoder = pytest.importorskip("edgesmith.export.decoder")
    exported = decoder.export_decoder(tiny_decoder.torch, tmp_path / "exported", steps=4)
    assert exported.meta["decoder"]["logits"] == "selectable"
    full = Context()
    quantize_weight_only(exported, {}, full)
    assert full.report["transposed_weights_materialized"] == 1 and full.report["lm_head"]["precision"] == "int4"
    ctx = Context()
    quantized = quantize_weight_only(exported, {"max_kld": full.report["fidelity"]["kld"] * 0.6}, ctx)
    assert set(ctx.report["fallback"]["group_costs"]) == {"layer.0", "layer.1", "lm_head"}
    assert len(_ops(quantized)["MatMulNBits"]) == MATMULS
    assert quantized.meta["decoder"] == exported.meta["decoder"]
