"""Profiles: schema, statistics, compare, measuring tiny torch and ONNX models, and the plot."""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from edgesmith.artifacts import OnnxModel, TorchModel, default_model_path
from edgesmith.errors import BadInput
from edgesmith.profiling import (
    MIN_SAMPLES,
    PROFILE_SCHEMA_VERSION,
    ArtifactInfo,
    Comparison,
    Profile,
    RuntimeInfo,
    Shapes,
    Stats,
    bootstrap_speedup,
    build_feeds,
    compare,
    profile,
    summarize,
)
from edgesmith.profiling.environment import fingerprint
from edgesmith.reports.plots import Point, pareto_front, plot_quality_latency

SEQ = 16
BATCH = 2


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny BERT with the MiniLM tokenizer, and its ONNX export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=30522, attn_implementation="eager")
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def torch_model(tiny_bert, tokenizer):
    return TorchModel(module=tiny_bert, tokenizer=tokenizer, name="tiny-bert")


class _LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def onnx_model(tiny_bert, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-onnx")
    ids = torch.ones(BATCH, SEQ, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(_LastHidden(tiny_bert).eval(), (ids, ids), str(folder / "model.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      external_data=False)
    tokenizer.save_pretrained(folder)
    return OnnxModel(folder=folder, name="tiny-onnx")


# ---------------------------------------------------------------------------------------------
# synthetic profiles with known latencies
# ---------------------------------------------------------------------------------------------


def synthetic(latencies, *, label="p", batch=1, seq=128, quality=None, size_bytes=4_000_000) -> Profile:
    stats = summarize(latencies)
    return Profile(
        label=label,
        artifact=ArtifactInfo(name=label, kind="onnx", hash="0" * 64, size_bytes=size_bytes, task="feature-extraction"),
        runtime=RuntimeInfo(name="onnxruntime", providers=["CPUExecutionProvider"], options={"threads": 1}),
        environment=fingerprint(threads=1),
        shapes=Shapes(batch=batch, seq=seq),
        warmup=0,
        iterations=len(latencies),
        latencies_ms=[float(x) for x in latencies],
        stats=Stats(**stats),
        throughput=batch * 1000.0 / stats["p50"],
        peak_host_memory_mb=100.0,
        quality=quality or {},
        created="2026-11-29T00:00:00+00:00",
    )


def lognormal(median_ms: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean=np.log(median_ms), sigma=0.1, size=n)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_summarize_known_values():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats["p50"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 5.0 and stats["n"] == 5
    assert stats["mean"] == pytest.approx(3.0)
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    assert stats["p90"] == pytest.approx(4.6)
    with pytest.raises(BadInput):
        summarize([])


def test_bootstrap_same_distribution_is_within_noise():
    base, cand = lognormal(10.0, 200, seed=1), lognormal(10.0, 200, seed=2)
    speedup, low, high = bootstrap_speedup(base, cand)
    assert low <= 1.0 <= high
    assert low <= speedup <= high
    assert speedup == pytest.approx(np.median(base) / np.median(cand))


def test_bootstrap_twofold_shift():
    base, cand = lognormal(20.0, 200, seed=3), lognormal(10.0, 200, seed=4)
    speedup, low, high = bootstrap_speedup(base, cand, n_boot=2000, seed=0)
    assert speedup == pytest.approx(2.0, rel=0.05)
    assert 1.0 < low <= speedup <= high
    # the same seed gives the same interval
    assert bootstrap_speedup(base, cand, seed=0) == (speedup, low, high)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------


def test_profile_save_load_round_trip(tmp_path):
    prof = synthetic(lognormal(5.0, 30, seed=0), label="onnxruntime int8", quality={"cosine": 0.993})
    path = prof.save(tmp_path / "sub" / "profile.json")
    loaded = Profile.load(path)
    assert loaded == prof
    assert loaded.schema_version == PROFILE_SCHEMA_VERSION
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_corrupt_or_foreign_profile_is_bad_input(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1, "label": ')
    with pytest.raises(BadInput, match="not valid JSON"):
        Profile.load(broken)

    missing_fields = tmp_path / "missing.json"
    missing_fields.write_text(json.dumps({"schema_version": 1, "label": "x"}))
    with pytest.raises(BadInput, match="not a valid profile"):
        Profile.load(missing_fields)

    prof = synthetic([1.0, 2.0, 3.0])
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**prof.model_dump(mode="json"), "schema_version": PROFILE_SCHEMA_VERSION + 1}))
    with pytest.raises(BadInput, match="newer edgesmith"):
        Profile.load(newer)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(BadInput, match="not an edgesmith profile"):
        Profile.load(foreign)

    with pytest.raises(BadInput, match="not found"):
        Profile.load(tmp_path / "absent.json")


def test_environment_fingerprint():
    env = fingerprint(threads=3)
    assert env.cores == os.cpu_count()
    assert env.threads == 3
    assert env.python == platform.python_version()
    assert env.libraries["torch"] == torch.__version__
    assert {"transformers", "onnx", "onnxruntime", "edgesmith"} <= set(env.libraries)
    assert env.cpu_model
    assert (env.gpu is None) == (not torch.cuda.is_available())


def test_the_local_fingerprint_is_the_agents():
    """A local profile describes the machine with the device agent's own functions: the same CPU, ISA,
    OS and memory as ``agent.py fingerprint`` reports over SSH; the ISA is read from cpuinfo's flags."""
    from edgesmith.profiling import agent

    env, remote = fingerprint(threads=2).model_dump(), agent.fingerprint(2)
    for key in ("cpu_model", "isa_flags", "cores", "os", "kernel", "machine", "python", "memory_mb"):
        assert env[key] == remote[key], key
    assert env["host"] is None  # the machine's name only where it was asked for (over SSH)
    if platform.system() == "Linux":
        assert env["memory_mb"] > 0
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8\n"
    assert agent.isa_flags(x86) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert agent.isa_summary(agent.isa_flags(x86)) == "AVX-512 (VNNI) + AMX"
    arm = "Features\t: fp asimd asimddp i8mm sve\n"
    assert agent.isa_summary(agent.isa_flags(arm)) == "NEON (dot, i8mm, SVE)"
    assert agent.isa_flags("no flags here") == []


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def known_profiles():
    return [
        synthetic(lognormal(20.0, 100, seed=10), label="fp32", quality={"cosine": 1.0}, size_bytes=90_000_000),
        synthetic(lognormal(10.0, 100, seed=11), label="int8", quality={"cosine": 0.99}, size_bytes=23_000_000),
        synthetic(lognormal(20.0, 100, seed=12), label="fp32 again", quality={"cosine": 1.0}),
        synthetic(lognormal(40.0, 100, seed=13), label="slow", quality={"cosine": 0.95}),
        synthetic(lognormal(5.0, 100, seed=14), label="other shapes", batch=8),
    ]


def test_compare_verdicts(known_profiles):
    comparison = compare(known_profiles)
    rows = {r.label: r for r in comparison.rows}
    assert comparison.baseline == 0
    assert rows["fp32"].verdict == "baseline" and rows["fp32"].speedup == 1.0
    assert rows["int8"].verdict == "faster"
    assert rows["int8"].speedup == pytest.approx(2.0, rel=0.1)
    assert rows["int8"].ci_low > 1.0
    assert rows["fp32 again"].verdict == "within noise"
    assert rows["fp32 again"].ci_low <= 1.0 <= rows["fp32 again"].ci_high
    assert rows["slow"].verdict == "slower" and rows["slow"].ci_high < 1.0
    assert rows["other shapes"].verdict == "different shapes" and rows["other shapes"].speedup is None
    assert rows["int8"].size_mb == pytest.approx(23.0)
    assert rows["int8"].quality == {"cosine": 0.99}
    assert rows["int8"].provider == "CPUExecutionProvider"
    assert rows["int8"].shapes == Shapes(batch=1, seq=128)


def test_compare_baseline_by_label_and_errors(known_profiles, tmp_path):
    comparison = compare(known_profiles, baseline="int8")
    assert comparison.baseline == 1
    assert {r.label: r.verdict for r in comparison.rows}["fp32"] == "slower"
    # profiles may also be given as files
    paths = [p.save(tmp_path / f"{i}.json") for i, p in enumerate(known_profiles[:2])]
    assert [r.verdict for r in compare(paths).rows] == ["baseline", "faster"]
    with pytest.raises(BadInput, match="no profile is labelled"):
        compare(known_profiles, baseline="nope")
    with pytest.raises(BadInput, match="out of range"):
        compare(known_profiles, baseline=9)
    with pytest.raises(BadInput):
        compare([])


def test_too_few_samples_claim_nothing():
    rows = compare([synthetic([10.0, 10.5]), synthetic([5.0, 5.2])]).rows
    assert rows[1].verdict == "within noise" and rows[1].ci_low is None


def test_comparison_renderings(known_profiles):
    from rich.console import Console
    from rich.table import Table

    comparison = compare(known_profiles)
    data = json.loads(comparison.to_json())
    assert [r["label"] for r in data["rows"]] == [p.label for p in known_profiles]
    assert Comparison.model_validate(data) == comparison

    md = comparison.markdown().strip().splitlines()
    assert len(md) == 2 + len(known_profiles)
    assert "cosine" in md[0] and "verdict" in md[0]
    assert "| int8 |" in md[3] and "faster" in md[3]
    assert all(line.count("|") == md[0].count("|") for line in md)

    table = comparison.table()
    assert isinstance(table, Table) and table.row_count == len(known_profiles)
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "within noise" in text and "different shapes" in text


# ---------------------------------------------------------------------------------------------
# measuring real sessions
# ---------------------------------------------------------------------------------------------


def _assert_sane(prof: Profile, iterations: int) -> None:
    s = prof.stats
    assert s.n == iterations == len(prof.latencies_ms)
    assert 0 < s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    assert s.min <= s.mean <= s.max
    assert prof.shapes == Shapes(batch=BATCH, seq=SEQ)
    assert prof.throughput == pytest.approx(BATCH * 1000.0 / s.p50)
    assert prof.peak_host_memory_mb and prof.peak_host_memory_mb > 0
    assert prof.environment.cores == os.cpu_count()


def test_profile_torch_model(torch_model, tiny_bert):
    prof = profile(torch_model, batch=BATCH, seq=SEQ, warmup=2, iterations=12, threads=1)
    _assert_sane(prof, 12)
    assert prof.runtime.name == "torch"
    assert prof.runtime.providers == ["torch-cpu"]
    assert prof.environment.threads == 1
    assert prof.artifact.kind == "torch"
    assert prof.artifact.hash == torch_model.content_hash()
    expected = sum(t.numel() * t.element_size() for t in [*tiny_bert.parameters(), *tiny_bert.buffers()])
    assert prof.artifact.size_bytes == expected
    assert prof.label == "tiny-bert (torch)"


def test_profile_onnx_model(onnx_model, tmp_path):
    prof = profile(onnx_model, batch=BATCH, seq=SEQ, warmup=2, iterations=15, threads=1, label="ort fp32")
    _assert_sane(prof, 15)
    assert prof.runtime.name == "onnxruntime"
    assert prof.runtime.providers == ["CPUExecutionProvider"]
    assert prof.runtime.options["threads"] == 1
    assert prof.artifact.kind == "onnx"
    assert prof.artifact.size_bytes == (onnx_model.folder / "model.onnx").stat().st_size
    assert prof.label == "ort fp32"
    assert Profile.load(prof.save(tmp_path / "ort.json")) == prof


def test_time_budget_stops_early(onnx_model):
    prof = profile(onnx_model, batch=BATCH, seq=SEQ, warmup=0, iterations=100_000, time_budget_s=1e-6, threads=1)
    assert prof.stats.n == MIN_SAMPLES
    assert prof.iterations == 100_000 and prof.time_budget_s == 1e-6


def test_profile_refuses_bad_arguments(torch_model, onnx_model):
    with pytest.raises(BadInput, match="iterations"):
        profile(onnx_model, iterations=0)
    with pytest.raises(BadInput, match="batch and seq"):
        profile(onnx_model, seq=0)
    with pytest.raises(BadInput, match="time budget"):
        profile(onnx_model, time_budget_s=0)
    with pytest.raises(BadInput, match="cannot run a torch model"):
        profile(torch_model, runtime="onnxruntime")
    with pytest.raises(BadInput, match="unknown option"):
        profile(onnx_model, no_such_option=1)


def test_inputs_are_real_text_padded_to_seq(tokenizer):
    feeds = build_feeds(tokenizer, ["input_ids", "attention_mask"], batch=3, seq=SEQ, texts=["hello world"])
    assert len(feeds) == 1
    ids = feeds[0]["input_ids"]
    assert ids.shape == (3, SEQ) and ids.dtype == np.int64
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "hello world"
    assert feeds[0]["attention_mask"][0].sum() == len(tokenizer("hello world")["input_ids"])
    corpus_feeds = build_feeds(tokenizer, ["input_ids"], batch=2, seq=SEQ)
    assert len(corpus_feeds) > 1 and all(f["input_ids"].shape == (2, SEQ) for f in corpus_feeds)
    assert not np.array_equal(corpus_feeds[0]["input_ids"], corpus_feeds[1]["input_ids"])


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------


def test_pareto_front():
    pts = [Point("a", 10, 0.9), Point("b", 5, 0.95), Point("c", 20, 1.0), Point("d", 12, 0.8)]
    assert [p.label for p in pareto_front(pts)] == ["b", "c"]


def test_plot_quality_latency(known_profiles, tmp_path):
    from PIL import Image

    path = plot_quality_latency(compare(known_profiles), tmp_path / "plot.png", size=(640, 480))
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 480)
    # a list of profiles works as well
    other = plot_quality_latency(known_profiles[:2], tmp_path / "two.png", size=(500, 300), dpi=50)
    with Image.open(other) as img:
        assert img.size == (500, 300)
    with pytest.raises(BadInput, match="perplexity"):
        plot_quality_latency(known_profiles, tmp_path / "none.png", metric="perplexity")
    assert not (tmp_path / "none.png").exists()
