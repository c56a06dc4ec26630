"""Depth pruning of decoders by a measured criterion (angular distance, KL of skipping a layer),
block removal, reload with stock transformers, export, and the pass's decoder fidelity report."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import edgesmith as es
from edgesmith.artifacts import TorchModel
from edgesmith.compress.pruning import PrunePass
from edgesmith.data import builtin_corpus
from edgesmith.passes import Context, get_pass

VOCAB = 30522


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return builtin_corpus(limit=32)


def llama(tokenizer, layers: int = 4, identity: tuple[int, ...] = (), seed: int = 0) -> TorchModel:
    """A tiny Llama with grouped-query attention; the layers in ``identity`` add nothing to the
    residual stream (attention output and FFN output weights zeroed), so they are exactly redundant."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=128, pad_token_id=0, bos_token_id=101,
                                      eos_token_id=102)
    module = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in module.parameters():  # sharpen the random init so the output distribution is not flat
            if p.dim() == 2:
                p.mul_(3.0)
        for i in identity:
            module.model.layers[i].self_attn.o_proj.weight.zero_()
            module.model.layers[i].mlp.down_proj.weight.zero_()
    return TorchModel(module=module, tokenizer=tokenizer, task="text-generation", name="tiny-llama")


def prune(model: TorchModel, texts: list[str] | None = None, **options) -> tuple[TorchModel, dict]:
    out = PrunePass(**{"check_latency": False, **options})(model, Context(texts=texts))
    return out, out.lineage[-1]["report"]


def logits(module: torch.nn.Module, tokenizer) -> torch.Tensor:
    enc = tokenizer(["a small red house by the river", "the cat sat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------
# The criterion picks what it should
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["angular", "kl"])
@pytest.mark.parametrize("selection", ["individual", "block"])
def test_the_identity_layer_is_the_one_removed(criterion, selection, minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=4, identity=(2,))
    out, report = prune(model, texts, layers=0.25, layer_importance=criterion, layer_selection=selection)
    assert report["layers_kept"] == [0, 1, 3]
    assert report["layer_importance"] == criterion and report["layer_selection"] == selection
    assert report["layer_scores"][2] == pytest.approx(0.0, abs=1e-6)
    assert min(report["layer_scores"][i] for i in (0, 1, 3)) > 1e-3
    assert report["layer_texts"] == len(texts) and report["layer_tokens"] > len(texts)
    # removing a layer that adds nothing changes nothing: the decoder fidelity report says so
    assert report["fidelity_kld"] == pytest.approx(0.0, abs=1e-6) and report["fidelity_top1"] == 1.0
    assert torch.allclose(logits(out.module, minilm_tokenizer), logits(model.module, minilm_tokenizer), atol=1e-4)


@pytest.mark.parametrize("criterion", ["angular", "kl"])
def test_block_selection_removes_the_redundant_contiguous_run(criterion, minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=6, identity=(3, 4))
    _, report = prune(model, texts, layers=2 / 6, layer_importance=criterion, layer_selection="block")
    assert report["layers_kept"] == [0, 1, 2, 5]
    assert report["fidelity_kld"] == pytest.approx(0.0, abs=1e-6)


def test_block_is_contiguous_where_individual_is_not(minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=6, identity=(1, 4))
    _, single = prune(model, texts, layers=2 / 6, layer_importance="angular")
    assert single["layers_kept"] == [0, 2, 3, 5]
    _, block = prune(model, texts, layers=2 / 6, layer_importance="angular", layer_selection="block")
    removed = sorted(set(range(6)) - set(block["layers_kept"]))
    assert len(removed) == 2 and removed[1] == removed[0] + 1
    assert {1, 4} & set(removed)  # the run holds one of the identity layers


def test_measured_importance_reads_the_data_given(minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=4)
    _, a = prune(model, texts[:8], layers=0.25, layer_importance="angular")
    _, b = prune(model, ["0 1 2 3 4 5 6 7 8 9 10 11 12"] * 8, layers=0.25, layer_importance="angular")
    assert a["layer_texts"] == 8 and a["layer_scores"] != b["layer_scores"]
    _, default = prune(model, None, layers=0.25, layer_importance="angular", layer_texts=16)
    assert default["layer_texts"] == 16  # no data given: the first sentences of the shipped corpus


def test_measurement_leaves_the_parent_untouched(minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=4)
    before = model.content_hash()
    reference = logits(model.module, minilm_tokenizer)
    prune(model, texts, layers=0.5, layer_importance="kl", layer_selection="block")
    assert model.content_hash() == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.module.modules())
    assert torch.equal(logits(model.module, minilm_tokenizer), reference)


def test_budget_with_layers_uses_the_measured_blocks(minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=6, identity=(3, 4))
    total = sum(p.numel() for p in model.module.parameters())
    layer = sum(p.numel() for p in model.module.model.layers[0].parameters())
    fraction = round((total - 1.5 * layer) / total, 4)  # the embeddings dominate: two layers must go
    _, report = prune(model, texts, budget=f"params={fraction}", budget_prunes=["layers"], layer_importance="kl",
                      layer_selection="block")
    assert report["layers_kept"] == [0, 1, 2, 5]
    assert report["params_after"] <= fraction * report["params_before"]


# ---------------------------------------------------------------------------------------------
# Reload, generate, export
# ---------------------------------------------------------------------------------------------


def test_block_removal_reloads_with_stock_transformers_and_generates(minilm_tokenizer, texts, tmp_path):
    model = llama(minilm_tokenizer, layers=6)
    out, report = prune(model, texts, layers=2 / 6, layer_importance="angular", layer_selection="block")
    assert report["layers_after"] == 4 and report["reloadable_with_transformers"] is True
    folder = out.save(tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    if "layer_types" in config:
        assert len(config["layer_types"]) == 4
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert len(stock.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in stock.model.layers] == [0, 1, 2, 3]
    assert [layer.self_attn.layer_idx for layer in out.module.model.layers] == [0, 1, 2, 3]
    assert torch.allclose(logits(stock, minilm_tokenizer), logits(out.module, minilm_tokenizer), atol=1e-5)
    # the KV cache is indexed by layer_idx: cached generation equals recomputing the whole sequence
    ids = minilm_tokenizer(["the river ran"], return_tensors="pt")["input_ids"]
    cached = stock.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = stock.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_width_and_depth_pruning_reload_with_stock_transformers(minilm_tokenizer, texts, tmp_path):
    model = llama(minilm_tokenizer, layers=4)
    out, report = prune(model, texts, heads=0.5, ffn=0.5, layers=0.25, layer_importance="kl")
    assert report["heads_after"] == [4, 4, 4] and report["ffn_after"] == [32, 32, 32]
    folder = out.save(tmp_path / "pruned")
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    cfg = stock.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (3, 32, 4, 2, 8)
    assert torch.allclose(logits(stock, minilm_tokenizer), logits(out.module, minilm_tokenizer), atol=1e-5)


def test_pruned_decoder_exports_and_validates_token_for_token(minilm_tokenizer, texts):
    model = llama(minilm_tokenizer, layers=4)
    out, _ = prune(model, texts, ffn=0.25, layers=0.25, layer_importance="angular", layer_selection="block")
    onnx_model = es.export.to_onnx(out)
    validation = onnx_model.meta["validation"]
    assert validation["steps"] >= 1 and min(validation["tokens_equal"]) == validation["steps"]
    assert onnx_model.meta["decoder"]["num_layers"] == 3


# ---------------------------------------------------------------------------------------------
# Fidelity report, bad inputs, CLI, recipe
# ---------------------------------------------------------------------------------------------


def test_decoder_fidelity_is_kl_and_top1_not_cosine(minilm_tokenizer):
    _, report = prune(llama(minilm_tokenizer, layers=4), ffn=0.5)
    assert "fidelity_cosine" not in report
    assert report["fidelity_kld"] > 0 and 0 <= report["fidelity_top1"] < 1
    assert report["fidelity_perplexity"] > 0 and report["fidelity_perplexity_parent"] > 0
    assert report["fidelity_tokens"] > 50


@pytest.mark.parametrize("options, message", [
    ({"ffn": 0.5, "layer_importance": "angular"}, "no layer is removed"),
    ({"ffn": 0.5, "layer_selection": "block"}, "no layer is removed"),
    ({"layers": 0.25, "layer_selection": "block"}, "needs a measured layer_importance"),
    ({"layers": 0.25, "layer_importance": "cosine"}, "layer_importance"),
    ({"layers": 0.25, "layer_selection": "window"}, "layer_selection"),
    ({"layers": 0.25, "layer_importance": "kl", "layer_texts": 0}, "layer_texts"),
])
def test_config_errors_are_bad_input(options, message):
    with pytest.raises(es.BadInput, match=message):
        get_pass("prune")(**options)


def test_measured_importance_needs_a_tokenizer_and_text(minilm_tokenizer):
    model = llama(minilm_tokenizer, layers=4)
    bare = TorchModel(module=model.module, tokenizer=None, task="text-generation", name="bare")
    with pytest.raises(es.BadInput, match="tokenizer"):
        prune(bare, ["some text"], layers=0.25, layer_importance="angular")
    with pytest.raises(es.BadInput, match="needs data with real text"):
        prune(model, ["  ", ""], layers=0.25, layer_importance="angular")


def test_kl_needs_an_output_distribution(minilm_tokenizer, texts):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    encoder = TorchModel(module=transformers.BertModel(config).eval(), tokenizer=minilm_tokenizer,
                         task="feature-extraction", name="tiny-bert")
    with pytest.raises(es.BadInput, match="angular"):
        prune(encoder, texts, layers=0.5, layer_importance="kl")
    _, report = prune(encoder, texts, layers=0.5, layer_importance="angular")  # angular works on any model
    assert len(report["layers_kept"]) == 1 and "fidelity_cosine" in report


def test_cli_prune_with_layer_importance(minilm_tokenizer, tmp_path, capsys, cache_dir):
    from edgesmith.cli.app import main

    folder = llama(minilm_tokenizer, layers=4, identity=(1,)).save(tmp_path / "tiny")
    with pytest.raises(SystemExit) as info:
        main(["prune", str(folder), "--layers", "0.25", "--layer-importance", "angular", "--layer-selection",
              "block", "--runs-dir", str(tmp_path / "runs"), "--no-latency-check", "--json"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    report = json.loads(out)["report"]
    assert report["layers_kept"] == [0, 2, 3] and report["fidelity_top1"] == 1.0
    for bad in (["--layers", "0.25", "--layer-importance", "cosine"], ["--ffn", "0.5", "--layer-selection", "block"]):
        with pytest.raises(SystemExit) as info:
            main(["prune", str(folder), *bad])
        _, err = capsys.readouterr()
        assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_recipe_step_with_kl_layer_importance(minilm_tokenizer, tmp_path, cache_dir):
    folder = llama(minilm_tokenizer, layers=4, identity=(3,)).save(tmp_path / "tiny")
    recipe = {"name": "prune-kl", "model": str(folder),
              "steps": [{"prune": {"layers": 0.25, "layer_importance": "kl", "check_latency": False}}],
              "data": {"limit": 24}, "profile": None}
    result = es.run(recipe, runs_dir=tmp_path / "runs", cache_dir=cache_dir, progress=False)
    report = result.manifest["steps"][-1]["report"]
    assert report["layers_kept"] == [0, 1, 2] and report["layer_texts"] == 24
