"""Decoders as a user drives them: export a Hugging Face causal-LM folder from the CLI (the export
pass routes it to the KV-cache exporter), generate from it, evaluate it against its source with
gates, and the same from Python (es.export.to_onnx, es.generate, es.evaluate)."""

from __future__ import annotations

import json

import pytest
from tiny_lm import tiny_llama, train_tokenizer

import edgesmith as es
from edgesmith.cli.app import main
from edgesmith.errors import BadInput
from edgesmith.quality import check_gates


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = train_tokenizer(folder)
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(llm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "llm-onnx"
    model = es.load(str(llm_folder))
    assert model.task == "text-generation"
    onnx_model = es.export.to_onnx(model, decode_steps=8)
    onnx_model.save(out)
    return out


def test_export_pass_routes_a_causal_lm_to_the_kv_cache_exporter(exported):
    model = es.load(str(exported))
    decoder = model.meta["decoder"]
    assert model.kind == "onnx" and model.task == "text-generation"
    assert decoder["layout"] == "edgesmith" and decoder["num_layers"] == 2
    assert "past_key_values.0.key" in model.input_names and "present.1.value" in model.output_names
    validation = model.lineage[-1]["report"]
    assert validation["steps"] == 8 and validation["prefill_max_abs"] < 1e-3


def test_cli_export_of_a_decoder_folder(capsys, llm_folder, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "export", str(llm_folder), "--to", "onnx", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").exists()
    assert json.loads((tmp_path / "out" / "edgesmith.json").read_text())["meta"]["decoder"]["num_kv_heads"] == 2


def test_generate_from_onnx_equals_torch_greedy(capsys, llm_folder, exported):
    code, out, err = _cli(capsys, "generate", str(exported), "--prompt", "The cocks crowed", "-n", "6",
                          "--no-chat", "--json")
    assert code == 0, err
    onnx_result = json.loads(out)
    torch_result = es.generate(str(llm_folder), "The cocks crowed", max_new_tokens=6, chat=False)
    assert onnx_result["token_ids"] == torch_result.token_ids
    assert 1 <= len(onnx_result["token_ids"]) <= 6
    assert onnx_result["providers"] == ["CPUExecutionProvider"]


def test_generate_streams_text_and_refuses_an_encoder(capsys, exported, tiny_bert_dir):
    code, out, err = _cli(capsys, "generate", str(exported), "--prompt", "a signal", "-n", "4", "--no-chat")
    assert code == 0, err
    assert "tokens" in err and "TTFT" in err
    code, _, err = _cli(capsys, "generate", str(tiny_bert_dir), "--prompt", "hello")
    assert code == 2 and "causal LM" in err and len(err.strip().splitlines()) == 1


def test_evaluate_a_decoder_against_its_source_and_gate(capsys, llm_folder, exported, tmp_path):
    code, out, err = _cli(capsys, "evaluate", str(exported), "--reference", str(llm_folder), "--json")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["kld"] < 1e-4 and metrics["top1"] == 1.0
    assert metrics["perplexity"] == pytest.approx(metrics["perplexity_reference"], rel=1e-3)
    # another model (different weights) as the reference: a real KL, and a gate that fails with exit 3
    other = tmp_path / "other"
    tokenizer = es.load(str(llm_folder)).tokenizer
    model = tiny_llama(seed=1, vocab=len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    code, out, err = _cli(capsys, "evaluate", str(exported), "--reference", str(other), "--gate", "kld=0.001")
    assert code == 3 and "kld" in err


def test_python_evaluate_on_decoders(llm_folder, exported):
    source = es.load(str(llm_folder))
    metrics = es.evaluate(es.load(str(exported)), source, [])
    assert metrics["kld"] < 1e-4 and metrics["top1"] == 1.0


def test_gates_on_decoder_metrics():
    metrics = {"kld": 0.08, "top1": 0.93, "perplexity": 21.0}
    reference = {"perplexity": 20.0}
    assert check_gates(metrics, reference, {"kld": 0.1, "top1": 0.1, "perplexity": 1.5}) == []
    failures = check_gates(metrics, reference, {"kld": 0.05, "top1": 0.05, "perplexity": 0.5})
    assert {f["metric"] for f in failures} == {"kld", "top1", "perplexity"}
    kld = next(f for f in failures if f["metric"] == "kld")
    assert kld["reference"] == 0.0 and kld["drop"] == pytest.approx(0.08)
    with pytest.raises(BadInput, match="unknown metric 'kl'"):
        check_gates(metrics, reference, {"kl": 0.1})



def test_quantize_int4_through_the_pass_and_the_cli(capsys, exported, tmp_path, monkeypatch, cache_dir):
    parent = es.load(str(exported))
    q = es.compress.quantize(parent, mode="int4", block=32)
    assert q.meta["precision"].startswith("int4") and q.meta["quantization"]["method"] == "rtn"
    assert q.size_bytes() < parent.size_bytes()
    fidelity = q.lineage[-1]["report"]["fidelity"]
    assert 0 < fidelity["kld"] and 0 < fidelity["top1"] <= 1
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "quantize", str(exported), "--mode", "int4", "--method", "rtn", "-o", str(tmp_path / "q"))
    assert code == 0, err
    assert (tmp_path / "q" / "model.onnx").exists()
    code, _, err = _cli(capsys, "quantize", str(exported), "--mode", "int4", "--method", "entropy")
    assert code == 2 and "static calibration method" in err
    code, _, err = _cli(capsys, "quantize", str(exported), "--mode", "dynamic", "--block", "64")
    assert code == 2 and "block" in err and "dynamic" in err


def test_new_options_leave_existing_cache_keys_unchanged():
    """Options added for decoders are left out of a step's cache key while at their default, so a
    cache filled before they existed is still hit."""
    from edgesmith.compress.quantization import QuantizeConfig
    from edgesmith.export.onnx import ExportConfig

    assert "decode_steps" not in ExportConfig().key_dump()
    assert "decode_steps" in ExportConfig(decode_steps=8).key_dump()
    key = QuantizeConfig(mode="dynamic").key_dump()
    assert not {"block", "symmetric", "accuracy_level", "quantize_lm_head", "gguf_file", "max_kld", "fallback"} & set(key)
    assert key["method"] == "minmax"
    assert QuantizeConfig(mode="int4").key_dump()["method"] == "rtn"


def test_int4_on_an_encoder_is_one_line_exit_2(capsys, tiny_bert_dir, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "export", str(tiny_bert_dir), "-o", str(tmp_path / "enc"))
    assert code == 0, err
    code, _, err = _cli(capsys, "quantize", str(tmp_path / "enc"), "--mode", "int4")
    assert code == 2 and "weight-only quantization for decoders" in " ".join(err.split()) and "Traceback" not in err
