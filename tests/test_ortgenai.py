"""ORT GenAI folders and the ``ortgenai`` runtime: ``export --to genai`` on a tiny Llama gives a
folder ONNX Runtime GenAI loads; its generator (right padding, its own KV cache) gives each row of a
mixed-length batch the tokens of that prompt alone and of PyTorch; generate/profile/evaluate run on
it from the CLI; ``quantize --mode int4`` keeps it a folder ORT GenAI runs; bad folders are one
line; the MLAS asymmetric-int4 check refuses only where the kernel is wrong."""

from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from tiny_lm import tiny_llama, train_tokenizer

from edgesmith.artifacts import TorchModel, load
from edgesmith.errors import BadInput
from edgesmith.runtimes import mlas_check
from edgesmith.runtimes.base import get_runtime
from edgesmith.runtimes.generation import GenerationConfig, decode_loop, left_pad, open_decoder
from edgesmith.runtimes.onnxruntime import OrtDecoderSession
from edgesmith.runtimes.torch import TorchDecoderSession

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                reason="onnxruntime-genai is not installed (pip install 'edgesmith[llm]')")

PROMPTS = ["The cocks crowed", "she looked meek but had the heart of a lion, they said", "a signal"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    from edgesmith.export import to_genai

    base = tmp_path_factory.mktemp("ortgenai")
    tokenizer = train_tokenizer(base / "tokenizer")
    source = TorchModel(task="text-generation", name="tiny-llama", module=tiny_llama(), tokenizer=tokenizer)
    source.save(base / "source")
    folder = base / "genai"
    to_genai(source).save(folder)
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return SimpleNamespace(base=base, tokenizer=tokenizer, source=source, folder=folder, rows=rows)


def _cli(capsys, *args):
    from edgesmith.cli.app import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_the_folder_is_an_ort_genai_folder(tiny):
    import onnxruntime_genai as og

    config = json.loads((tiny.folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["model"]["context_length"] > 0
    model = og.Model(str(tiny.folder))  # what a user of ORT GenAI does, with nothing of edgesmith
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tiny.rows[1]) + 8, min_length=len(tiny.rows[1]) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(tiny.rows[1], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = TorchDecoderSession(tiny.source)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True, chat=False)
    expected = decode_loop(reference, np.array([tiny.rows[1]]), None, cfg).tokens[0].tolist()
    assert tokens == expected


def test_mixed_length_batch_equals_each_prompt_alone_and_pytorch(tiny):
    _, session = open_decoder(load(tiny.folder), "ortgenai")
    reference = TorchDecoderSession(tiny.source)
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True, chat=False)
    ids, mask = left_pad(tiny.rows, 0)
    batched = decode_loop(session, ids, mask, cfg).tokens  # edgesmith's sampler steering ORT GenAI's search
    native = session.decode_rows(tiny.rows, 10, 0).tokens  # ORT GenAI's own greedy loop, right-padded
    for i, row in enumerate(tiny.rows):
        alone = decode_loop(reference, np.array([row]), None, cfg).tokens[0]
        assert np.array_equal(batched[i], alone) and np.array_equal(native[i], alone)
    assert session.providers and session.options["kv_cache"] == "ort-genai"


def test_logits_and_rollback_match_onnxruntime(tiny):
    _, session = open_decoder(load(tiny.folder), "ortgenai")
    ort_session = OrtDecoderSession(load(tiny.folder))
    ids, mask = left_pad(tiny.rows, 0)
    ours, theirs = session.logits(ids, mask), ort_session.logits(ids, mask)
    real = mask.astype(bool)
    assert ours.shape == theirs.shape and np.abs(ours[real] - theirs[real]).max() < 1e-4
    row = np.array([tiny.rows[1]])
    first = session.prefill(row)
    drafted = session.extend(np.array([[5, 6, 7]]), keep=3)  # several tokens after the cache (speculative)
    session.rollback(row.shape[1])
    again = session.step(np.array([5]))
    assert np.allclose(again, drafted[:, 0], atol=1e-4) and first.shape == (1, 400)


def test_cli_generate_profile_and_evaluate_on_ortgenai(tiny, tmp_path, capsys):
    args = ("--prompt", PROMPTS[1], "-n", "6", "--no-chat", "--json")
    code, out, err = _cli(capsys, "generate", tiny.folder, *args, "--runtime", "ortgenai")
    assert code == 0, err
    code, out_ort, err = _cli(capsys, "generate", tiny.folder, *args, "--runtime", "onnxruntime")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == json.loads(out_ort)["token_ids"]
    code, out, err = _cli(capsys, "profile", tiny.folder, "--runtime", "ortgenai", "--prompt-tokens", "16",
                          "--new-tokens", "8", "--rounds", "1", "--warmup", "0", "-o", tmp_path / "p.json", "--json")
    assert code == 0, err
    profile = json.loads((tmp_path / "p.json").read_text())
    generation = profile["generation"]
    assert profile["runtime"]["name"] == "ortgenai" and generation["decode_steps"] == 7
    assert profile["runtime"]["options"]["max_length"] == 16 + 8 + 1 and len(generation["decode_tokens_per_s"]) == 1
    code, out, err = _cli(capsys, "evaluate", tiny.folder, "--reference", tiny.base / "source",
                          "--runtime", "ortgenai", "--json")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["kld"] < 1e-6 and metrics["top1"] == 1.0


def test_quantized_folder_stays_an_ort_genai_folder(tiny, tmp_path, capsys):
    code, _, err = _cli(capsys, "quantize", tiny.folder, "--mode", "int4", "--method", "rtn", "-o", tmp_path / "q",
                        "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--json")
    assert code == 0, err
    assert (tmp_path / "q" / "genai_config.json").is_file()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph.node]
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and ops.count("Split") == 2  # q/k/v and gate/up packed
    _, session = open_decoder(load(tmp_path / "q"), "ortgenai")
    run = session.decode_rows(tiny.rows, 4, 0)
    assert run.tokens.shape == (3, 4)
    import edgesmith as es  # the same quantization unpacked: the same logits, bit for bit (zero points included)

    unpacked = es.compress.quantize(load(tiny.folder), mode="int4", method="rtn", pack=False)
    ids, mask = left_pad(tiny.rows, 0)
    assert np.array_equal(OrtDecoderSession(unpacked).logits(ids, mask), OrtDecoderSession(load(tmp_path / "q")).logits(ids, mask))


def test_bad_folders_and_batches_are_one_line(tiny, tmp_path):
    runtime = get_runtime("ortgenai")
    dynamo = tmp_path / "plain"
    dynamo.mkdir()
    with pytest.raises(BadInput, match="not an ORT GenAI folder.*--to genai") as info:
        runtime.load_decoder_at(dynamo)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    broken = tmp_path / "broken"
    shutil.copytree(tiny.folder, broken)
    config = json.loads((broken / "genai_config.json").read_text())
    del config["model"]["context_length"]
    (broken / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="missing model.context_length"):
        runtime.load_decoder_at(broken)
    config["model"]["context_length"] = 64
    config["model"]["decoder"]["filename"] = "elsewhere.onnx"
    (broken / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="elsewhere.onnx"):
        runtime.load_decoder_at(broken)
    _, session = open_decoder(load(tiny.folder), "ortgenai")
    pad = session.pad_token_id
    with pytest.raises(BadInput, match="ends with token"):  # ORT GenAI would read that row as shorter
        session.prefill(*left_pad([tiny.rows[0] + [pad], tiny.rows[1]], 0))
    with pytest.raises(BadInput, match="context"):
        session.decode_rows([[1] * (session.max_positions - 5)], 10, 0)
    with pytest.raises(BadInput, match="ortgenai"):  # a model that is not a folder of it
        open_decoder(tiny.source, "ortgenai")


def test_mlas_asymmetric_int4_check(tiny, tmp_path, capsys, monkeypatch):
    error = mlas_check.asymmetric_int4_error()  # measured on this machine's kernel
    assert np.isfinite(error) and error >= 0
    code, _, err = _cli(capsys, "quantize", tiny.folder, "--mode", "int4", "--method", "rtn", "-o", tmp_path / "a",
                        "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    graph = tmp_path / "a" / "model.onnx"
    assert mlas_check.has_asymmetric_int4(graph) and not mlas_check.has_asymmetric_int4(tiny.folder / "model.onnx")
    monkeypatch.setattr(mlas_check, "asymmetric_int4_error", lambda: 0.46)  # the kernel of issue #29853
    with pytest.raises(BadInput, match="#29853") as info:
        OrtDecoderSession(load(tmp_path / "a"))
    assert "\n" not in str(info.value)
    with pytest.raises(BadInput, match="symmetric"):
        open_decoder(load(tmp_path / "a"), "ortgenai")
    OrtDecoderSession(load(tiny.folder))  # a float graph loads where the kernel is wrong
    mlas_check.check_asymmetric_int4(graph, provider="cuda")  # other providers do not use MLAS


def test_any_ort_genai_folder_runs_without_edgesmiths_record(tiny, tmp_path):
    """A folder ORT GenAI's builder (or anyone) wrote, without edgesmith.json: --runtime ortgenai reads
    it as it is, with genai_config.json's facts, and generates what the recorded folder generates."""
    plain = tmp_path / "builder-folder"
    shutil.copytree(tiny.folder, plain)
    (plain / "edgesmith.json").unlink()
    artifact, session = open_decoder(plain, "ortgenai")
    assert artifact.meta["decoder"]["padding"] == "right" and artifact.tokenizer is not None
    _, recorded = open_decoder(load(tiny.folder), "ortgenai")
    assert np.array_equal(session.decode_rows(tiny.rows, 6, 0).tokens, recorded.decode_rows(tiny.rows, 6, 0).tokens)
