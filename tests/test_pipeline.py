"""The pipeline end to end on a tiny model: run folder, cache reuse, gates, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgesmith.errors import GateFailed
from edgesmith.pipeline import run
from edgesmith.recipe import Recipe


def _recipe(model_dir: Path, **overrides) -> dict:
    recipe = {
        "name": "tiny",
        "model": str(model_dir),
        "data": {"limit": 48},
        "steps": [{"prune": {"heads": 0.5, "ffn": 0.5}}, {"export": {}}, {"quantize": {"min_cosine": 0.5}}],
        "profile": {"batch": 2, "seq": 16, "warmup": 1, "iterations": 5, "time_budget_s": 5,
                    "artifacts": ["source", "export", "quantize"]},
    }
    recipe.update(overrides)
    return recipe


def test_run_writes_the_run_folder_and_reuses_the_cache(tiny_bert_dir, tmp_path, cache_dir):
    result = run(_recipe(tiny_bert_dir), runs_dir=tmp_path / "runs", progress=False)
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    assert [s["id"] for s in manifest["steps"]] == ["prune", "export", "quantize"]
    assert [s["cached"] for s in manifest["steps"]] == [False, False, False]
    for step in manifest["steps"]:
        folder = run_dir / "artifacts" / step["id"]
        assert json.loads((folder / "edgesmith.json").read_text())["content_hash"] == step["output_hash"]
    # lineage carries every pass with its config and output hash
    lineage = json.loads((run_dir / "artifacts" / "quantize" / "edgesmith.json").read_text())["lineage"]
    assert [e["pass"] for e in lineage] == ["prune", "export", "quantize"]
    assert lineage[1]["report"]["max_abs"] < 1e-3
    # metrics for every artifact against the source; the source against itself is perfect
    assert set(manifest["metrics"]) == {"source", "prune", "export", "quantize"}
    assert manifest["metrics"]["source"]["cosine"] == pytest.approx(1.0)
    assert manifest["metrics"]["prune"]["cosine"] < 1.0 - 1e-6  # pruning moved the embeddings
    assert manifest["metrics"]["export"]["cosine"] == pytest.approx(manifest["metrics"]["prune"]["cosine"], abs=1e-3)
    assert manifest["deployable"] is True
    assert len(manifest["profiles"]) == 3
    for entry in manifest["profiles"]:
        assert (run_dir / entry["file"]).exists()
    assert [r["verdict"] for r in manifest["comparison"]["rows"]][0] == "baseline"
    report = (run_dir / "report.md").read_text()
    assert "## Latency" in report and "| quantize |" in report
    assert (run_dir / "quality-vs-latency.png").stat().st_size > 1000
    assert manifest["environment"]["packages"]["torch"]

    again = run(_recipe(tiny_bert_dir), runs_dir=tmp_path / "runs", progress=False)
    second = json.loads((again.run_dir / "manifest.json").read_text())
    assert again.run_dir != run_dir
    assert [s["cached"] for s in second["steps"]] == [True, True, True]
    assert [s["output_hash"] for s in second["steps"]] == [s["output_hash"] for s in manifest["steps"]]


def test_changed_config_recomputes_only_from_the_change(tiny_bert_dir, tmp_path, cache_dir):
    run(_recipe(tiny_bert_dir, profile=None), runs_dir=tmp_path / "runs", progress=False)
    changed = _recipe(tiny_bert_dir, profile=None)
    changed["steps"][2] = {"quantize": {"per_channel": False, "min_cosine": 0.5}}
    result = run(changed, runs_dir=tmp_path / "runs", progress=False)
    assert [s["cached"] for s in result.manifest["steps"]] == [True, True, False]


def test_failed_gate_stops_the_run_and_marks_nothing_deployable(tiny_bert_dir, tmp_path, cache_dir):
    recipe = _recipe(tiny_bert_dir, gates={"cosine": 0.0})
    with pytest.raises(GateFailed) as err:
        run(recipe, runs_dir=tmp_path / "runs", progress=False)
    assert err.value.exit_code == 3
    assert "quality gate failed for 'quantize': cosine dropped" in str(err.value)
    run_dir = next((tmp_path / "runs").iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["deployable"] is False
    assert manifest["gates"]["failures"][0]["metric"] == "cosine"
    assert not (run_dir / "profiles").exists()  # the run stopped before profiling
    assert json.loads((run_dir / "state.json").read_text())["status"] == "gate-failed"
    assert "Deployable: **no**" in (run_dir / "report.md").read_text()


def test_sigkill_mid_step_then_rerun_finishes_with_the_same_outputs(tiny_bert_dir, tmp_path):
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, profile=None)))
    env = {**os.environ, "EDGESMITH_CACHE": str(tmp_path / "cache-killed")}
    runs = tmp_path / "runs-killed"
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith", "run", str(recipe_path), "--runs-dir", str(runs)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    killed_in = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = list(runs.glob("*/state.json"))
            if states:
                try:
                    state = json.loads(states[0].read_text())
                except (json.JSONDecodeError, FileNotFoundError):
                    state = {}
                if state.get("status") == "running" and state.get("step") == "export":
                    time.sleep(0.5)  # well inside the export (the exporter takes seconds)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_in = state
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert killed_in is not None, "the run finished or never reached the export step before it could be killed"
    steps_dir = tmp_path / "cache-killed" / "steps"
    finished = [p.name for p in steps_dir.iterdir() if (p / "edgesmith.json").exists()]
    assert len(finished) == 1  # only the prune step had finished
    assert killed_in["cache_key"] not in finished
    resumed = run(Recipe.load(recipe_path), runs_dir=runs, cache_dir=tmp_path / "cache-killed", progress=False)
    assert [s["cached"] for s in resumed.manifest["steps"]] == [True, False, False]
    assert not [p for p in steps_dir.iterdir() if p.name.startswith(".tmp-")]  # debris of the kill is gone
    clean = run(Recipe.load(recipe_path), runs_dir=tmp_path / "runs-clean", cache_dir=tmp_path / "cache-clean",
                progress=False)
    assert [s["output_hash"] for s in resumed.manifest["steps"]] == [s["output_hash"] for s in clean.manifest["steps"]]


def test_compressed_but_not_faster_is_flagged(tiny_bert_dir):
    """An artifact slower than its nearest profiled ancestor gets a warning (synthetic latencies)."""
    import edgesmith as es
    from edgesmith.pipeline.profiles import slower_than_parent

    measured = es.profile(es.load(str(tiny_bert_dir)), runtime="torch", batch=1, seq=8, warmup=0, iterations=5)
    fast = measured.model_copy(update={"label": "export (ort fp32)", "latencies_ms": [10.0, 10.2, 9.9, 10.1, 10.0] * 4})
    slow = measured.model_copy(update={"label": "quantize (ort int8)", "latencies_ms": [15.0, 15.3, 14.8, 15.1, 15.2] * 4})
    recipe = Recipe.from_dict({"steps": ["export", "quantize"], "profile": {"artifacts": ["export", "quantize"]}})
    warnings = slower_than_parent(recipe, recipe.profile_targets(), [fast, slow])
    assert len(warnings) == 1
    assert warnings[0].startswith("quantize (ort int8) is slower than its parent export (ort fp32): 0.6")
    assert slower_than_parent(recipe, recipe.profile_targets(), [slow, fast]) == []


def test_a_data_file_edited_in_place_changes_the_step_key(tmp_path):
    from edgesmith.pipeline import referenced_files_key

    data = tmp_path / "calib.txt"
    data.write_text("one sentence\n")
    first = referenced_files_key({"calibration": str(data), "method": "minmax", "nested": [{"x": "builtin:wordnet"}]})
    assert list(first) == [str(data)]
    data.write_text("another sentence\n")
    assert referenced_files_key({"calibration": str(data)}) != first
    assert referenced_files_key({"mode": "dynamic", "data": None}) == {}
