"""The exact GGUF -> MatMulNBits repack (edgesmith.gguf.repack): hand-built Q4_0/Q4_1/Q8_0 blocks,
the nibble order, transformers' Llama q/k row permutation, a GGUF file written with the gguf
package and a tiny Llama exported from the weights transformers would dequantize from it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_lm import HEADS, KV_HEADS, build_tiny_decoder, export_decoder, tiny_llama

from edgesmith.errors import BadInput
from edgesmith.gguf.repack import from_blocks, read_weights, repack, to_nbits


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory)


def hand_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GGUF block bytes built by hand from the format (fp16 scale, fp16 min for Q4_1, codes with
    element j in the low and j + 16 in the high nibble of byte j), and the float weight they hold."""
    rng = np.random.default_rng(seed)
    nb = cols // 32
    d = rng.uniform(0.005, 0.05, (rows, nb, 1)).astype(np.float16)
    scale = d.view(np.uint8)
    if qtype == "Q8_0":
        q = rng.integers(-127, 128, (rows, nb, 32)).astype(np.int8)
        blocks = np.concatenate([scale, q.view(np.uint8)], axis=-1)
        value = d.astype(np.float32) * q.astype(np.float32)
    else:
        codes = rng.integers(0, 16, (rows, nb, 32)).astype(np.uint8)
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        if qtype == "Q4_0":
            blocks = np.concatenate([scale, qs], axis=-1)
            value = d.astype(np.float32) * (codes.astype(np.float32) - 8)
        else:
            m = rng.uniform(-0.4, 0.0, (rows, nb, 1)).astype(np.float16)
            blocks = np.concatenate([scale, m.view(np.uint8), qs], axis=-1)
            value = d.astype(np.float32) * codes.astype(np.float32) + m.astype(np.float32)
    return blocks.reshape(rows, -1), value.reshape(rows, cols)


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="proj")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_hand_built_blocks_repack_exactly(qtype):
    rows, cols = 96, 128
    blocks, value = hand_blocks(qtype, rows, cols)
    weight = from_blocks("w", qtype, blocks, rows, cols)
    assert np.array_equal(weight.dequantize(), value)  # gguf reads the hand-built bytes as intended
    nbits = to_nbits(weight)
    assert np.array_equal(nbits.dequantize(), value)  # the nibble reorder loses nothing
    assert nbits.packed.shape == (rows, cols // 32, 16 if qtype != "Q8_0" else 32)
    model = matmul_model(value.T.copy())
    a = np.random.default_rng(1).normal(size=(2, 5, cols)).astype(np.float32)
    ref = a @ value.T
    exact, report = repack(model, [weight], accuracy_level=0)
    assert report["matched"] == {"proj": {"gguf": "w", "type": qtype, "op": "MatMulNBits", "permuted": False}}
    ops = [n.op_type for n in exact.graph.node]
    assert ops == (["MatMulNBits", "MatMul", "MatMul", "Add"] if qtype == "Q4_1" else ["MatMulNBits"])
    assert not any(i.name == "W" for i in exact.graph.initializer)
    assert rel_error(run(exact, {"A": a}), ref) < 1e-5
    fast, _ = repack(model, [weight], accuracy_level=4)
    assert rel_error(run(fast, {"A": a}), ref) < 1e-2  # int8 activations, per block


def test_wrong_nibble_order_would_be_caught():
    """Packing GGUF bytes as they are (j, j+16 instead of 2j, 2j+1) gives another matrix."""
    blocks, value = hand_blocks("Q4_0", 8, 64)
    nbits = to_nbits(from_blocks("w", "Q4_0", blocks, 8, 64))
    naive = blocks.reshape(8, 2, 18)[..., 2:]
    assert not np.array_equal(naive, nbits.packed)
    nbits.packed = naive.copy()
    assert not np.allclose(nbits.dequantize(), value)


@pytest.mark.parametrize("name, rows", [("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)])
def test_llama_qk_permutation_from_transformers(name, rows):
    """transformers' own reverse permutation of q/k rows is undone by matching rows by value."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    blocks, value = hand_blocks("Q4_0", rows, 64, seed=2)
    weight = from_blocks(name, "Q4_0", blocks, rows, 64)
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    hf = processor.process(weights=weight.dequantize(), name=name).weights
    assert not np.array_equal(hf, value)  # transformers did permute
    model = matmul_model(np.ascontiguousarray(hf.T))
    repacked, report = repack(model, [weight], accuracy_level=0)
    assert report["matched"]["proj"]["permuted"] and report["permuted"] == ["proj"]
    a = np.random.default_rng(3).normal(size=(1, 4, 64)).astype(np.float32)
    assert rel_error(run(repacked, {"A": a}), a @ hf.T) < 1e-5


def _write_gguf(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (qtype, blocks) in tensors.items():
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_llama_end_to_end(tiny_decoder, tmp_path):
    """A tiny Llama whose weights are what transformers dequantizes from a GGUF (Q4_0 attention,
    Q4_1 MLP, Q8_0 tied embedding; q/k rows permuted as transformers reads them), exported to
    ONNX and repacked from the GGUF file: every weight matched, outputs equal to the FP32 export
    (accuracy level 0), and close at level 4 through quantize_weight_only(method="gguf")."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from edgesmith.artifacts import OnnxModel, copy_companions
    from edgesmith.compress.quantization.weight_only import quantize_weight_only
    from edgesmith.lm_quality import lm_fidelity
    from edgesmith.onnx_graph.edit import save_graph
    from edgesmith.passes import Context

    model = tiny_llama(seed=3)
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    kinds = {"q_proj": ("attn_q", "Q4_0"), "k_proj": ("attn_k", "Q4_0"), "v_proj": ("attn_v", "Q4_0"),
             "o_proj": ("attn_output", "Q4_0"), "gate_proj": ("ffn_gate", "Q4_1"),
             "up_proj": ("ffn_up", "Q4_1"), "down_proj": ("ffn_down", "Q4_1")}
    tensors = {}
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() != 2:
                continue
            if pname == "model.embed_tokens.weight":
                gname, qtype = "token_embd.weight", "Q8_0"
            else:
                layer = pname.split(".")[2]
                suffix, qtype = kinds[pname.split(".")[-2]]
                gname = f"blk.{layer}.{suffix}.weight"
            blocks = quantize(param.numpy(), GGMLQuantizationType[qtype])
            tensors[gname] = (qtype, blocks)
            dequantized = from_blocks(gname, qtype, blocks, *param.shape).dequantize()
            param.copy_(torch.from_numpy(processor.process(weights=dequantized, name=gname).weights.copy()))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tensors)
    assert {w.qtype for w in read_weights(path)} == {"Q4_0", "Q4_1", "Q8_0"}
    parent = export_decoder(model, tiny_decoder.folder / "tokenizer", tmp_path / "fp32")
    proto = onnx.load(str(parent.path))
    # level 0 computes in float: the source's outputs; level 4's int8 activations cost little on this
    # deliberately sharp random model (KL ~1e-3, where RTN INT4 of the FP32 weights costs ~0.1)
    repacked, report = repack(proto, path, accuracy_level=0)
    assert report["float"] == {}
    assert report["types"] == {"Q4_0": 8, "Q4_1": 6, "Q8_0": 2}  # the LM head and the embedding Gather
    assert len(report["permuted"]) == 4  # q and k of both layers
    assert report["blocksum_branches"] == 4  # per layer: one shared by gate/up, one for down
    ops = [n.op_type for n in repacked.graph.node]
    assert ops.count("MatMulNBits") == 15 and ops.count("GatherBlockQuantized") == 1
    save_graph(repacked, tmp_path / "exact")
    copy_companions(parent.folder, tmp_path / "exact")
    exact = lm_fidelity(OnnxModel(task="text-generation", name="r", meta=parent.meta, folder=tmp_path / "exact"), parent)
    assert exact["kld"] < 1e-8 and exact["top1"] == 1.0
    # the same through the weight-only entry point (method gguf), at accuracy level 4
    ctx = Context()
    fast = quantize_weight_only(parent, {"method": "gguf", "gguf_file": str(path)}, ctx)
    assert ctx.report["nodes"]["int4"]["count"] == 14 and ctx.report["lm_head"]["precision"] == "int8"
    assert ctx.report["embedding"]["precision"] == "int8" and fast.meta["precision"] == "int4+int8"
    assert ctx.report["fidelity"]["kld"] < 5e-3 and ctx.report["fidelity"]["top1"] > 0.9
    assert ctx.report["size_after"] < 0.4 * parent.size_bytes()
    ctx = Context()
    quantize_weight_only(parent, {"method": "gguf", "gguf_file": str(path), "quantize_lm_head": False,
                                  "quantize_embedding": False}, ctx)
    assert ctx.report["lm_head"]["precision"] == "float" and ctx.report["embedding"]["precision"] == "float"
    for options, message in [({"method": "gguf"}, "needs gguf_file"),
                             ({"method": "gguf", "gguf_file": str(path), "bits": 8}, "not apply to method gguf"),
                             ({"gguf_file": str(path)}, "method gguf only")]:
        with pytest.raises(BadInput, match=message):
            quantize_weight_only(parent, options)


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        read_weights(tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(BadInput, match="corrupt or truncated"):
        read_weights(broken)
    with pytest.raises(BadInput, match="cannot be repacked exactly"):
        from_blocks("w", "Q4_K", np.zeros((4, 144), np.uint8), 4, 256)
    blocks, value = hand_blocks("Q4_0", 16, 64)
    other = matmul_model(np.random.default_rng(9).normal(size=(64, 16)).astype(np.float32))
    with pytest.raises(BadInput, match="no weight of the graph equals a tensor of the GGUF"):
        repack(other, [from_blocks("w", "Q4_0", blocks, 16, 64)])
    with pytest.raises(BadInput, match="accuracy_level"):
        repack(matmul_model(value.T.copy()), [from_blocks("w", "Q4_0", blocks, 16, 64)], accuracy_level=7)


@pytest.mark.slow
def test_smollm2_repack_is_exact(tmp_path):
    """The packaged SmolLM2 Q4_1 GGUF: dequantized by transformers, exported, repacked from the file:
    every Q4_1 matrix and the Q8_0 embedding matched, outputs equal to the FP32 graph at level 0.
    (Minutes and ~3 GB of memory: conversion, a 650 MB export, two sessions.)"""
    from transformers import AutoModelForCausalLM

    from edgesmith.compress.quantization.weight_only import quantize_weight_only
    from edgesmith.gguf.source import gguf_to_folder, smollm2_gguf_path
    from edgesmith.passes import Context

    gguf_file = smollm2_gguf_path()
    folder = gguf_to_folder(gguf_file, cache_root=tmp_path / "cache")
    module = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    parent = export_decoder(module, folder, tmp_path / "fp32", name="smollm2")
    ctx = Context(workdir=tmp_path / "work")
    quantize_weight_only(parent, {"method": "gguf", "gguf_file": str(gguf_file), "accuracy_level": 0}, ctx)
    report = ctx.report
    assert report["gguf"]["types"] == {"Q4_1": 210, "Q8_0": 2} and report["gguf"]["not_matched"] == {}
    assert len(report["gguf"]["permuted"]) == 60  # q and k of 30 layers
    assert report["fidelity"]["kld"] < 1e-5 and report["fidelity"]["top1"] == 1.0
    assert report["size_after"] < 0.25 * report["size_before"]
