"""GGUF out: a tiny Llama (and Qwen2) written with edgesmith's GGUF writer and read back.

F32 out and back in through transformers' own GGUF reader is tensor-exact; F16 reads back as the
source cast to F16; quantized files get a KL/top-1 verdict. Bad input: one line, exit 2; a failed
gate: exit 3 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_source import llama_cpp_permute
from tiny_lm import tiny_llama, train_tokenizer

import edgesmith as es
from edgesmith.artifacts import GgufModel, TorchModel
from edgesmith.cli.app import main
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.gguf.writer import hyper_of, permute_rows, unpermute_rows, write_gguf


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr (where errors go, one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama(tokenizer) -> TorchModel:
    model = tiny_llama()
    return TorchModel(task="text-generation", module=model, tokenizer=tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    llama.module.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return folder


def _read_back(path: Path):
    import transformers

    module = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return module, tok


def test_permutation_matches_llama_cpp_and_inverts():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    assert np.array_equal(permute_rows(w, 4), llama_cpp_permute(w, 4, 4))
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not np.array_equal(permute_rows(w, 4), w)


def test_f32_round_trip_is_tensor_exact(tmp_path, llama):
    llama.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    report = write_gguf(llama.module, llama.tokenizer, tmp_path / "m.gguf", quant="f32", name="tiny")
    assert report["tensor_types"] == {"F32": 20}  # 2 layers x 9 + embedding + final norm; tied head not written
    module, tok = _read_back(tmp_path / "m.gguf")
    source = llama.module.state_dict()
    back = module.state_dict()
    assert set(source) <= set(back)
    for name, tensor in source.items():
        assert torch.equal(tensor, back[name]), name
    text = "The capital of France is Paris, 1234 rivers."
    assert tok(text)["input_ids"] == llama.tokenizer(text)["input_ids"]
    assert tok.chat_template == llama.tokenizer.chat_template
    assert module.config.num_hidden_layers == 2 and module.config.num_key_value_heads == 2


def test_quant_types_and_embedding_choice(tmp_path, llama):
    q41 = write_gguf(llama.module, llama.tokenizer, tmp_path / "a.gguf", quant="q4_1")
    assert q41["tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}  # token_embd stays Q8_0 under 4-bit
    q40 = write_gguf(llama.module, llama.tokenizer, tmp_path / "b.gguf", quant="q4_0", embeddings="q4_0")
    assert q40["tensor_types"] == {"F32": 5, "Q4_0": 15}
    assert q40["size_bytes"] < q41["size_bytes"]
    assert q41["notes"] and "default" in q41["notes"][0]  # no origin GGUF: the pre-tokenizer is a guess, said so


def test_to_gguf_f16_is_exact_and_reloads(tmp_path, llama):
    out = es.export.to_gguf(llama, quant="f16")
    assert isinstance(out, GgufModel)
    verdict = out.meta["gguf_export"]["verdict"]
    assert verdict == {"exact": True, "tensors": 20}
    folder = out.save(tmp_path / "f16")
    again = es.load(folder)
    assert isinstance(again, GgufModel) and again.path.exists()
    assert again.lineage[-1]["pass"] == "gguf"


def test_quantized_file_gets_a_verdict_and_a_gate(tmp_path, llama):
    out = es.export.to_gguf(llama, quant="q8_0")
    verdict = out.meta["gguf_export"]["verdict"]
    assert verdict["exact"] is False and verdict["measured_in"] in ("llama.cpp", "transformers")
    assert 0 <= verdict["kld"] < 0.05 and verdict["top1"] > 0.8 and verdict["tokens"] > 100
    read_back = es.export.to_gguf(llama, quant="q8_0", runtime="transformers").meta["gguf_export"]["verdict"]
    assert read_back["measured_in"] == "transformers" and read_back["kld"] < 0.05
    with pytest.raises(ValidationFailed, match="max_kld"):
        es.export.to_gguf(llama, quant="q4_0", embeddings="q4_0", max_kld=1e-9)


def test_pruned_llama_writes_its_new_depth(tmp_path, llama):
    import copy

    module = copy.deepcopy(llama.module)
    del module.model.layers[1]
    module.config.num_hidden_layers = 1
    module.config.layer_types = module.config.layer_types[:1] if getattr(module.config, "layer_types", None) else None
    write_gguf(module, llama.tokenizer, tmp_path / "p.gguf", quant="f32")
    back, _ = _read_back(tmp_path / "p.gguf")
    assert back.config.num_hidden_layers == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, module(ids).logits, atol=1e-5)


def test_qwen2_with_biases_round_trips(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    module = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    report = write_gguf(module, tokenizer, tmp_path / "q.gguf", quant="f32")
    assert report["architecture"] == "qwen2" and not report["tied_embeddings"]
    back, _ = _read_back(tmp_path / "q.gguf")
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_what_gguf_cannot_say_is_refused(llama):
    cfg = llama.module.config
    with pytest.raises(BadInput, match="same sizes in every layer"):
        hyper_of(cfg, {"model.layers.0.self_attn": {"num_heads": 2}})
    scaled = type(cfg).from_dict({**cfg.to_dict(), "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0}})
    with pytest.raises(BadInput, match="plain RoPE"):
        hyper_of(scaled)
    with pytest.raises(BadInput, match="q4_9"):
        write_gguf(llama.module, llama.tokenizer, "/nonexistent/x.gguf", quant="q4_9")
    with pytest.raises(BadInput, match="quant"):
        es.export.to_gguf(llama, quant="q4_9")


def test_cli_export_to_gguf_and_its_bad_inputs(capsys, tmp_path, llama_dir, tiny_bert_dir, cache_dir):
    out = tmp_path / "gguf"
    code, text = _cli(capsys, "export", str(llama_dir), "--to", "gguf", "--quant", "f16", "-o", str(out), "--json")
    assert code == 0, text
    assert (out / "model.gguf").exists()
    meta = json.loads((out / "edgesmith.json").read_text())
    assert meta["kind"] == "gguf" and meta["meta"]["gguf_export"]["verdict"]["exact"] is True

    code, text = _cli(capsys, "export", str(llama_dir), "--to", "gguf", "--quant", "q4_9", "-o", str(tmp_path / "b"))
    assert code == 2 and "q4_9" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()

    code, text = _cli(capsys, "export", str(tiny_bert_dir), "--to", "gguf", "-o", str(tmp_path / "e"))
    assert code == 2 and "causal LM" in text
    assert not (tmp_path / "e").exists()

    code, text = _cli(capsys, "export", str(llama_dir), "--to", "gguf", "--quant", "q4_0", "--embeddings", "q4_0",
                      "--max-kld", "1e-9", "-o", str(tmp_path / "g"))
    assert code == 3 and "max_kld" in text
    assert not (tmp_path / "g").exists()


def test_recipe_plans_gguf_steps_and_llamacpp_profiles(llama_dir):
    from edgesmith.pipeline import plan
    from edgesmith.pipeline.profiles import precision_of
    from edgesmith.recipe import Recipe

    profile = {"artifacts": [{"artifact": "source", "runtime": "llamacpp"}, {"artifact": "gguf", "runtime": "llamacpp"}]}
    planned = plan(Recipe.from_dict({"model": "smollm2", "steps": [{"gguf": {"quant": "q4_1"}}], "profile": profile}))
    assert [(p.input_kind, p.output_kind) for p in planned] == [("torch", "gguf")]
    with pytest.raises(BadInput, match="runtime 'llamacpp' cannot run 'source'"):  # a folder has no GGUF file to run
        plan(Recipe.from_dict({"model": str(llama_dir), "steps": [{"gguf": {}}], "profile": profile}))
    with pytest.raises(BadInput, match="quant"):
        plan(Recipe.from_dict({"model": "smollm2", "steps": [{"gguf": {"quant": "q3"}}], "profile": None}))
    source = TorchModel(task="text-generation", meta={"gguf": {"quant_summary": {"F32": 61, "Q4_1": 210, "Q8_0": 1}}})
    assert precision_of(source, "llamacpp") == "q4_1" and precision_of(source, "torch") == "fp32"
    assert precision_of(GgufModel(meta={"gguf_export": {"quant": "q8_0"}})) == "q8_0"


def test_missing_llama_cpp_is_one_line_naming_the_extra(llama, monkeypatch, capsys, tmp_path):
    """Runs everywhere (no llama_cpp needed): the llama.cpp runtime without llama-cpp-python."""
    import sys

    import edgesmith.runtimes.llamacpp as lc
    import edgesmith.runtimes.llamacpp_library as lc_library
    from edgesmith.runtimes.base import get_runtime

    path = tmp_path / "tiny.gguf"
    write_gguf(llama.module, llama.tokenizer, path, quant="f32")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.setattr(lc_library, "_backend_ready", False)
    with pytest.raises(BadInput, match=r"pip install edgesmith\[llamacpp\]"):
        lc.LlamaCppDecoderSession(path)
    avail = get_runtime("llamacpp").availability()
    assert not avail.usable and "pip install edgesmith[llamacpp]" in avail.reason
    out_file = tmp_path / "never.json"
    code, err = _cli(capsys, "profile", str(path), "--runtime", "llamacpp", "--prompt-tokens", "8",
                     "--new-tokens", "4", "-o", str(out_file))
    assert code == 2 and "pip install edgesmith[llamacpp]" in " ".join(err.split()) and "Traceback" not in err
    assert not out_file.exists()
