"""The ONNX export pass and its validation, on tiny BERTs built from configs (real MiniLM tokenizer)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

import edgesmith
from edgesmith.artifacts import OnnxModel, TorchModel, default_model_path
from edgesmith.data import builtin_corpus
from edgesmith.errors import EXIT_GATE_FAILED, BadInput, ValidationFailed
from edgesmith.export.graph import attention_shape
from edgesmith.export.onnx import ExportConfig, ExportPass
from edgesmith.inputs import tokenize
from edgesmith.passes import Context
from edgesmith.validation import compare_outputs, validate

VOCAB = 30522


def tiny_config(**overrides) -> BertConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  vocab_size=VOCAB, max_position_embeddings=128)
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-work")


@pytest.fixture(scope="module")
def tiny(tokenizer) -> TorchModel:
    torch.manual_seed(0)
    return TorchModel(module=BertModel(tiny_config()).eval(), tokenizer=tokenizer, name="tiny-bert")


@pytest.fixture(scope="module")
def exported(tiny, workdir):
    before = {"hash": tiny.content_hash(), "attention": tiny.module.config._attn_implementation,
              "lineage": list(tiny.lineage)}
    onnx_model = ExportPass()(tiny, Context(workdir=workdir / "ctx"))
    return onnx_model, before


def torch_output(model: TorchModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        out = model.module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out[model.output_names[0]].numpy()


# ---------------------------------------------------------------------------------------------


def test_export_passes_validation_and_records_numbers(exported, tiny):
    onnx_model, _ = exported
    assert isinstance(onnx_model, OnnxModel)
    assert onnx_model.name == tiny.name
    step = onnx_model.lineage[-1]
    assert step["pass"] == "export"
    report = step["report"]
    assert 0 <= report["max_abs"] <= 1e-3
    assert report["min_cosine"] >= 0.9999
    assert report["output"] == "last_hidden_state"
    shapes = {(p["batch"], p["seq"]) for p in report["probes"]}
    assert {b for b, _ in shapes} == {1, 3}
    assert len(shapes) == 4
    assert any(p["padded_positions"] > 0 for p in report["probes"] if p["batch"] == 1)
    assert all(p["padded_positions"] > 0 for p in report["probes"] if p["batch"] == 3)
    assert step["config"]["atol"] == ExportConfig().atol
    assert step["output_hash"] == onnx_model.content_hash()


def test_graph_names_meta_and_folder(exported, tiny):
    onnx_model, _ = exported
    files = {f.name for f in onnx_model.folder.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    onnx.checker.check_model(str(onnx_model.path), full_check=True)
    assert onnx_model.input_names == tiny.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert onnx_model.output_names == ["last_hidden_state"]
    meta = onnx_model.meta
    assert meta["num_attention_heads"] == 4 and meta["hidden_size"] == 32
    assert meta["model_type"] == "bert" and meta["attention"] == "eager"
    assert isinstance(meta["opset"], int) and meta["opset"] >= 17
    assert "torch.onnx" in meta["exporter"]
    assert onnx_model.tokenizer is not None


def test_graph_has_dynamic_batch_and_sequence(exported, tiny, tokenizer):
    onnx_model, _ = exported
    probed = {(p["batch"], p["seq"]) for p in onnx_model.lineage[-1]["report"]["probes"]}
    graph = onnx.load(str(onnx_model.path))
    for inp in graph.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"], inp.name
    session = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    texts = builtin_corpus(limit=7, offset=100)
    for batch, seq in [(2, 5), (7, 61)]:
        assert (batch, seq) not in probed
        feeds = tokenize(tokenizer, texts[:batch], input_names=onnx_model.input_names, seq=seq)
        (out,) = session.run(None, feeds)
        assert out.shape == (batch, seq, 32)
        mask = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(out[mask], torch_output(tiny, feeds)[mask], atol=1e-4)


def test_saved_onnx_model_loads_back_the_same(exported, tmp_path):
    onnx_model, _ = exported
    target = onnx_model.save(tmp_path / "saved")
    loaded = edgesmith.load(target)
    assert isinstance(loaded, OnnxModel)
    assert loaded.content_hash() == onnx_model.content_hash()
    assert loaded.input_names == onnx_model.input_names
    assert loaded.output_names == ["last_hidden_state"]
    assert loaded.lineage == onnx_model.lineage
    assert loaded.meta["num_attention_heads"] == 4


def test_input_model_is_not_mutated(exported, tiny):
    _, before = exported
    assert tiny.content_hash() == before["hash"]
    assert tiny.module.config._attn_implementation == before["attention"] == "sdpa"
    assert tiny.lineage == before["lineage"]
    assert not tiny.module.training


class NoisyEncoder(torch.nn.Module):
    """Exports fine, but each run adds fresh noise: its graph can never match its source."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return hidden + torch.randn_like(hidden)


def test_broken_model_fails_validation_and_leaves_nothing(tokenizer, tmp_path):
    model = TorchModel(module=NoisyEncoder().eval(), tokenizer=tokenizer, name="noisy")
    assert model.input_names == ["input_ids", "attention_mask"]
    ctx = Context(workdir=tmp_path / "ctx")
    with pytest.raises(ValidationFailed) as info:
        ExportPass()(model, ctx)
    message = str(info.value)
    assert info.value.exit_code == EXIT_GATE_FAILED == 3
    assert "\n" not in message
    assert message.startswith("export of noisy fails validation: max abs diff ")
    assert "> atol 0.001 on probe batch=" in message and "min cosine" in message
    assert not list((tmp_path / "ctx").rglob("model.onnx"))


def test_validate_raises_on_a_tight_tolerance(exported, tiny):
    onnx_model, _ = exported
    result = compare_outputs(tiny, onnx_model, batches=(2,), seq_lengths=(20,))
    assert [(p["batch"], p["seq"]) for p in result["probes"]][1] == (2, 20)
    assert len(result["probes"]) == 2 and result["max_abs"] > 0
    with pytest.raises(ValidationFailed, match=r"max abs diff .* > atol 1e-12 on probe batch=2"):
        validate(tiny, onnx_model, atol=1e-12, min_cosine=0.0, batches=(2,), seq_lengths=(20,))


def test_compare_outputs_left_padding_probes(exported, tiny):
    onnx_model, _ = exported
    result = compare_outputs(tiny, onnx_model, batches=(3,), seq_lengths=(), left_padding=True,
                             texts=builtin_corpus(limit=40, offset=500))
    assert [p["padding"] for p in result["probes"]] == ["right", "left"]
    assert all(p["padded_positions"] > 0 for p in result["probes"])
    assert result["max_abs"] < 1e-3 and result["min_cosine"] > 0.9999
    assert result["probes"][0]["values"] == result["probes"][1]["values"]


def test_classifier_exports_logits(tokenizer, tmp_path):
    torch.manual_seed(1)
    module = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    model = TorchModel(module=module, tokenizer=tokenizer, task="sequence-classification", name="tiny-cls")
    onnx_model = ExportPass(probe_batches=[2], probe_seq_lengths=[])(model, Context(workdir=tmp_path))
    assert onnx_model.task == "sequence-classification"
    assert onnx_model.output_names == ["logits"]
    report = onnx_model.lineage[-1]["report"]
    assert report["output"] == "logits" and report["max_abs"] < 1e-3
    session = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    feeds = tokenize(tokenizer, ["one short text", "and a second, somewhat longer one here", "third"],
                     input_names=onnx_model.input_names)
    (logits,) = session.run(None, feeds)
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits, torch_output(model, feeds), atol=1e-4)


def head_pruned_tiny_bert(keep: int = 2) -> BertModel:
    """A tiny BERT whose attention keeps ``keep`` of 4 heads, as a structural pruner leaves it
    (the config still says 4 heads)."""
    torch.manual_seed(2)
    module = BertModel(tiny_config()).eval()
    for layer in module.encoder.layer:
        attn = layer.attention.self
        width = keep * attn.attention_head_size
        for name in ("query", "key", "value"):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, width)
            new.weight.data, new.bias.data = old.weight.data[:width].clone(), old.bias.data[:width].clone()
            setattr(attn, name, new)
        dense = layer.attention.output.dense
        new_dense = torch.nn.Linear(width, dense.out_features)
        new_dense.weight.data, new_dense.bias.data = dense.weight.data[:, :width].clone(), dense.bias.data.clone()
        layer.attention.output.dense = new_dense
        attn.num_attention_heads, attn.all_head_size = keep, width
    return module


def test_meta_records_the_real_heads_of_a_pruned_model(tokenizer, tmp_path):
    module = head_pruned_tiny_bert(keep=2)
    assert attention_shape(module) == {"num_attention_heads": 2, "hidden_size": 16}
    model = TorchModel(module=module, tokenizer=tokenizer, name="pruned",
                       structure={f"encoder.layer.{i}.attention.self": {"num_attention_heads": 2} for i in range(2)})
    onnx_model = ExportPass(probe_batches=[3], probe_seq_lengths=[])(model, Context(workdir=tmp_path))
    assert onnx_model.meta["num_attention_heads"] == 2
    assert onnx_model.meta["hidden_size"] == 16
    assert onnx_model.meta["model_hidden_size"] == 32
    assert module.config.num_attention_heads == 4


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        if int(input_ids.sum()) % 2:  # data-dependent control flow: torch.export refuses it
            hidden = hidden * 2
        return hidden


def test_export_failure_is_one_clear_line(tokenizer, tmp_path, capfd):
    model = TorchModel(module=DataDependent().eval(), tokenizer=tokenizer, name="branchy")
    with pytest.raises(BadInput) as info:
        ExportPass()(model, Context(workdir=tmp_path))
    message = str(info.value)
    assert message.startswith("export of branchy to ONNX failed: ")
    assert "\n" not in message and "\x1b" not in message
    printed = capfd.readouterr()
    assert "def forward" not in printed.out + printed.err  # the exporter's partial graph dump is kept quiet


def test_config_refuses_unknown_keys():
    with pytest.raises(BadInput, match="unknown key 'tolerance'"):
        ExportPass(tolerance=0.1)
    with pytest.raises(BadInput, match="attention"):
        ExportPass(attention="flash")


@pytest.mark.slow
def test_minilm_exports_within_tolerance(tmp_path):
    torch.set_num_threads(2)
    minilm = edgesmith.load("minilm")
    started = time.perf_counter()
    onnx_model = ExportPass()(minilm, Context(workdir=tmp_path))
    seconds = time.perf_counter() - started
    report = onnx_model.lineage[-1]["report"]
    print(f"\nMiniLM export: {seconds:.1f} s, {onnx_model.size_bytes() / 1e6:.1f} MB, "
          f"max abs {report['max_abs']:.2e}, min cosine {report['min_cosine']:.8f}")
    assert report["max_abs"] < 1e-3
    assert report["min_cosine"] >= 0.9999
    assert onnx_model.meta["num_attention_heads"] == 12 and onnx_model.meta["hidden_size"] == 384
    assert onnx_model.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert minilm.module.config._attn_implementation == "sdpa"
