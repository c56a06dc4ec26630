"""The prune pass (torch-pruning DepGraph) and the reload of pruned models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    RobertaConfig,
    RobertaModel,
)

import edgesmith as es
from edgesmith.artifacts import TorchModel, default_model_path
from edgesmith.compress.pruning import PruneConfig, PrunePass, supported_architectures
from edgesmith.passes import Context, get_pass

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
    """Prune with the pass's torch latency check off unless a test asks for it (timings are noise here)."""
    ctx = Context()
    out = PrunePass(**{"check_latency": False, **options})(model, ctx)
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
    ({"heads": 0.5, "importance": "magnitude"}, "importance"),
    ({"heads": 0.5, "allocation": "layerwise"}, "allocation"),
    ({"layers": 1.0}, "layers"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"budget": "params"}, "budget"),
    ({"budget": "params=1.5"}, "budget"),
    ({"budget": "params=0.5", "heads": 0.5}, "either a budget or ratios"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "either sparsity"),
    ({"pattern": "4:8"}, "pattern"),
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
    config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                                    vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32)
    model = TorchModel(module=transformers.OPTModel(config).eval(), tokenizer=None, name="tiny-opt")
    with pytest.raises(es.BadInput, match="OPTModel") as info:
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


# ---------------------------------------------------------------------------------------------
# Every architecture: heads + FFN, depth, reload, export (tiny random-weight configs)
# ---------------------------------------------------------------------------------------------


def tiny_roberta(tokenizer, layers: int = 3) -> TorchModel:
    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=70)
    return TorchModel(module=RobertaModel(config).eval(), tokenizer=tokenizer, name="tiny-roberta")


def tiny_distilbert(tokenizer, layers: int = 3) -> TorchModel:
    torch.manual_seed(0)
    config = DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                              max_position_embeddings=64)
    return TorchModel(module=DistilBertModel(config).eval(), tokenizer=tokenizer, name="tiny-distilbert")


def tiny_gpt2(tokenizer, layers: int = 3) -> TorchModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64,
                        pad_token_id=0)
    return TorchModel(module=transformers.GPT2LMHeadModel(config).eval(), tokenizer=tokenizer,
                      task="text-generation", name="tiny-gpt2")


def tiny_llama(tokenizer, layers: int = 3) -> TorchModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=64, pad_token_id=0)
    return TorchModel(module=transformers.LlamaForCausalLM(config).eval(), tokenizer=tokenizer,
                      task="text-generation", name="tiny-llama")


def tiny_bert3(tokenizer) -> TorchModel:
    return tiny_bert(tokenizer, layers=3)


BUILDERS = {"BERT": tiny_bert3, "RoBERTa": tiny_roberta, "DistilBERT": tiny_distilbert, "GPT-2": tiny_gpt2,
            "Llama": tiny_llama}
STOCK_HEADS = {"Llama"}  # the only one whose config can say a pruned head count (head_dim)


def stock_class(model: TorchModel):
    return transformers.AutoModelForCausalLM if model.task == "text-generation" else transformers.AutoModel


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, tokenizer) -> None:
    inputs = feeds(tokenizer)
    assert torch.allclose(first_output(a, inputs), first_output(b, inputs), atol=1e-5)


def quick(model: TorchModel, **options) -> tuple[TorchModel, dict]:
    return prune(model, check_latency=False, **options)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_heads_and_ffn_reload_and_export(arch, tokenizer, tmp_path):
    model = BUILDERS[arch](tokenizer)
    heads = 8 if arch == "Llama" else 4
    out, report = quick(model, heads=0.5, ffn=0.5)
    assert report["architecture"] == arch
    assert report["heads_after"] == [heads // 2] * 3
    assert report["ffn_after"] == [32] * 3
    assert report["params_after"] == out.parameter_count() < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["reloadable_with_transformers"] is (arch in STOCK_HEADS)
    folder = out.save(tmp_path / arch)
    back = es.load(folder)
    assert_same_outputs(back.module, out.module, tokenizer)
    if arch in STOCK_HEADS:
        stock = stock_class(out).from_pretrained(str(folder)).eval()
        assert_same_outputs(stock, out.module, tokenizer)
        assert stock.config.num_attention_heads == 4 and stock.config.head_dim == 8
        assert stock.config.num_key_value_heads == 2
        assert all(layer.self_attn.num_key_value_groups == 2 for layer in stock.model.layers)
    onnx_model = es.export.to_onnx(back)
    step = onnx_model.lineage[-1]
    assert step["pass"] == "export" and step["report"]["min_cosine"] >= 0.9999


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_ffn_and_depth_reload_with_stock_transformers(arch, tokenizer, tmp_path):
    model = BUILDERS[arch](tokenizer)
    out, report = quick(model, ffn=0.5, layers=0.34)
    assert report["layers_before"] == 3 and report["layers_after"] == 2 and len(report["layers_kept"]) == 2
    assert out.structure == {} and report["reloadable_with_transformers"] is True
    from edgesmith.compress.pruning import arch_spec, layers_of

    spec = arch_spec(out.module)
    assert getattr(out.config, spec.config_layers) == 2
    for index, layer in enumerate(layers_of(out.module, spec)):
        assert all(m.layer_idx == index for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    folder = out.save(tmp_path / arch)
    stock = stock_class(out).from_pretrained(str(folder)).eval()
    assert_same_outputs(stock, out.module, tokenizer)


def test_depth_pruning_keeps_the_most_important_layers(tokenizer):
    model = tiny_bert(tokenizer, layers=4)
    with torch.no_grad():  # make layer 2 nearly empty: magnitude importance must drop it
        for p in model.module.encoder.layer[2].parameters():
            if p.dim() == 2:
                p.mul_(0.01)
    out, report = quick(model, layers=0.25)
    assert report["layers_kept"] == [0, 1, 3]
    assert torch.equal(out.module.encoder.layer[2].output.dense.weight, model.module.encoder.layer[3].output.dense.weight)


# ---------------------------------------------------------------------------------------------
# Allocation and budgets
# ---------------------------------------------------------------------------------------------


def test_global_allocation_gives_per_layer_sizes_and_reloads(tokenizer, tmp_path):
    model = tiny_bert(tokenizer, layers=3, ffn=128)
    with torch.no_grad():  # layer 0 weak, layer 2 strong: global ranking must take more from layer 0
        for i, scale in ((0, 0.2), (2, 3.0)):
            for p in model.module.encoder.layer[i].parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    out, report = quick(model, heads=0.5, ffn=0.5, allocation="global")
    assert sum(report["heads_after"]) == 6 and len(set(report["heads_after"])) > 1
    assert report["heads_after"][0] < report["heads_after"][2]
    assert report["ffn_after"][0] < report["ffn_after"][2]
    assert all(width % 8 == 0 for width in report["ffn_after"])
    assert report["reloadable_with_transformers"] is False
    back = es.load(out.save(tmp_path / "global"))
    assert_same_outputs(back.module, out.module, tokenizer)


def test_global_allocation_on_gqa_keeps_query_groups(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        model.module.model.layers[0].self_attn.q_proj.weight.mul_(0.1)
    out, report = quick(model, heads=0.34, allocation="global")
    assert all(h % 2 == 0 and h >= 4 for h in report["heads_after"])  # whole steps of the 2 KV heads
    assert report["heads_after"][0] == 4 < max(report["heads_after"])
    for layer in out.module.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups * 2 == attn.q_proj.out_features // 8
        assert attn.k_proj.out_features == attn.v_proj.out_features == 16
    folder = out.save(tmp_path / "llama-global")
    back = es.load(folder)
    assert_same_outputs(back.module, out.module, tokenizer)
    onnx_model = es.export.to_onnx(back)
    assert onnx_model.lineage[-1]["report"]["min_cosine"] >= 0.9999


@pytest.mark.parametrize("budget, metric", [("params=0.99", "params"), ("macs=0.5", "macs")])
def test_budget_is_met_and_the_cost_model_is_exact(tokenizer, budget, metric):
    model = tiny_bert(tokenizer, layers=2, ffn=128)
    out, report = quick(model, budget=budget)
    fraction = float(budget.split("=")[1])
    achieved = report[f"{metric}_after"] / report[f"{metric}_before"]
    assert achieved <= fraction
    assert report["budget_predicted_fraction"] == pytest.approx(achieved, abs=1e-4)
    assert 0 < report["budget_ratio"] < 1


def test_budget_with_layers_and_global_allocation(tokenizer):
    model = tiny_bert(tokenizer, layers=4, ffn=128)
    out, report = quick(model, budget="macs=0.4", budget_prunes=["layers", "ffn"], allocation="global")
    achieved = report["macs_after"] / report["macs_before"]
    assert achieved <= 0.4
    assert report["budget_predicted_fraction"] == pytest.approx(achieved, abs=1e-4)
    assert report["heads_after"] == [4] * report["layers_after"]


def test_budget_out_of_reach_is_bad_input(tokenizer):
    with pytest.raises(es.BadInput, match="out of reach"):
        quick(tiny_bert(tokenizer), budget="params=0.5")  # embeddings are 97 % of this tiny model


def test_count_macs_is_the_documented_formula(tokenizer):
    from edgesmith.compress.pruning import count_macs

    model = tiny_bert(tokenizer, layers=2, hidden=32, ffn=64)
    seq, hidden, ffn = 128, 32, 64
    per_layer = seq * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * seq * seq * hidden
    pooler = seq * hidden * hidden
    assert count_macs(model.module, seq=seq) == 2 * per_layer + pooler


# ---------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "random"])
def test_each_criterion_prunes_to_the_same_sizes(criterion, tokenizer):
    from edgesmith.data import builtin_corpus

    model = tiny_bert(tokenizer)
    ctx = Context(texts=builtin_corpus(limit=32))
    out = PrunePass(heads=0.5, ffn=0.5, layers=0.5, importance=criterion, check_latency=False,
                    taylor_batches=2)(tiny_bert(tokenizer, layers=4), ctx)
    report = out.lineage[-1]["report"]
    assert report["heads_after"] == [2, 2] and report["ffn_after"] == [32, 32]
    if criterion == "taylor":
        assert report["taylor_batches"] == 2 and report["taylor_loss"].startswith("random projections")
    assert all(p.grad is None for p in out.module.parameters())
    del model


def test_taylor_differs_from_magnitude_and_follows_the_data(tokenizer):
    from edgesmith.data import builtin_corpus

    model = tiny_bert(tokenizer)
    ctx = Context(texts=builtin_corpus(limit=64))
    taylor = PrunePass(ffn=0.5, importance="taylor", check_latency=False)(model, ctx)
    magnitude = PrunePass(ffn=0.5, importance="l2", check_latency=False)(model, Context())
    other = PrunePass(ffn=0.5, importance="taylor", check_latency=False)(
        model, Context(texts=["0 1 2 3 4 5 6 7 8 9"] * 16))
    assert taylor.content_hash() != magnitude.content_hash()
    assert taylor.content_hash() != other.content_hash()


def test_taylor_on_a_decoder_uses_the_lm_loss(tokenizer):
    from edgesmith.data import builtin_corpus

    out = PrunePass(heads=0.5, importance="taylor", taylor_batches=2, check_latency=False)(
        tiny_gpt2(tokenizer), Context(texts=builtin_corpus(limit=16)))
    report = out.lineage[-1]["report"]
    assert report["taylor_loss"] == "language-modelling loss"
    assert report["heads_after"] == [2, 2, 2]


def test_taylor_without_data_is_bad_input(tokenizer):
    with pytest.raises(es.BadInput, match="needs data"):
        PrunePass(heads=0.5, importance="taylor")(tiny_bert(tokenizer), Context())


# ---------------------------------------------------------------------------------------------
# Sparsity
# ---------------------------------------------------------------------------------------------


def test_is_2_4_checks_every_group_of_four_along_the_input():
    from edgesmith.compress.pruning import is_2_4

    good = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert is_2_4(good)
    assert not is_2_4(torch.tensor([[0.0, 1.0, 5.0, 2.0, 3.0, 0.0, 0.0, 4.0]]))  # first group has one zero
    assert not is_2_4(good.t().reshape(2, 4).t())  # zeros along the other dimension only
    assert not is_2_4(torch.zeros(2, 6))  # input size not a multiple of 4


@pytest.mark.parametrize("arch", ["BERT", "GPT-2"])
def test_2_4_sparsity_is_verified_reloads_and_exports(arch, tokenizer, tmp_path):
    from edgesmith.compress.pruning import arch_spec, is_2_4, layers_of, linear_weight

    model = BUILDERS[arch](tokenizer)
    out, report = quick(model, pattern="2:4")
    assert report["pattern_2_4"] is True
    assert report["sparsity_per_layer"] == [0.5, 0.5, 0.5]
    assert all(value == 0.5 for value in report["sparsity_per_module"].values())
    for layer in layers_of(out.module, arch_spec(out.module)):
        for m in layer.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2:
                assert is_2_4(linear_weight(m).detach())
    assert any("sparse weights are stored dense" in w for w in report["warnings"])
    assert report["params_after"] == report["params_before"]
    folder = out.save(tmp_path / arch)
    stock = stock_class(out).from_pretrained(str(folder)).eval()
    assert_same_outputs(stock, out.module, tokenizer)
    assert es.export.to_onnx(out).lineage[-1]["report"]["min_cosine"] >= 0.9999


def test_2_4_keeps_the_two_largest_of_each_group(tokenizer):
    model = tiny_bert(tokenizer, layers=1)
    out, _ = quick(model, pattern="2:4", importance="l1")
    before = model.module.encoder.layer[0].intermediate.dense.weight.detach().reshape(-1, 4)
    after = out.module.encoder.layer[0].intermediate.dense.weight.detach().reshape(-1, 4)
    kept = before.abs().topk(2, dim=1).indices.sort(dim=1).values
    assert torch.equal((after != 0).nonzero()[:, 1].reshape(-1, 2), kept)


def test_unstructured_sparsity_uniform_and_global(tokenizer):
    model = tiny_bert(tokenizer, layers=2)
    with torch.no_grad():
        model.module.encoder.layer[1].intermediate.dense.weight.mul_(10)
    uniform, report = quick(model, sparsity=0.6)
    assert all(abs(v - 0.6) < 0.01 for v in report["sparsity_per_module"].values())
    assert report["pattern_2_4"] is False
    glob, report = quick(model, sparsity=0.6, allocation="global")
    values = report["sparsity_per_module"]
    assert values["encoder.layer.1.intermediate.dense"] < 0.1 < values["encoder.layer.0.intermediate.dense"]
    zeros = sum(int((m.weight == 0).sum()) for layer in glob.module.encoder.layer for m in layer.modules()
                if isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for layer in glob.module.encoder.layer for m in layer.modules()
                if isinstance(m, torch.nn.Linear))
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    assert glob.structure == {}


def test_structured_then_2_4_in_one_pass(tokenizer, tmp_path):
    out, report = quick(tiny_bert(tokenizer), heads=0.5, ffn=0.5, pattern="2:4")
    assert report["heads_after"] == [2, 2] and report["pattern_2_4"] is True
    back = es.load(out.save(tmp_path / "both"))
    assert_same_outputs(back.module, out.module, tokenizer)


# ---------------------------------------------------------------------------------------------
# Report, warnings, inspect, CLI, recipe
# ---------------------------------------------------------------------------------------------


def test_report_has_fidelity_latency_and_no_warning_when_faster(tokenizer):
    out, report = prune(tiny_bert(tokenizer), heads=0.5, ffn=0.5, check_latency=True)
    assert 0 < report["fidelity_cosine"] <= 1 and report["fidelity_texts"] == 64
    assert report["latency_verdict"] in ("faster", "slower", "within noise")
    assert len(report["latency_speedup_ci"]) == 2 and "batch 1" in report["latency_setup"]
    assert report["warnings"] == [] or report["latency_verdict"] == "slower"


def test_slower_pruned_model_is_warned_about(tokenizer, monkeypatch, caplog):
    from edgesmith.compress import pruning

    def slow_child(parent, child, feeds):
        return {"latency_ms_before": 1.0, "latency_ms_after": 2.0, "latency_speedup": 0.5,
                "latency_speedup_ci": [0.45, 0.55], "latency_verdict": "slower", "latency_setup": "stub"}

    monkeypatch.setattr(pruning, "latency_check", slow_child)
    with caplog.at_level(logging.WARNING, logger="edgesmith.compress.pruning"):
        _, report = prune(tiny_bert(tokenizer), ffn=0.5, check_latency=True)
    assert any("slower than its parent" in w for w in report["warnings"])
    assert any("slower than its parent" in r.getMessage() for r in caplog.records)


def test_inspect_shows_per_layer_sizes_sparsity_and_format(tokenizer, tmp_path):
    from edgesmith.inspection import describe

    out, _ = quick(tiny_bert(tokenizer), heads=0.5, ffn=0.5, pattern="2:4")
    info = describe(es.load(out.save(tmp_path / "p")))
    assert info["format"].startswith("edgesmith structure")
    assert [a["heads"] for a in info["attention"]] == [2, 2]
    assert [f["ffn"] for f in info["ffn"]] == [32, 32]
    assert all(a["sparsity"] == 0.5 and a["pattern_2_4"] for a in info["attention"])
    stock, _ = quick(tiny_llama(tokenizer), heads=0.5)
    info = describe(stock)
    assert info["format"].startswith("Hugging Face")
    assert [(a["heads"], a["kv_heads"], a["head_dim"]) for a in info["attention"]] == [(4, 2, 8)] * 3


def test_cli_prune_taylor_with_data_and_without(tokenizer, tiny_bert_dir, tmp_path, capsys, cache_dir):
    from edgesmith.cli.app import main

    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sentence number {i} about rivers and hills"})
                              for i in range(40)) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tiny_bert_dir), "--heads", "0.5", "--ffn", "0.5", "--importance", "taylor",
              "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--no-latency-check", "--json"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    result = json.loads(out)
    assert result["report"]["heads_after"] == [2, 2] and result["report"]["taylor_batches"] >= 1
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tiny_bert_dir), "--heads", "0.5", "--importance", "taylor"])
    _, err = capsys.readouterr()
    assert info.value.code == 2 and "--data" in err and "Traceback" not in err
    for bad in (["--heads", "1.0"], ["--heads", "0.5", "--importance", "magnitude"]):
        with pytest.raises(SystemExit) as info:
            main(["prune", str(tiny_bert_dir), *bad])
        _, err = capsys.readouterr()
        assert info.value.code == 2 and "Traceback" not in err


def test_recipe_step_prunes_with_taylor_on_the_recipe_data(tiny_bert_dir, tmp_path, cache_dir):
    recipe = {"name": "prune-taylor", "model": str(tiny_bert_dir),
              "steps": [{"prune": {"heads": 0.5, "layers": 0.5, "importance": "taylor", "check_latency": False}}],
              "data": {"limit": 32}, "profile": None}
    result = es.run(recipe, runs_dir=tmp_path / "runs", cache_dir=cache_dir, progress=False)
    step = result.manifest["steps"][-1]
    assert step["report"]["heads_after"] == [2] and step["report"]["taylor_texts"] == 32
    assert step["report"]["macs_after"] < step["report"]["macs_before"]
