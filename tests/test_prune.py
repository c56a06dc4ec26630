"""The prune pass (torch-pruning DepGraph) and the reload of pruned models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel,
                          DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model, RobertaConfig,
                          RobertaModel)

import edgesmith as es
from edgesmith.artifacts import TorchModel, default_model_path
from edgesmith.compress.base import Context, get_pass
from edgesmith.compress.pruning import PruneConfig, PrunePass, supported_architectures

VOCAB = 30522

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_path()))


def tiny_bert(tokenizer, *, cls=BertModel, layers: int = 2, heads: int = 4, hidden: int = 32,
              ffn: int = 64, seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, vocab_size=VOCAB, max_position_embeddings=64)
    task = "sequence-classification" if cls is BertForSequenceClassification else "feature-extraction"
    return TorchModel(module=cls(config).eval(), tokenizer=tokenizer, task=task, name="tiny-bert")


def feeds(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["a small red house by the river", "prune me", "the cat sat on the mat today"],
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def first_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def prune(model: TorchModel, **options) -> tuple[TorchModel, dict]:
    ctx = Context()
    out = PrunePass(**options)(model, ctx)
    return out, out.lineage[-1]["report"]


def attention_modules(model: TorchModel):
    return [layer.attention.self for layer in model.module.base_model.encoder.layer]


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def test_heads_half_keeps_head_dim_and_hidden(tokenizer):
    model = tiny_bert(tokenizer)
    out, report = prune(model, heads=0.5, ffn=0.5)
    for attn in attention_modules(out):
        assert attn.num_attention_heads == 2
        assert attn.attention_head_size == 8
        assert attn.all_head_size == 16
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 16
        assert attn.query.in_features == 32
    for layer in out.module.encoder.layer:
        assert layer.attention.output.dense.in_features == 16
        assert layer.attention.output.dense.out_features == 32
        assert layer.output.dense.out_features == 32
    assert out.module.embeddings.word_embeddings.embedding_dim == 32
    assert report["heads_before"] == [4, 4] and report["heads_after"] == [2, 2]
    assert report["ffn_before"] == [64, 64] and report["ffn_after"] == [32, 32]
    assert report["params_after"] < report["params_before"]
    assert report["params_after"] == out.parameter_count()
    assert first_output(out.module, feeds(tokenizer)).shape[-1] == 32


def test_ffn_rounds_to_multiple(tokenizer):
    model = tiny_bert(tokenizer, ffn=64)
    out, report = prune(model, ffn=0.5, round_to=8)
    assert all(width % 8 == 0 for width in report["ffn_after"])
    assert report["ffn_after"] == [32, 32]


def test_ffn_ratio_of_1536_rounds_down_to_multiple(tokenizer):
    model = tiny_bert(tokenizer, layers=1, ffn=1536)
    out, report = prune(model, ffn=0.3, round_to=8)
    (width,) = report["ffn_after"]
    assert width % 8 == 0
    assert width == 1072  # int(1536 * 0.7) = 1075, rounded down to a multiple of 8
    assert out.module.encoder.layer[0].output.dense.in_features == 1072
    assert out.config.intermediate_size == 1072


def test_heads_only_really_prunes_heads(tokenizer):
    model = tiny_bert(tokenizer)
    out, report = prune(model, heads=0.5)
    assert report["heads_after"] == [2, 2]
    assert report["ffn_after"] == [64, 64]
    assert report["params_after"] < report["params_before"]
    assert out.structure  # head counts a stock BERT config cannot say
    assert out.config.num_attention_heads == 4


def test_ffn_only_really_prunes_ffn(tokenizer):
    model = tiny_bert(tokenizer)
    out, report = prune(model, ffn=0.5)
    assert report["heads_after"] == [4, 4]
    assert report["ffn_after"] == [32, 32]
    assert out.structure == {}
    assert out.config.intermediate_size == 32
    assert all(attn.query.out_features == 32 for attn in attention_modules(out))


def test_input_model_unchanged(tokenizer):
    model = tiny_bert(tokenizer)
    before = model.content_hash()
    reference = first_output(model.module, feeds(tokenizer))
    out, _ = prune(model, heads=0.5, ffn=0.5)
    assert model.content_hash() == before
    assert out.content_hash() != before
    assert model.config.intermediate_size == 64
    assert torch.equal(first_output(model.module, feeds(tokenizer)), reference)


def test_lineage_records_the_pass(tokenizer):
    model = tiny_bert(tokenizer)
    out, report = prune(model, heads=0.25, ffn=0.25, importance="l1")
    step = out.lineage[-1]
    assert step["pass"] == "prune"
    assert step["config"]["heads"] == 0.25 and step["config"]["importance"] == "l1"
    assert step["input_hash"] == model.content_hash()
    assert step["output_hash"] == out.content_hash()
    assert report["heads_after"] == [3, 3]  # ceil(0.25 * 4) = 1 head removed per layer


# ---------------------------------------------------------------------------------------------
# Saving and reloading
# ---------------------------------------------------------------------------------------------


def test_ffn_only_reloads_with_stock_transformers(tokenizer, tmp_path):
    model = tiny_bert(tokenizer)
    out, _ = prune(model, ffn=0.5)
    folder = out.save(tmp_path / "ffn")
    meta = json.loads((folder / "edgesmith.json").read_text())
    assert meta["reloadable_with_transformers"] is True
    stock = transformers.AutoModel.from_pretrained(str(folder)).eval()
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(stock, inputs), first_output(out.module, inputs), atol=1e-6)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_head_pruned_reloads_with_edgesmith(tokenizer, tmp_path, cls):
    model = tiny_bert(tokenizer, cls=cls)
    out, _ = prune(model, heads=0.5, ffn=0.5)
    folder = out.save(tmp_path / "heads")
    meta = json.loads((folder / "edgesmith.json").read_text())
    assert meta["reloadable_with_transformers"] is False
    assert meta["structure"] == out.structure
    back = es.load(folder)
    assert isinstance(back, TorchModel) and type(back.module) is cls
    assert back.structure == out.structure
    assert not back.module.training
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(back.module, inputs), first_output(out.module, inputs), atol=1e-6)
    assert back.content_hash() == out.content_hash()


def test_head_pruned_does_not_reload_with_stock_transformers(tokenizer, tmp_path):
    out, _ = prune(tiny_bert(tokenizer), heads=0.5)
    folder = out.save(tmp_path / "heads")
    with pytest.raises((RuntimeError, ValueError)):
        transformers.AutoModel.from_pretrained(str(folder))


def test_damaged_structure_is_bad_input(tokenizer, tmp_path):
    out, _ = prune(tiny_bert(tokenizer), heads=0.5)
    folder = out.save(tmp_path / "heads")
    meta_path = folder / "edgesmith.json"
    meta = json.loads(meta_path.read_text())
    meta["structure"]["encoder.layer.7.attention.self"] = {"num_attention_heads": 2, "all_head_size": 16}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(es.BadInput, match="damaged"):
        es.load(folder)


def test_structure_with_unknown_attribute_is_bad_input(tokenizer, tmp_path):
    out, _ = prune(tiny_bert(tokenizer), heads=0.5)
    folder = out.save(tmp_path / "heads")
    meta_path = folder / "edgesmith.json"
    meta = json.loads(meta_path.read_text())
    meta["structure"]["encoder.layer.0.attention.self"]["n_heads_typo"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(es.BadInput, match="damaged"):
        es.load(folder)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, field", [
    ({"heads": 1.0}, "heads"),
    ({"ffn": 1.5}, "ffn"),
    ({"heads": -0.1}, "heads"),
    ({"heads": 0.5, "importance": "taylor"}, "importance"),
    ({"heads": 0.5, "ratio": 0.3}, "ratio"),
    ({"heads": 0.5, "round_to": 0}, "round_to"),
    ({}, "nothing to prune"),
])
def test_bad_options_are_bad_input(options, field):
    with pytest.raises(es.BadInput, match=field):
        get_pass("prune")(**options)


def test_config_defaults():
    config = PruneConfig(heads=0.25)
    assert (config.ffn, config.importance, config.round_to, config.seed) == (0.0, "l2", 8, 0)


def test_ratio_removing_every_head_is_bad_input(tokenizer):
    with pytest.raises(es.BadInput, match="all 4 heads"):
        prune(tiny_bert(tokenizer), heads=0.9)


def test_random_importance_is_deterministic_per_seed(tokenizer):
    model = tiny_bert(tokenizer)
    first, _ = prune(model, heads=0.5, ffn=0.5, importance="random", seed=3)
    again, _ = prune(model, heads=0.5, ffn=0.5, importance="random", seed=3)
    other, _ = prune(model, heads=0.5, ffn=0.5, importance="random", seed=4)
    assert first.content_hash() == again.content_hash()
    assert first.content_hash() != other.content_hash()


def test_importance_changes_what_is_kept(tokenizer):
    model = tiny_bert(tokenizer)
    l2, _ = prune(model, ffn=0.5, importance="l2")
    rnd, _ = prune(model, ffn=0.5, importance="random", seed=1)
    assert l2.content_hash() != rnd.content_hash()


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_bad_input(tokenizer):
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = TorchModel(module=GPT2Model(config).eval(), tokenizer=None, name="tiny-gpt2")
    with pytest.raises(es.BadInput, match="GPT2Model") as info:
        PrunePass(heads=0.5)(model)
    for name in supported_architectures():
        assert name in str(info.value)


def test_non_torch_artifact_is_bad_input(tmp_path):
    with pytest.raises(es.BadInput, match="takes torch"):
        PrunePass(heads=0.5)(es.OnnxModel(folder=tmp_path))


def test_roberta_heads_and_ffn(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=70)
    model = TorchModel(module=RobertaModel(config).eval(), tokenizer=tokenizer, name="tiny-roberta")
    out, report = prune(model, heads=0.5, ffn=0.5)
    assert report["architecture"] == "RoBERTa"
    assert report["heads_after"] == [2, 2] and report["ffn_after"] == [32, 32]
    back = es.load(out.save(tmp_path / "roberta"))
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(back.module, inputs), first_output(out.module, inputs), atol=1e-6)


def test_distilbert_heads_and_ffn(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                              max_position_embeddings=64)
    model = TorchModel(module=DistilBertModel(config).eval(), tokenizer=tokenizer, name="tiny-distilbert")
    out, report = prune(model, heads=0.5, ffn=0.5)
    assert report["architecture"] == "DistilBERT"
    assert report["heads_after"] == [2, 2] and report["ffn_after"] == [32, 32]
    assert out.config.hidden_dim == 32
    assert all(layer.attention.n_heads == 2 and layer.attention.attention_head_size == 8
               for layer in out.module.transformer.layer)
    back = es.load(out.save(tmp_path / "distilbert"))
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(back.module, inputs), first_output(out.module, inputs), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The packaged MiniLM
# ---------------------------------------------------------------------------------------------


def mean_pooled(module: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_minilm_half_heads_half_ffn():
    model = es.load("minilm")
    out, report = prune(model, heads=0.5, ffn=0.5)
    assert report["heads_after"] == [6] * 6
    assert report["ffn_after"] == [768] * 6
    encoder_before = sum(p.numel() for p in model.module.encoder.parameters())
    encoder_after = sum(p.numel() for p in out.module.encoder.parameters())
    assert 0.45 < encoder_after / encoder_before < 0.55
    texts = es.compress.Context().corpus(64)
    original = mean_pooled(model.module, model.tokenizer, texts)
    pruned = mean_pooled(out.module, out.tokenizer, texts)
    cosine = torch.nn.functional.cosine_similarity(original, pruned, dim=-1).mean().item()
    log.warning("MiniLM heads 0.5 + ffn 0.5: encoder params %d -> %d, mean cosine %.3f on 64 sentences",
                encoder_before, encoder_after, cosine)
    assert 0.2 < cosine < 0.99


def test_pruning_a_reloaded_pruned_model(tokenizer, tmp_path):
    once, _ = prune(tiny_bert(tokenizer), heads=0.5, ffn=0.5)
    reloaded = es.load(once.save(tmp_path / "once"))
    twice, report = prune(reloaded, heads=0.5, ffn=0.5)
    assert report["heads_before"] == [2, 2] and report["heads_after"] == [1, 1]
    assert report["ffn_before"] == [32, 32] and report["ffn_after"] == [16, 16]
    assert twice.structure["encoder.layer.0.attention.self"] == {"num_attention_heads": 1, "all_head_size": 8}
    assert [step["pass"] for step in twice.lineage] == ["prune", "prune"]
    back = es.load(twice.save(tmp_path / "twice"))
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(back.module, inputs), first_output(twice.module, inputs), atol=1e-6)


def test_rebuild_restores_tied_weights(tmp_path):
    from edgesmith.structure import build_with_structure

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")  # drops lm_head.weight, tied to the token embedding
    rebuilt = build_with_structure(tmp_path / "gpt2", "text-generation", {"transformer.h.0.attn": {"num_heads": 4}})
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)
