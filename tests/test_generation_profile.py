"""Generation profiles (edgesmith.profiling.generation) and their comparison, on a tiny Llama with GQA
(hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 400, context 256) and its KV-cached ONNX export
(edgesmith.export.decoder). No timing asserts: counts, kinds, providers, intervals on synthetic
samples, the CLI's files and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_lm import VOCAB, tiny_llama, train_tokenizer

from edgesmith.artifacts import TorchModel
from edgesmith.cli.app import main
from edgesmith.errors import BadInput
from edgesmith.profiling import (
    MIN_TTFT_SAMPLES,
    PROFILE_SCHEMA_VERSION,
    ArtifactInfo,
    Profile,
    RuntimeInfo,
    Shapes,
    compare,
    generation_profile,
    generation_slowdowns,
    profile,
    profile_generation,
)
from edgesmith.profiling.generation import parse_prompt_tokens, prompt_batches
from edgesmith.recipe import ProfileSpec, Recipe

LENGTHS = (8, 24)
NEW = 6
ROUNDS = 2


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The tiny Llama as a TorchModel with a byte-level BPE tokenizer, and its ONNX export."""
    from edgesmith.export.decoder import export_decoder

    base = tmp_path_factory.mktemp("generation-profile")
    tokenizer = train_tokenizer(base / "tokenizer")
    torch_model = TorchModel(task="text-generation", name="tiny-llama", module=tiny_llama(), tokenizer=tokenizer)
    onnx_model = export_decoder(torch_model, base / "onnx", steps=4)
    return torch_model, onnx_model


@pytest.fixture(scope="module")
def torch_profile(lm) -> Profile:
    return profile_generation(lm[0], prompt_tokens=LENGTHS, new_tokens=NEW, rounds=ROUNDS, warmup=1)


@pytest.fixture(scope="module")
def onnx_profile(lm) -> Profile:
    # through es.profile (the dispatcher): the same Python API as for encoders
    return profile(lm[1], prompt_tokens=list(LENGTHS), new_tokens=NEW, rounds=ROUNDS, threads=1, label="tiny onnx")


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _check_counts(prof: Profile) -> None:
    gen = prof.generation
    assert prof.kind == "generation" and prof.is_generation and gen is not None
    assert gen.prompt_tokens == list(LENGTHS) and gen.new_tokens == NEW and gen.rounds == ROUNDS
    assert gen.decode_prompt_tokens == LENGTHS[0] and gen.decode_steps == NEW - 1
    assert set(gen.ttft_ms) == {str(n) for n in LENGTHS}
    assert all(len(gen.ttft_of(n)) == ROUNDS and min(gen.ttft_of(n)) > 0 for n in LENGTHS)
    assert all(len(v) == ROUNDS and min(v) > 0 for v in gen.prefill_tokens_per_s.values())
    assert len(gen.decode_tokens_per_s) == ROUNDS and min(gen.decode_tokens_per_s) > 0
    assert len(prof.latencies_ms) == ROUNDS * (NEW - 1) == prof.stats.n == prof.iterations
    assert prof.throughput > 0 and prof.shapes == Shapes(batch=1, seq=LENGTHS[0])
    assert gen.prompt_source == "tokenizer" and gen.greedy and gen.eos_ignored
    assert gen.peak_rss_mb and gen.peak_rss_mb > 0 and gen.rss_source
    assert gen.load_s >= 0 and prof.warmup == 1


def test_torch_generation_profile(torch_profile):
    _check_counts(torch_profile)
    assert torch_profile.runtime.name == "torch" and torch_profile.runtime.providers == ["torch-cpu"]
    assert torch_profile.runtime.options["kv_cache"] == "DynamicCache"
    assert torch_profile.environment.threads == torch_profile.runtime.options["threads"]


def test_onnx_generation_profile_and_json_round_trip(onnx_profile, tmp_path):
    _check_counts(onnx_profile)
    assert onnx_profile.label == "tiny onnx" and onnx_profile.runtime.name == "onnxruntime"
    assert onnx_profile.runtime.providers == ["CPUExecutionProvider"]
    assert onnx_profile.runtime.options["threads"] == 1 and onnx_profile.environment.threads == 1
    assert onnx_profile.artifact.task == "text-generation" and onnx_profile.artifact.kind == "onnx"
    path = onnx_profile.save(tmp_path / "gen.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == PROFILE_SCHEMA_VERSION and data["kind"] == "generation"
    assert Profile.load(path) == onnx_profile


def test_prompts_are_exactly_n_tokens(lm):
    tokenizer = lm[0].tokenizer
    prompts, source = prompt_batches(tokenizer, [5, 200], 2, vocab_size=VOCAB)
    assert source == "tokenizer" and prompts[5].shape == (2, 5) and prompts[200].shape == (2, 200)
    assert not np.array_equal(prompts[200][0], prompts[200][1])  # each row from other sentences
    again, _ = prompt_batches(tokenizer, [5, 200], 2, vocab_size=VOCAB)
    assert all(np.array_equal(prompts[n], again[n]) for n in prompts)  # the same work for every artifact
    short, _ = prompt_batches(tokenizer, [300], 1, vocab_size=VOCAB, texts=["a cat"])  # texts repeat to fill
    assert short[300].shape == (1, 300)
    ids, source = prompt_batches(None, [7], 3, vocab_size=VOCAB)
    assert source == "random ids" and ids[7].shape == (3, 7) and 0 <= ids[7].min() and ids[7].max() < VOCAB


def test_random_prompts_without_tokenizer(lm):
    bare = TorchModel(task="text-generation", name="bare", module=lm[0].module)
    prof = profile_generation(bare, prompt_tokens=[4], new_tokens=3, rounds=1, warmup=0)
    assert prof.generation.prompt_source == "random ids" and len(prof.latencies_ms) == 2


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_one_line(lm):
    torch_model, onnx_model = lm
    cases = [
        (lambda: profile_generation(onnx_model, prompt_tokens=[300], new_tokens=4), "longer than the model's context of 256"),
        (lambda: profile_generation(onnx_model, prompt_tokens=[250], new_tokens=10), "exceed the model's context"),
        (lambda: profile_generation(torch_model, runtime="onnxruntime"), "export it first"),
        (lambda: profile_generation(onnx_model, runtime="torch"), "use --runtime onnxruntime"),
        (lambda: profile_generation(onnx_model, runtime="tensorrt"), "has no generation loop"),
        (lambda: profile_generation(onnx_model, new_tokens=1), "at least 2"),
        (lambda: profile_generation(onnx_model, dtype="fp16"), "take no option(s) dtype"),
        (lambda: profile(onnx_model, seq=64), "seq applies to one-forward-pass profiles"),
        (lambda: parse_prompt_tokens("128,x"), "comma-separated"),
        (lambda: parse_prompt_tokens([8, 8]), "listed twice"),
    ]
    for call, message in cases:
        with pytest.raises(BadInput) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
    encoder = TorchModel(task="feature-extraction", name="enc", module=torch_model.module)
    with pytest.raises(BadInput, match="new_tokens applies to decoders"):
        profile(encoder, new_tokens=8)
    with pytest.raises(BadInput, match="generation profiles are for causal LMs"):
        profile_generation(encoder)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------


def synthetic_generation(decode_ms, ttft: dict[int, list[float]], *, label="g", new_tokens=None, batch=1) -> Profile:
    """A generation profile from given samples (no model run), as a benchmark's other runtime would make one."""
    rounds = len(next(iter(ttft.values())))
    steps = new_tokens - 1 if new_tokens else len(decode_ms) // rounds
    return generation_profile(
        label=label, artifact=ArtifactInfo(name=label, kind="onnx", hash="0" * 64, size_bytes=1_000_000,
                                           task="text-generation"),
        runtime=RuntimeInfo(name="onnxruntime", providers=["CPUExecutionProvider"]), threads=2, batch=batch,
        new_tokens=steps + 1, warmup=1, ttft_ms=ttft,
        decode_ms=[decode_ms[i * steps:(i + 1) * steps] for i in range(rounds)], load_s=0.1, peak_rss_mb=300.0,
        rss_source="test")


def test_generation_profile_from_samples_checks_counts():
    prof = synthetic_generation([2.0] * 6, {16: [9.0, 10.0, 11.0], 64: [20.0, 21.0, 22.0]})
    assert prof.generation.decode_tokens_per_s == [500.0] * 3 and prof.generation.prefill_tokens_per_s["64"][0] == 3200
    assert prof.shapes == Shapes(batch=1, seq=16) and prof.stats.n == 6
    with pytest.raises(BadInput, match="decode latencies per round"):
        synthetic_generation([2.0] * 5, {16: [9.0, 10.0, 11.0]}, new_tokens=3)
    with pytest.raises(BadInput, match="one TTFT per round"):
        synthetic_generation([2.0] * 6, {16: [9.0, 10.0, 11.0], 64: [20.0]})


def lognormal(median_ms: float, n: int, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).lognormal(mean=np.log(median_ms), sigma=0.1, size=n))


OLD_STYLE = {  # a profile as edgesmith wrote it before generation profiles (schema 1)
    "schema_version": 1, "kind": "measured", "label": "minilm (onnxruntime)",
    "artifact": {"name": "minilm", "kind": "onnx", "hash": "a" * 64, "size_bytes": 90_000_000,
                 "task": "feature-extraction"},
    "runtime": {"name": "onnxruntime", "providers": ["CPUExecutionProvider"], "options": {"threads": 2}},
    "target": "cpu-local",
    "environment": {"cpu_model": "x", "cores": 2, "threads": 2, "os": "Linux", "kernel": "6", "machine": "x86_64",
                    "python": "3.12", "libraries": {"onnxruntime": "1.32.0"}},
    "shapes": {"batch": 1, "seq": 128}, "warmup": 5, "iterations": 5, "time_budget_s": None,
    "latencies_ms": [5.0, 5.1, 4.9, 5.2, 5.0],
    "stats": {"p50": 5.0, "p90": 5.16, "p99": 5.2, "mean": 5.04, "std": 0.11, "min": 4.9, "max": 5.2, "n": 5},
    "throughput": 200.0, "peak_host_memory_mb": 310.0, "quality": {}, "per_op": None, "estimate": None,
    "early_exit": None, "created": "2026-11-29T00:00:00+00:00",
}


def test_old_profile_loads_and_newer_is_refused(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(OLD_STYLE))
    loaded = Profile.load(old)
    assert loaded.schema_version == 1 and loaded.kind == "measured" and loaded.generation is None
    gen = synthetic_generation(lognormal(5, 20, 0), {8: [30.0, 31.0]})
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**gen.model_dump(mode="json"), "schema_version": PROFILE_SCHEMA_VERSION + 1}))
    with pytest.raises(BadInput, match="newer edgesmith") as info:
        Profile.load(newer)
    assert "\n" not in str(info.value)
    headless = tmp_path / "headless.json"
    headless.write_text(json.dumps({**gen.model_dump(mode="json"), "generation": None}))
    with pytest.raises(BadInput, match="not a valid profile"):
        Profile.load(headless)


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def test_compare_generation_speedup_interval_verdicts():
    base = synthetic_generation(lognormal(10.0, 60, 1), {128: [400.0, 410.0, 405.0], 512: [1600.0, 1620.0, 1610.0]},
                                label="fp32")
    fast = synthetic_generation(lognormal(5.0, 60, 2), {128: [300.0, 310.0, 305.0], 512: [1590.0, 1650.0, 1605.0]},
                                label="int4")
    noise = synthetic_generation(lognormal(10.0, 60, 3), {128: [401.0, 409.0, 404.0]}, label="same")
    comparison = compare([base, fast, noise])
    assert comparison.is_generation and comparison.prompt_lengths() == ["128", "512"]
    b, f, n = comparison.rows
    assert b.verdict == "baseline" and b.generation.ttft["128"].verdict == "baseline"
    assert f.verdict == "faster" and f.speedup == pytest.approx(2.0, rel=0.1) and f.ci_low > 1.0
    assert f.generation.ttft["128"].verdict == "faster" and f.generation.ttft["128"].ci_low > 1.0
    assert f.generation.ttft["512"].verdict == "within noise"  # the interval spans 1.0
    assert n.verdict == "within noise" and n.ci_low <= 1.0 <= n.ci_high and "512" not in n.generation.ttft
    assert f.generation.decode_tokens_per_s > b.generation.decode_tokens_per_s
    markdown = comparison.markdown()
    for column in ("decode tok/s", "decode speedup [95% CI]", "TTFT@128 ms", "TTFT@512 speedup", "peak RSS MB"):
        assert column in markdown
    assert "1x128+21" in markdown  # batch x decode prompt + new tokens (3 rounds of 20 decode steps)
    assert "within noise" in markdown
    # too few rounds for an interval: the ratio of medians, no verdict claimed
    two = compare([synthetic_generation(lognormal(10, 20, 4), {8: [10.0, 11.0]}),
                   synthetic_generation(lognormal(10, 20, 5), {8: [5.0, 5.5]})])
    assert MIN_TTFT_SAMPLES > 2 and two.rows[1].generation.ttft["8"].verdict == "within noise"
    assert two.rows[1].generation.ttft["8"].ci_low is None


def test_compare_generation_different_decode_shapes():
    base = synthetic_generation(lognormal(10, 40, 6), {128: [400.0, 410.0]}, new_tokens=21)
    other = synthetic_generation(lognormal(10, 20, 7), {128: [400.0, 410.0]}, new_tokens=11)
    row = compare([base, other]).rows[1]
    assert row.verdict == "different shapes" and row.speedup is None
    assert row.generation.ttft["128"].verdict == "within noise"  # TTFT still compares at the same prompt length


def test_mixed_kinds_are_refused(torch_profile):
    from edgesmith.profiling.schema import Profile as P

    encoder = P.model_validate(OLD_STYLE)
    with pytest.raises(BadInput, match="cannot compare generation profiles") as info:
        compare([torch_profile, encoder])
    assert "\n" not in str(info.value)


def test_real_profiles_compare(torch_profile, onnx_profile):
    comparison = compare([torch_profile, onnx_profile])
    row = comparison.rows[1]
    assert row.speedup is not None and row.ci_low is not None and row.ci_low <= row.speedup <= row.ci_high
    assert row.verdict in ("faster", "slower", "within noise")
    assert set(row.generation.ttft) == {str(n) for n in LENGTHS}


def test_slower_than_parent_flag():
    parent = synthetic_generation(lognormal(5.0, 60, 8), {128: [300.0, 305.0, 310.0]}, label="export")
    child = synthetic_generation(lognormal(10.0, 60, 9), {128: [600.0, 610.0, 620.0]}, label="int4")
    slower = generation_slowdowns(parent, child)
    assert len(slower) == 2 and slower[0].startswith("decode") and slower[1].startswith("TTFT at 128")
    assert generation_slowdowns(child, parent) == []

    from edgesmith.pipeline.profiles import slower_than_parent

    recipe = Recipe.from_dict({"steps": ["export", {"quantize": {"mode": "int4"}}]})
    targets = recipe.profile_targets()[1:]
    warnings = slower_than_parent(recipe, targets, [parent, child])
    assert len(warnings) == 1 and "int4 is slower than its parent export" in warnings[0]
    assert "compressed but not faster" in warnings[0]


# ---------------------------------------------------------------------------------------------
# recipes and the pipeline's profile step
# ---------------------------------------------------------------------------------------------


def test_recipe_profile_block():
    spec = ProfileSpec()
    assert spec.prompt_tokens == [128, 512] and spec.new_tokens == 128 and spec.rounds == 3
    assert (spec.batch, spec.seq, spec.warmup, spec.iterations) == (1, 128, 5, 50)  # encoder defaults kept
    recipe = Recipe.from_dict({"profile": {"prompt_tokens": [64], "new_tokens": 32}})
    assert recipe.profile.prompt_tokens == [64] and recipe.profile.new_tokens == 32
    with pytest.raises(BadInput, match="prompt_tokens"):
        Recipe.from_dict({"profile": {"prompt_tokens": [64, 64]}})
    with pytest.raises(BadInput, match="new_tokens"):
        Recipe.from_dict({"profile": {"new_tokens": 1}})


def test_pipeline_profiles_decoders_as_generation(lm, tmp_path):
    from rich.console import Console

    from edgesmith.pipeline.profiles import profile_all

    torch_model, onnx_model = lm
    recipe = Recipe.from_dict({"steps": ["export"], "profile": {"prompt_tokens": [6], "new_tokens": 3, "rounds": 1}})
    profiles, comparison = profile_all(recipe, {"source": torch_model, "export": onnx_model}, {"export": {"kld": 0.0}},
                                        tmp_path, Console(quiet=True))
    assert [p.kind for p in profiles] == ["generation", "generation"]
    assert [p.runtime.name for p in profiles] == ["torch", "onnxruntime"]
    assert profiles[1].quality == {"kld": 0.0} and comparison.is_generation
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_profile_decoder_and_compare(lm, tmp_path, capsys):
    folder = str(lm[1].folder)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--prompt-tokens", "8,24", "--new-tokens", "5", "--rounds", "2"]
    code, out, err = _cli(capsys, "profile", folder, *common, "--label", "one thread", "--threads", "1",
                          "-o", str(first))
    assert code == 0, err
    assert "TTFT @8 tokens" in out and "TTFT @24 tokens" in out and "tokens/s" in out and "peak RSS" in out
    prof = Profile.load(first)
    assert prof.is_generation and prof.label == "one thread" and prof.generation.prompt_tokens == [8, 24]
    code, out, err = _cli(capsys, "profile", folder, *common, "--runtime", "onnxruntime", "--label", "two threads",
                          "--threads", "2", "-o", str(second), "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "generation" and second.exists()
    code, out, err = _cli(capsys, "compare", str(first), str(second))
    assert code == 0, err
    assert "generation comparison" in out and "tok/s" in out and "TTFT@8" in out and "TTFT@24" in out
    code, out, err = _cli(capsys, "compare", str(first), str(second), "--json")
    rows = json.loads(out)["rows"]
    assert rows[0]["verdict"] == "baseline" and rows[1]["verdict"] in ("faster", "slower", "within noise")
    assert all(r["generation"]["decode_tokens_per_s"] > 0 for r in rows)
    assert rows[1]["ci_low"] <= rows[1]["speedup"] <= rows[1]["ci_high"]


def test_cli_bad_decoder_input_is_one_line_exit_2(lm, tmp_path, capsys):
    folder, out_file = str(lm[1].folder), tmp_path / "never.json"
    for args, message in (
        (["--prompt-tokens", "300", "--new-tokens", "4"], "longer than the model's context of 256"),
        (["--seq", "64"], "--seq applies to one-forward-pass profiles"),
        (["--runtime", "torch"], "use --runtime onnxruntime"),
    ):
        code, _, err = _cli(capsys, "profile", folder, *args, "-o", str(out_file))
        assert code == 2, err
        assert message in " ".join(err.split()) and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not out_file.exists()


def test_old_and_generation_profiles_mixed_in_cli_compare(torch_profile, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(OLD_STYLE))
    gen = torch_profile.save(tmp_path / "gen.json")
    code, _, err = _cli(capsys, "compare", str(old), str(gen))
    assert code == 2 and "cannot compare generation profiles" in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1



def test_runtimes_open_decoders_and_their_sessions_declare_their_options(lm):
    """One way to open a decoder: each runtime's load_decoder behind open_decoder; ONNX Runtime's
    load gives a decoder its decoder session; the options a session takes are its class's OPTIONS."""
    from edgesmith.runtimes.base import decoder_runtime_names, get_runtime
    from edgesmith.runtimes.generation import decoder_runtime, open_decoder
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession
    from edgesmith.runtimes.onnxruntime import OrtDecoderSession
    from edgesmith.runtimes.torch import TorchDecoderSession

    torch_model, onnx_model = lm
    assert set(decoder_runtime_names()) == {"llamacpp", "onnxruntime", "ortgenai", "torch"}
    assert decoder_runtime(onnx_model).name == "onnxruntime" and decoder_runtime(torch_model).name == "torch"
    assert get_runtime("onnxruntime").decoder_options() == OrtDecoderSession.OPTIONS
    assert get_runtime("llamacpp").decoder_options() == LlamaCppDecoderSession.OPTIONS and LlamaCppDecoderSession.MAX_BATCH == 256
    with get_runtime("onnxruntime").load(onnx_model, threads=1) as session:
        assert isinstance(session, OrtDecoderSession)
    artifact, session = open_decoder(onnx_model, threads=1, allow_spinning=True)
    with session:
        assert artifact is onnx_model and session.options["allow_spinning"] is True
    _, session = open_decoder(torch_model)
    with session:
        assert isinstance(session, TorchDecoderSession) and session.MAX_BATCH is None
    with pytest.raises(BadInput, match=r"torch decoder sessions take no option\(s\) dtype"):
        open_decoder(torch_model, dtype="fp16")
    with pytest.raises(BadInput, match="unknown runtime 'nope'"):
        open_decoder(onnx_model, "nope")
