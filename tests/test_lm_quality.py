"""Decoder fidelity (edgesmith.lm_quality): KL divergence, top-1 agreement and perplexity on held-out
corpus text, from torch models, decoder ONNX graphs (with or without KV-cache inputs) and callables."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_lm import build_tiny_decoder, tiny_llama

from edgesmith import lm_quality as lq
from edgesmith.artifacts import OnnxModel, TorchModel
from edgesmith.data import builtin_corpus
from edgesmith.errors import BadInput


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory)


def test_identical_models_have_zero_divergence(tiny_decoder):
    same = lq.lm_fidelity(tiny_decoder.torch, tiny_decoder.torch)
    assert same["kld"] == 0.0 and same["top1"] == 1.0
    assert same["perplexity"] == same["perplexity_reference"] > 1
    assert set(same) == {"kld", "top1", "perplexity", "perplexity_reference", "tokens"}
    assert 400 <= same["tokens"] <= 1100  # ~8 passages of ~64 tokens


@pytest.mark.parametrize("layout", ["plain", "past"])
def test_onnx_export_matches_its_torch_source(tiny_decoder, layout):
    result = lq.lm_fidelity(getattr(tiny_decoder, layout), tiny_decoder.torch)
    assert result["kld"] < 1e-6
    assert result["top1"] == 1.0
    assert result["perplexity"] == pytest.approx(result["perplexity_reference"], rel=1e-4)


def test_another_model_diverges(tiny_decoder):
    other = TorchModel(task="text-generation", name="other", module=tiny_llama(seed=1), tokenizer=tiny_decoder.tokenizer)
    result = lq.lm_fidelity(other, tiny_decoder.torch)
    reverse = lq.lm_fidelity(tiny_decoder.torch, other)
    assert result["kld"] > 0.1 and reverse["kld"] > 0.1
    assert result["kld"] != pytest.approx(reverse["kld"])  # KL is not symmetric
    assert result["top1"] < 0.5
    assert result["perplexity"] == pytest.approx(reverse["perplexity_reference"])
    assert result["perplexity_reference"] == pytest.approx(reverse["perplexity"])


def test_left_and_right_padding_score_the_same_tokens(tiny_decoder):
    batches = lq.heldout_batches(tiny_decoder.tokenizer)
    assert any((b.attention_mask == 0).any() for b in batches)  # the passages really need padding
    assert all((b.attention_mask[:, -1] == 1).all() for b in batches)  # left padding
    left = lq.lm_fidelity(tiny_decoder.plain, tiny_decoder.torch, padding_side="left")
    right = lq.lm_fidelity(tiny_decoder.plain, tiny_decoder.torch, padding_side="right")
    assert left["tokens"] == right["tokens"]
    assert right["perplexity_reference"] == pytest.approx(left["perplexity_reference"], rel=1e-5)
    assert right["top1"] == left["top1"] == 1.0


def test_callables_and_a_shared_reference(tiny_decoder):
    """A logits callable is a model too; a Reference scores several candidates."""
    batches = lq.heldout_batches(tiny_decoder.tokenizer, count=4, tokens=32, batch_size=2)
    exact = lq.torch_logits(tiny_decoder.torch)
    reference = lq.Reference.build(exact, batches)
    rng = np.random.default_rng(0)

    def noisy(ids, mask):
        logits = exact(ids, mask)
        return logits + rng.normal(0, 0.5, logits.shape).astype(np.float32)

    same = reference.compare(exact)
    worse = reference.compare(noisy)
    assert same["kld"] == 0.0 and same["tokens"] == sum(b.scored for b in batches)
    assert worse["kld"] > 0.01 and worse["top1"] < 1.0

    def wrong_shape(ids, mask):
        return exact(ids, mask)[:, -1:]

    with pytest.raises(BadInput, match="logits of shape"):
        reference.compare(wrong_shape)


def test_heldout_slice_is_never_calibration():
    held = lq.heldout_texts(5)
    assert held == builtin_corpus(limit=5, offset=lq.HELDOUT_START)
    assert lq.calibration_texts(5) == builtin_corpus(limit=5)
    assert len(lq.heldout_texts()) == len(builtin_corpus()) - lq.HELDOUT_START > 1000
    assert lq.calibration_texts(3, lq.HELDOUT_START - 3) == builtin_corpus(limit=3, offset=lq.HELDOUT_START - 3)
    with pytest.raises(BadInput, match="first 30000"):
        lq.calibration_texts(10, lq.HELDOUT_START - 5)


def test_position_ids_follow_the_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert lq.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_layout_feeds_have_an_empty_cache(tiny_decoder):
    import onnx

    graph = onnx.load(str(tiny_decoder.past.path)).graph
    spec = lq.decoder_inputs_from_graph(graph, tiny_decoder.past.meta)
    batch = lq.pad_batches([[5, 6, 7], [8, 9]], batch_size=2)[0]
    feeds = spec.feeds(batch.input_ids, batch.attention_mask)
    assert feeds["past_key_values.1.value"].shape == (2, 2, 0, 16)
    assert feeds["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def _graph_model(folder, nodes, inputs, outputs, inits, meta=None) -> OnnxModel:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir()
    import onnx

    onnx.save(model, str(folder / "model.onnx"))
    return OnnxModel(task="text-generation", name=folder.name, folder=folder, meta=meta or {})


def test_bad_inputs(tiny_decoder, tmp_path):
    with pytest.raises(BadInput, match="tokenizer"):
        lq.heldout_batches(None)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(400, 400)).astype(np.float32), "E")
    starts, ends, axes = (numpy_helper.from_array(np.array([v], np.int64), n)
                          for v, n in ((-1, "start"), (2**62, "end"), (1, "axis")))
    last = _graph_model(
        tmp_path / "last-only",
        [helper.make_node("Slice", ["input_ids", "start", "end", "axis"], ["last"]),
         helper.make_node("Gather", ["E", "last"], ["logits"]),
         helper.make_node("Identity", ["attention_mask"], ["mask_out"])],
        [ids, mask], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, 400]),
                      helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["b", "s"])],
        [table, starts, ends, axes])
    with pytest.raises(BadInput, match="every position"):
        lq.lm_fidelity(last, tiny_decoder.torch, tokenizer=tiny_decoder.tokenizer)
    pixels = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3])
    odd = _graph_model(tmp_path / "odd-input", [helper.make_node("Gather", ["E", "input_ids"], ["logits"]),
                                                helper.make_node("Identity", ["pixel_values"], ["p"])],
                       [ids, pixels], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 400]),
                                       helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b", 3])], [table])
    with pytest.raises(BadInput, match="pixel_values"):
        lq.onnx_logits(odd)
    with pytest.raises(BadInput, match="padding_side"):
        lq.pad_batches([[1, 2]], padding_side="middle")
