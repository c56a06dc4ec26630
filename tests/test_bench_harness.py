"""The benchmark harness (bench/harness.py) on a tiny model in quick mode: it checks the harness
(rows, "not built yet" rows, profiles, BENCHMARKS.md rendering), never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.append(str(REPO))

from bench.core import encoder_runs, machine, results
from bench.core.rounds import Timed, paired_speedup, rotation, run_rounds
from edgesmith.errors import BadInput

RESULT_FILES = {
    "zeta_extra.md": "# Something else\n\nCommand: `python bench/zeta.py`\n\n| a |\n|---|\n| 1 |\n",
    "distill.md": "# Distilling MiniLM-L6\n\nCommand: `.venv/bin/python bench/distill_minilm.py`\n\n| d |\n|---|\n| 2 |\n",
    "prune.md": "## Pruning\n\nno command here\n",
}


def _harness(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "harness.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("bench")
    results = root / "results"
    results.mkdir()
    for name, text in RESULT_FILES.items():
        (results / name).write_text(text)
    env = {**os.environ, "EDGESMITH_BENCH_OPTIMUM_VENV": str(root / "optimum-venv-must-not-exist"),
           "EDGESMITH_CACHE": str(root / "cache")}
    args = ["--quick", "--model", str(tiny_bert_dir), "--threads", "1", "--prune-heads", "0.5", "--prune-ffn", "0.5",
            "--work", str(root / "work"), "--profiles-dir", str(root / "profiles"), "--out", str(root / "BENCHMARKS.md"),
            "--results-dir", str(results)]
    done = _harness(args, env)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((root / "profiles" / "summary.json").read_text())
    return {"root": root, "args": args, "env": env, "summary": summary, "stdout": done.stdout}


def test_rows_present_with_statuses(quick_run):
    from edgesmith.passes import available_passes

    rows = {r["key"]: r for r in quick_run["summary"]["rows"]}
    assert list(rows)[:2] == ["torch-fp32", "optimum"]
    for key in ("es-fp32", "es-int8-dynamic", "es-int8-static-aa", "es-pruned-distilled-int8", "es-early-exit-int8"):
        assert key in rows
    # quick mode skips Optimum, labelled as such, and never creates its venv
    assert rows["optimum"]["status"] == "skipped" and "--quick" in rows["optimum"]["note"]
    assert not (quick_run["root"] / "optimum-venv-must-not-exist").exists()
    assert quick_run["summary"]["machine"]["optimum_venv"] is None
    assert quick_run["summary"]["interop"]["status"] == "skipped"
    # rows for passes that do not exist say so; rows whose passes exist are measured
    passes = available_passes()
    early = rows["es-early-exit-int8"]
    assert (early["status"] == "not built yet") == ("early-exit" not in passes)
    for key in ("torch-fp32", "es-fp32", "es-int8-dynamic"):
        row = rows[key]
        assert row["status"] == "ok", row
        assert set(row["latency"]) == {"1", "2"}
        assert row["latency"]["1"]["n"] == 2 * 2  # rounds × block
        assert 0.9 <= row["quality"]["cosine"] <= 1.0 + 1e-6
        assert row["size_mb"] > 0
    assert quick_run["summary"]["settings"]["rounds_run"] == {"1": 2, "2": 2}
    assert rows["torch-fp32"]["latency"]["1"]["vs_torch"][0] == pytest.approx(1.0)
    assert rows["es-fp32"]["produce_seconds"] > 0
    # the INT8 artifact is smaller on disk than the FP32 export
    assert rows["es-int8-dynamic"]["size_mb"] < rows["es-fp32"]["size_mb"]


def test_profiles_follow_the_schema(quick_run):
    from edgesmith.profiling import Profile

    files = sorted((quick_run["root"] / "profiles").glob("b*s16-*.json"))
    measured = [r for r in quick_run["summary"]["rows"] if r["latency"]]
    assert len(files) == 2 * len(measured)
    prof = Profile.load(quick_run["root"] / "profiles" / "b2s16-es-fp32.json")
    assert prof.shapes.batch == 2 and prof.shapes.seq == 16
    assert prof.runtime.name == "onnxruntime" and prof.runtime.providers[0] == "CPUExecutionProvider"
    assert len(prof.latencies_ms) == 4 and prof.quality["cosine"] > 0.9
    assert prof.environment.threads == 1


def test_benchmarks_md_rendering(quick_run):
    text = (quick_run["root"] / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks")
    assert "Quick mode" in text and "--quick" in text
    assert "### Batch 1 × 16 tokens" in text and "### Batch 2 × 16 tokens" in text
    for row in quick_run["summary"]["rows"]:
        assert row["label"] in text
    early = next(r for r in quick_run["summary"]["rows"] if r["key"] == "es-early-exit-int8")
    if early["status"] == "not built yet":
        assert "| edgesmith early exit + INT8 | not built yet |" in text
    # other benchmarks' results follow in the fixed order, headings demoted, with where they came from
    prune, distill, zeta = (text.index(s) for s in ("### Pruning", "## Distilling MiniLM-L6", "## Something else"))
    assert text.index("## edgesmith vs PyTorch") < prune < distill < zeta
    assert "records no command" in text[prune:distill]
    assert "Command: `.venv/bin/python bench/distill_minilm.py`" in text
    # the goal line is printed, and says Optimum was not measured
    assert "Goal (batch 1, seq 16)" in text and "vs Optimum's best: not measured" in text


def test_render_only_rebuilds_from_the_summary(quick_run):
    out = quick_run["root"] / "BENCHMARKS.md"
    before = out.read_text()
    out.unlink()
    done = _harness([*quick_run["args"], "--render-only"], quick_run["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text() == before


def test_rotation_and_rounds():
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 4) == ["b", "c", "a"]
    calls: list[str] = []

    def runner(name: str):
        return lambda i: calls.append(name)

    timed = run_rounds({n: runner(n) for n in ("a", "b", "c")}, rounds=3, block=2, warmup=1)
    # each block is warm-up + 2 timed runs; each round starts with the next contender
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert calls[9:12] == ["b"] * 3 and calls[18:21] == ["c"] * 3
    assert all(len(t.rounds) == 3 and len(t.all) == 6 for t in timed.values())
    # a spent time budget stops after min_rounds complete rounds, the same for every contender
    cut = run_rounds({n: runner(n) for n in ("a", "b")}, rounds=50, block=1, warmup=0, time_budget_s=1e-9,
                     min_rounds=3)
    assert [len(t.rounds) for t in cut.values()] == [3, 3]


def test_paired_speedup_is_round_by_round():
    # the machine slows down 4x in round 2: both sides of that round's ratio slow alike
    base = Timed("base", [[10.0, 10.0], [40.0, 40.0], [10.0, 12.0]])
    cand = Timed("cand", [[5.0, 5.0], [20.0, 20.0], [5.0, 6.0]])
    speedup, low, high = paired_speedup(base, cand)
    assert speedup == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    with pytest.raises(BadInput):
        paired_speedup(base, Timed("short", [[1.0]]))


def test_machine_record_names_cpu_isa_and_load():
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile\n"
    flags = machine.isa_flags(x86)
    assert flags == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"]
    assert machine.isa_summary(flags) == "AVX-512 (VNNI) + AMX"
    assert machine.isa_summary(machine.isa_flags("Features\t: fp asimd asimddp\n")) == "NEON (dot)"
    assert machine.isa_summary(["sse4_2", "avx", "avx2"]) == "AVX2"
    rec = machine.record(threads=2)
    assert rec["cpu_model"] and rec["threads"] == 2 and rec["load_average"]["end"] is None
    machine.finish(rec)
    text = machine.line(rec)
    assert rec["cpu_model"] in text and rec["isa"] in text and "threads 2" in text and "at the end" in text
    assert "ISA not recorded" in machine.line({"cpu_model": "Old CPU", "cores": 2})


def test_results_writer_is_atomic_and_renders_again(tmp_path):
    doc = {"command": "x", "rows": [1, 2]}
    json_path, md_path = results.write("demo", doc, lambda d: f"# Demo\n\n{len(d['rows'])} rows", results_dir=tmp_path)
    assert json_path == tmp_path / "demo.json" and md_path.read_text() == "# Demo\n\n2 rows\n"
    assert results.read("demo", tmp_path) == doc
    md_path.unlink()
    results.render_only(tmp_path / "demo.md", lambda d: f"{d['command']} again")
    assert md_path.read_text() == "x again\n"
    assert not list(tmp_path.glob(".*.tmp"))
    # a render that fails leaves the earlier file whole
    with pytest.raises(ZeroDivisionError):
        results.write("demo", doc, lambda d: str(1 / 0), results_dir=tmp_path)
    assert md_path.read_text() == "x again\n" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit, match="run the benchmark first"):
        results.read("missing", tmp_path)


def test_an_encoder_worker_that_cannot_load_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="BadInput|not found|does not exist|No such"):
        encoder_runs.start("missing", tmp_path / "no-model-here", "onnxruntime", 1, tmp_path / "logs", timeout=300)
    assert (tmp_path / "logs" / "missing.log").exists()
