"""Batched generation (``edgesmith profile ART --batch 1,2,4,8``): static batches of mixed-length
prompts, one generation profile per batch size, on a tiny Llama with GQA (hidden 64, 2 layers, vocab
400, context 256) in PyTorch and in its KV-cached ONNX export, and (marked llamacpp) on an F32 GGUF
of it and the packaged SmolLM2 Q4_1 GGUF in llama.cpp. Each row of a mixed-length batch must
generate the greedy tokens it generates alone. No timing asserts: counts, shapes, files, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_lm import tiny_llama, train_tokenizer

from edgesmith.artifacts import TorchModel
from edgesmith.cli.app import main
from edgesmith.errors import BadInput
from edgesmith.profiling import PROFILE_SCHEMA_VERSION, Profile, compare, profile
from edgesmith.profiling.batched import batch_rows, is_batch_list, mixed_lengths, parse_batches
from edgesmith.runtimes.generation import decode_static_batch, open_decoder, pad_id_of

CENTER = 16
NEW = 8


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The tiny Llama as a TorchModel with a byte-level BPE tokenizer, and its ONNX export."""
    from edgesmith.export.decoder import export_decoder

    base = tmp_path_factory.mktemp("batched-generation")
    tokenizer = train_tokenizer(base / "tokenizer")
    torch_model = TorchModel(task="text-generation", name="tiny-llama", module=tiny_llama(), tokenizer=tokenizer)
    onnx_model = export_decoder(torch_model, base / "onnx", steps=4)
    return torch_model, onnx_model


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _rows_match_alone(session, rows: list[list[int]], pad: int) -> None:
    batched = decode_static_batch(session, rows, NEW, pad)
    session.reset()
    assert batched.tokens.shape == (len(rows), NEW) and len(batched.latencies_ms) == NEW - 1
    for i, row in enumerate(rows):
        alone = decode_static_batch(session, [row], NEW, pad)
        session.reset()
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist(), f"row {i} ({len(row)} tokens)"


# ---------------------------------------------------------------------------------------------
# prompts and arguments
# ---------------------------------------------------------------------------------------------


def test_mixed_lengths_spread_around_the_center_and_batch_parsing():
    assert mixed_lengths(128, 1) == [128]
    assert mixed_lengths(128, 4) == [64, 107, 149, 192] and np.mean(mixed_lengths(128, 8)) == 128
    assert mixed_lengths(2, 3) == [1, 2, 3]
    assert parse_batches("1,2,4,8") == [1, 2, 4, 8] and parse_batches([4, 1]) == [4, 1] and parse_batches(3) == [3]
    assert is_batch_list("1,2") and is_batch_list([1]) and not is_batch_list("4") and not is_batch_list(4)
    for bad, message in (("1,x", "separated by commas"), ("0,2", "at least 1"), ("2,2", "listed twice"),
                         ([], "at least one batch size")):
        with pytest.raises(BadInput, match=message):
            parse_batches(bad)
    with pytest.raises(BadInput, match="spread"):
        mixed_lengths(16, 2, spread=1.0)


def test_batch_rows_are_cut_from_the_corpus_to_their_lengths(lm):
    tokenizer = lm[0].tokenizer
    rows = batch_rows(tokenizer, CENTER, [1, 2, 4])
    assert [len(r) for r in rows[4]] == mixed_lengths(CENTER, 4) and [len(r) for r in rows[1]] == [CENTER]
    assert rows[2][0] == rows[4][0][:len(rows[2][0])]  # row i of every batch comes from the same sentences
    assert len({tuple(r[:8]) for r in rows[4]}) == 4  # and every row from other sentences


# ---------------------------------------------------------------------------------------------
# each row of a mixed-length batch = its batch-1 greedy run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_each_row_of_a_mixed_batch_generates_its_batch1_tokens(lm, runtime):
    model = lm[0] if runtime == "torch" else lm[1]
    rows = batch_rows(lm[0].tokenizer, CENTER, [5])[5]
    assert len({len(r) for r in rows}) == 5  # five lengths: every row but the longest is left-padded
    _, session = open_decoder(model, runtime, threads=1)
    with session:
        session.reserve(5, max(len(r) for r in rows) + NEW)
        _rows_match_alone(session, rows, pad_id_of(session, lm[0].tokenizer))


def test_reserve_refuses_more_than_the_context(lm):
    _, session = open_decoder(lm[0], "torch", threads=1)
    with session, pytest.raises(BadInput, match="300 tokens exceed the model's context of 256"):
        session.reserve(2, 300)


# ---------------------------------------------------------------------------------------------
# profiles, compare, CLI
# ---------------------------------------------------------------------------------------------


def test_python_profiles_one_per_batch_size_and_compare_side_by_side(lm, tmp_path):
    profiles = profile(lm[1], batch=[1, 2, 4], prompt_tokens=[CENTER], new_tokens=5, rounds=2, warmup=1, threads=1,
                       label="tiny onnx")
    assert isinstance(profiles, list) and [p.shapes.batch for p in profiles] == [1, 2, 4]
    for prof in profiles:
        gen = prof.generation
        assert gen is not None and gen.batched is not None and prof.schema_version == PROFILE_SCHEMA_VERSION == 3
        assert gen.batched.row_prompt_tokens == mixed_lengths(CENTER, prof.shapes.batch)
        assert gen.batched.loop.startswith("edgesmith's loop") and gen.batched.spread == 0.5
        assert gen.rounds == 2 and len(gen.ttft_of(CENTER)) == 2 and len(gen.batched.time_per_output_token_ms) == 2
        assert len(prof.latencies_ms) == 2 * 4 and prof.label == f"tiny onnx batch {prof.shapes.batch}"
        steps_ms = [sum(prof.latencies_ms[i * 4:(i + 1) * 4]) for i in range(2)]
        assert gen.decode_tokens_per_s == pytest.approx([prof.shapes.batch * 4 * 1000 / ms for ms in steps_ms])
        assert gen.prefill_tokens_per_s[str(CENTER)][0] == pytest.approx(
            sum(gen.batched.row_prompt_tokens) * 1000 / gen.ttft_of(CENTER)[0])
        loaded = Profile.load(prof.save(tmp_path / f"b{prof.shapes.batch}.json"))
        assert loaded.generation.batched == gen.batched
    comparison = compare(profiles)
    assert [r.verdict for r in comparison.rows][0] == "baseline"
    for row, prof in zip(comparison.rows[1:], profiles[1:]):  # aggregate throughput against batch 1
        agg = [ms / prof.shapes.batch for ms in prof.latencies_ms]
        base = profiles[0].latencies_ms
        assert row.verdict != "different shapes" and row.speedup == pytest.approx(np.median(base) / np.median(agg))
        assert row.generation.ttft[str(CENTER)].verdict != "different shapes"
    assert "4x16+5" in comparison.markdown()


def test_a_version_2_generation_profile_still_loads(lm, tmp_path):
    prof = profile(lm[0], batch=[1, 2], prompt_tokens=[8], new_tokens=3, rounds=1, warmup=0, threads=1)[1]
    data = prof.model_dump(mode="json")
    data["schema_version"] = 2
    del data["generation"]["batched"]
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(data))
    old = Profile.load(path)
    assert old.generation is not None and old.generation.batched is None and old.shapes.batch == 2


def test_cli_batch_list_writes_a_profile_per_size_and_compare_reads_them(lm, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    code, stdout, err = _cli(capsys, "profile", str(lm[1].folder), "--batch", "1,2", "--prompt-tokens", "12",
                             "--new-tokens", "4", "--rounds", "1", "--warmup", "0", "--threads", "1", "-o", str(out))
    assert code in (0, None), err
    files = [tmp_path / "tiny-b1.json", tmp_path / "tiny-b2.json"]
    assert all(f.exists() for f in files) and not out.exists()
    assert "aggregate" in stdout and "6-18" in stdout and "ran in edgesmith's loop" in " ".join(stdout.split())
    assert [Profile.load(f).shapes.batch for f in files] == [1, 2]
    code, stdout, err = _cli(capsys, "compare", *map(str, files))
    assert code in (0, None), err
    assert "2x12+4" in stdout and "1x12+4" in stdout


def test_cli_batched_bad_inputs_are_one_line_exit_2(lm, tmp_path, capsys):
    out = tmp_path / "never.json"
    folder = str(lm[1].folder)
    for args, message in (
        ([folder, "--batch", "1,x"], "give batch sizes separated by commas"),
        ([folder, "--batch", "1,2", "--prompt-tokens", "200", "--new-tokens", "8"],
         "the batch's longest prompt (300 tokens) and 8 new tokens exceed the model's context of 256"),
        ([folder, "--batch", "1,2", "--prompt-tokens", "8,16"], "a batched profile takes one prompt length"),
        ([folder, "--batch", "1,2", "--seq", "64"], "--seq applies to one-forward-pass profiles"),
        (["minilm", "--batch", "1,2"], "a list of batch sizes applies to decoders"),
    ):
        code, _, err = _cli(capsys, "profile", *args, "--threads", "1", "-o", str(out))
        assert code == 2, (args, err)
        assert message in " ".join(err.split()) and "Traceback" not in err
        assert not list(tmp_path.glob("never*"))
    with pytest.raises(BadInput, match="profile_generation takes one batch size"):
        from edgesmith.profiling import profile_generation

        profile_generation(lm[0], batch=[1, 2])


# ---------------------------------------------------------------------------------------------
# llama.cpp: several sequences in one llama_decode
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(lm, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install edgesmith[llamacpp])")
    from edgesmith.gguf.writer import write_gguf

    path = tmp_path_factory.mktemp("batched-gguf") / "tiny.gguf"
    write_gguf(lm[0].module, lm[0].tokenizer, path, quant="f32", name="tiny-llama")
    return path


@pytest.mark.llamacpp
def test_llamacpp_rows_of_a_mixed_batch_equal_their_batch1_runs_smollm2():
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession, load_gguf_file

    art = load_gguf_file("smollm2")
    rows = batch_rows(art.tokenizer, 24, [4])[4]
    with LlamaCppDecoderSession(art, threads=2, n_ctx=64) as session:
        session.reserve(4, 64)
        assert session.options["n_seq_max"] == 4 and session.max_positions >= 64
        _rows_match_alone(session, rows, 0)


@pytest.mark.llamacpp
def test_llamacpp_batched_profiles_and_bad_inputs(tiny_gguf, tmp_path, capsys):
    rows = batch_rows(train_tokenizer(tmp_path / "tok"), CENTER, [3])[3]
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession

    with LlamaCppDecoderSession(tiny_gguf, threads=1, n_ctx=64, n_batch=16) as session:
        _rows_match_alone(session, rows, 0)  # prefill grows the cache to three sequences itself
        assert session.options["n_seq_max"] == 3
    out = tmp_path / "gguf.json"
    code, stdout, err = _cli(capsys, "profile", str(tiny_gguf), "--runtime", "llamacpp", "--batch", "1,4",
                             "--prompt-tokens", "12", "--new-tokens", "4", "--rounds", "1", "--warmup", "0",
                             "--threads", "1", "-o", str(out))
    assert code in (0, None), err
    prof = Profile.load(tmp_path / "gguf-b4.json")
    assert prof.runtime.name == "llamacpp" and prof.runtime.options["n_seq_max"] == 4
    assert prof.generation.batched.row_prompt_tokens == mixed_lengths(12, 4)
    assert "each row a llama.cpp sequence of its own" in prof.generation.batched.loop
    code, _, err = _cli(capsys, "profile", str(tiny_gguf), "--runtime", "llamacpp", "--batch", "1,300",
                        "-o", str(tmp_path / "never.json"))
    assert code == 2 and "batch 300 is more than runtime 'llamacpp' runs at once (256 rows)" in " ".join(err.split())
    code, _, err = _cli(capsys, "profile", str(tiny_gguf), "--runtime", "llamacpp", "--batch", "1,2",
                        "--prompt-tokens", "200", "-o", str(tmp_path / "never.json"))
    assert code == 2 and "the batch's longest prompt has 300 tokens (--prompt-tokens 200 +50%)" in " ".join(err.split())
    assert not list(tmp_path.glob("never*"))


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def test_recipe_profile_step_takes_a_list_of_batch_sizes(lm, tmp_path):
    from rich.console import Console

    from edgesmith.pipeline.profiles import profile_all, profiles_manifest
    from edgesmith.recipe import Recipe

    for bad in ([], [0, 2], [2, 2]):
        with pytest.raises(BadInput, match="batch"):
            Recipe.from_dict({"profile": {"batch": bad}})
    recipe = Recipe.from_dict({"steps": ["export"], "profile": {"batch": [1, 2], "prompt_tokens": [8, 32],
                                                                "new_tokens": 3, "rounds": 1}})
    profiles, comparison = profile_all(recipe, {"source": lm[0], "export": lm[1]}, {"export": {"kld": 0.0}},
                                       tmp_path, Console(quiet=True))
    assert [(p.runtime.name, p.shapes.batch, p.shapes.seq) for p in profiles] == [
        ("torch", 1, 8), ("torch", 2, 8), ("onnxruntime", 1, 8), ("onnxruntime", 2, 8)]
    assert len(comparison.rows) == 4 and len(list((tmp_path / "profiles").glob("*.json"))) == 4
    assert profiles[3].quality == {"kld": 0.0} and profiles[3].generation.batched.row_prompt_tokens == [4, 12]
    record = profiles_manifest(recipe, profiles, comparison)
    assert [(p["artifact"], p["file"].endswith("batch_2.json")) for p in record["profiles"]] == [
        ("source", False), ("source", True), ("export", False), ("export", True)]
    assert isinstance(record["warnings"], list)


def test_bench_table_names_the_runtime_that_scales_best():
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from bench import llm_batched

    rows = {"a": {"1": {"decode_tokens_per_s": [10.0, 12.0], "ttft_ms": [100.0, 110.0], "tpot_ms": [100.0, 84.0],
                        "prompt_tokens": [16], "peak_rss_mb": 200.0},
                  "4": {"decode_tokens_per_s": [30.0, 30.0], "ttft_ms": [300.0, 330.0], "tpot_ms": [133.0, 133.0],
                        "prompt_tokens": [8, 13, 19, 24], "peak_rss_mb": 220.0}},
            "b": {"1": {"decode_tokens_per_s": [50.0, 50.0], "ttft_ms": [40.0, 40.0], "tpot_ms": [20.0, 20.0],
                        "prompt_tokens": [16], "peak_rss_mb": 100.0},
                  "4": {"decode_tokens_per_s": [60.0, 60.0], "ttft_ms": [90.0, 90.0], "tpot_ms": [66.0, 66.0],
                        "prompt_tokens": [8, 13, 19, 24], "peak_rss_mb": 120.0}}}
    summary = llm_batched.summarize(rows, [1, 4])
    assert summary["a"]["4"]["scaling"][0] == pytest.approx(np.median([3.0, 2.5]))
    doc = {"batches": [1, 4], "machine": {"cpu_model": "cpu", "threads": 2}, "command": "x", "prompt_tokens": 16,
           "new_tokens": 8, "rounds": 2, "provisional": "loaded", "summary": summary,
           "contenders": {"a": {"label": "A", "loop": "edgesmith's loop"}, "b": {"label": "B"}}}
    text = llm_batched.render(doc)
    assert "**Scales best: a** — batch 4 decodes 2.75x" in text and "goal ≥ 2.5x at batch 4: met" in text
    assert "| b | 4 | 8-24 | 60.0" in text and "**Provisional**: loaded" in text
