"""The quantize pass: ONNX Runtime dynamic INT8 on a tiny exported BERT, checked by reading the graph."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgesmith.artifacts import OnnxModel, TorchModel, default_model_path
from edgesmith.compress.base import Context
from edgesmith.compress.quantization import QuantizeConfig, QuantizePass
from edgesmith.errors import BadInput, ValidationFailed

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tokenizer) -> OnnxModel:
    """A tiny random BERT exported with plain torch.onnx.export (dynamo, dynamic axes) with both
    outputs, so the graph holds 12 weight MatMuls, 4 activation MatMuls and the pooler's Gemm."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**TINY, attn_implementation="eager")
    model = BertModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny-onnx")
    enc = tokenizer(["a short one", "a somewhat longer sentence to pad the batch"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: seq}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecated pytree types
        torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"]), str(folder / "model.onnx"), dynamo=True,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "pooler_output"],
                          dynamic_shapes=(axes, axes), external_data=False, report=False, verbose=False)
    tokenizer.save_pretrained(str(folder))
    config.save_pretrained(str(folder))
    return OnnxModel(name="tiny", folder=folder, meta={"num_attention_heads": 4, "hidden_size": 32})


def folder_digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def graph(model: OnnxModel):
    return onnx.load(str(model.path)).graph


def ops(model: OnnxModel) -> list[str]:
    return [n.op_type for n in graph(model).node]


def quantize(model: OnnxModel, **options) -> tuple[OnnxModel, dict]:
    ctx = Context()
    out = QuantizePass(**options)(model, ctx)
    return out, out.lineage[-1]["report"]


@pytest.fixture(scope="module")
def quantized(tiny_onnx) -> tuple[OnnxModel, dict, dict]:
    before = folder_digest(tiny_onnx.folder)
    out, report = quantize(tiny_onnx)
    return out, report, before


def test_weights_become_int8_matmulinteger(quantized, tiny_onnx):
    out, report, _ = quantized
    kinds = ops(out)
    assert "MatMulInteger" in kinds and "DynamicQuantizeLinear" in kinds
    g = graph(out)
    inits = {i.name: i for i in g.initializer}
    weights = [n.input[1] for n in g.node if n.op_type == "MatMulInteger"]
    assert len(weights) == 13  # 12 encoder projections + the pooler's Gemm (rewritten to MatMul)
    assert all(inits[w].data_type == onnx.TensorProto.INT8 for w in weights)
    # the attention products (activation x activation) have no weight: they stay float MatMuls
    assert kinds.count("MatMul") == 4
    assert report["quantized"]["count"] == {"MatMul": 12, "Gemm": 1}
    names = report["quantized"]["nodes"]
    assert len(names["MatMul"]) == 12 and len(names["Gemm"]) == 1
    gemms = [n.name for n in graph(tiny_onnx).node if n.op_type == "Gemm"]
    assert names["Gemm"] == gemms
    # weights left in float: the three embedding tables
    assert report["float"]["count"] == {"Gather": 3}


def test_smaller_and_faithful(quantized):
    out, report, _ = quantized
    assert report["size_after"] == out.size_bytes()
    assert report["size_after"] < report["size_before"]
    fid = report["fidelity"]
    assert fid["min_cosine"] >= 0.95
    assert 0.95 <= fid["cosine"] <= 1.0
    assert 0 < fid["max_abs"] < 1  # quantized: close, yet not bit-identical
    assert 0 <= fid["recall@10"] <= 1


def test_input_untouched_and_companions_copied(quantized, tiny_onnx):
    out, _, before = quantized
    assert folder_digest(tiny_onnx.folder) == before
    assert out.folder != tiny_onnx.folder
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out.folder / name).read_bytes() == (tiny_onnx.folder / name).read_bytes()
    assert out.tokenizer() is not None
    assert tiny_onnx.lineage == [] and "precision" not in tiny_onnx.meta


def test_lineage_and_meta(quantized, tiny_onnx):
    out, report, _ = quantized
    step = out.lineage[-1]
    assert step["pass"] == "quantize"
    assert step["config"]["per_channel"] is True and step["config"]["mode"] == "dynamic"
    assert step["input_hash"] == tiny_onnx.content_hash()
    assert step["output_hash"] == out.content_hash() != tiny_onnx.content_hash()
    assert report["per_channel"] is True
    assert out.meta["precision"] == "int8-dynamic"
    assert out.meta["num_attention_heads"] == 4 and out.meta["hidden_size"] == 32
    assert out.meta["quantization"]["per_channel"] is True


def test_saved_and_reloaded(quantized, tmp_path):
    from edgesmith.artifacts import load

    out, _, _ = quantized
    saved = load(out.save(tmp_path / "q"))
    assert isinstance(saved, OnnxModel)
    assert saved.meta["precision"] == "int8-dynamic"
    assert json.loads((tmp_path / "q" / "edgesmith.json").read_text())["lineage"][-1]["pass"] == "quantize"


def weight_scale_shapes(model: OnnxModel) -> list[tuple[int, ...]]:
    """Shapes of the weight scales feeding the dequantizing Mul after each MatMulInteger."""
    g = graph(model)
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    return [inits[name] for name in inits if name.endswith("_scale") and name in
            {i for n in g.node if n.op_type == "Mul" for i in n.input}]


def test_per_channel_vs_per_tensor_scales(quantized, tiny_onnx):
    per_channel, _, _ = quantized
    per_tensor, report = quantize(tiny_onnx, per_channel=False)
    assert report["per_channel"] is False
    assert per_tensor.lineage[-1]["config"]["per_channel"] is False
    channel_scales = weight_scale_shapes(per_channel)
    tensor_scales = weight_scale_shapes(per_tensor)
    # per channel: one scale per output column (32 or 64 here); per tensor: one scalar per weight
    assert channel_scales and all(len(s) == 1 and s[0] in (32, 64) for s in channel_scales)
    assert tensor_scales and all(s in ((), (1,)) for s in tensor_scales)


def test_op_types_choose_the_nodes(tiny_onnx):
    only_gemm, report = quantize(tiny_onnx, op_types=["Gemm"])
    assert report["quantized"]["count"] == {"Gemm": 1}
    assert report["float"]["count"]["MatMul"] == 12
    assert ops(only_gemm).count("MatMulInteger") == 1
    only_matmul, report = quantize(tiny_onnx, op_types=["MatMul"])
    assert report["quantized"]["count"] == {"MatMul": 12}
    assert report["float"]["count"]["Gemm"] == 1


def test_quantize_embeddings(quantized, tiny_onnx):
    _, plain, _ = quantized
    out, report = quantize(tiny_onnx, quantize_embeddings=True)
    assert report["quantized"]["count"]["Gather"] == 3
    g = graph(out)
    inits = {i.name: i for i in g.initializer}
    tables = [n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits]
    # ORT stores tables as activations are stored in dynamic mode: uint8 with a zero point
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert any(inits[t].data_type in eight_bit and inits[t].dims[0] == 30522 for t in tables)
    # the 30522 x 32 word table is most of this model: 8-bit makes the file far smaller
    assert report["size_after"] < plain["size_after"] / 2
    assert out.meta["quantization"]["op_types"] == ["MatMul", "Gemm", "Gather"]


def test_fidelity_floor_refuses(tiny_onnx):
    ctx = Context()
    with pytest.raises(ValidationFailed, match="min cosine to the parent graph"):
        QuantizePass(min_cosine=1.0)(tiny_onnx, ctx)
    # nothing of the refused output is left in the scratch folder
    assert not any(p.name.startswith("quantize-") for p in ctx.workdir.iterdir())


def test_nothing_to_quantize(quantized):
    out, _, _ = quantized
    with pytest.raises(BadInput, match="no node of op types"):
        quantize(out)


@pytest.mark.parametrize("options, needle", [
    ({"mode": "foo"}, "mode"),
    ({"op_types": ["Conv2x"]}, "Conv2x"),
    ({"op_types": ["Gather"]}, "quantize_embeddings"),
    ({"op_types": []}, "at least one"),
    ({"weight_type": "int4"}, "weight_type"),
    ({"min_cosine": 2}, "cosine"),
    ({"bits": 4}, "unknown key 'bits'"),
])
def test_bad_options(options, needle):
    with pytest.raises(BadInput, match=needle):
        QuantizePass(**options)


def test_config_defaults():
    cfg = QuantizeConfig()
    assert (cfg.mode, cfg.per_channel, cfg.op_types, cfg.weight_type) == ("dynamic", True, ["MatMul", "Gemm"], "int8")
    assert cfg.precision == "int8-dynamic"


def test_refuses_torch_models(tokenizer):
    from transformers import BertConfig, BertModel

    model = TorchModel(module=BertModel(BertConfig(**TINY)).eval(), tokenizer=tokenizer)
    with pytest.raises(BadInput, match="takes onnx models"):
        QuantizePass()(model, Context())


@pytest.mark.slow
def test_minilm_int8_keeps_cosine(tmp_path):
    """Per-channel dynamic INT8 of the packaged MiniLM (exported by the export pass).

    The embedding tables are 12M of its 22.7M parameters: under 30 MB needs them in 8 bits too
    (with float tables the file is ~59 MB)."""
    from edgesmith.artifacts import load
    from edgesmith.data import builtin_corpus
    from edgesmith.quality import embed, fidelity
    from edgesmith.export.onnx import ExportPass

    ctx = Context(workdir=tmp_path)
    fp32 = ExportPass()(load("minilm"), ctx)
    int8 = QuantizePass(quantize_embeddings=True)(fp32, ctx)
    texts = builtin_corpus(limit=128)
    metrics = fidelity(embed(fp32, texts), embed(int8, texts))
    assert metrics["cosine"] >= 0.98
    assert int8.size_bytes() < 30 * 1024 * 1024
    report = int8.lineage[-1]["report"]
    assert report["quantized"]["count"] == {"MatMul": 36, "Gather": 3}
    assert np.isfinite(report["fidelity"]["cosine"])


def test_registered_by_name(tiny_onnx):
    from edgesmith.compress.base import get_pass

    out = get_pass("quantize")(op_types=["MatMul"])(tiny_onnx, Context())
    assert out.lineage[-1]["pass"] == "quantize"
    assert out.lineage[-1]["report"]["quantized"]["count"] == {"MatMul": 12}
