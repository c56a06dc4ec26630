"""Device targets (shipped YAML files, user folders, validation) and roofline estimates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.errors import BadInput
from edgesmith.profiling import compare
from edgesmith.profiling.roofline import estimate, graph_work
from edgesmith.targets import get_target, load_targets, ssh_destination

EDGESMITH = Path(sys.executable).with_name("edgesmith")
SHIPPED = {"cpu-local", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin", "x86-server", "h100"}


@pytest.fixture(autouse=True)
def no_user_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_shipped_targets():
    targets = load_targets()
    assert SHIPPED <= set(targets)
    pi = targets["raspberry-pi-5"]
    assert (pi.runtime, pi.provider, pi.threads) == ("onnxruntime", "cpu", 4)
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        jetson = targets[name]
        assert jetson.runtime == "tensorrt" and jetson.trtexec
        assert {(a.runtime, a.provider) for a in jetson.runtimes()} >= {
            ("tensorrt", "tensorrt"), ("onnxruntime", "cuda"), ("onnxruntime", "tensorrt")}
        assert "fp16" in jetson.precisions and "int8" in jetson.precisions
    assert targets["cpu-local"].is_local and targets["cpu-local"].peak is None
    for name in SHIPPED - {"cpu-local"}:
        peak = targets[name].peak
        assert peak is not None and peak.fp32_tflops > 0 and peak.memory_bandwidth_gbs > 0
        assert targets[name].shapes and targets[name].host is None  # the user says where it is
    # every shipped file cites where its figures come from
    for path in Path(load_targets.__module__.replace(".", "/")).glob("*.yaml"):
        assert "Source" in path.read_text() or path.stem == "cpu-local"


def test_user_folders_add_and_replace(tmp_path, monkeypatch):
    user = tmp_path / "config" / "edgesmith" / "targets"
    user.mkdir(parents=True)
    (user / "my-pi.yaml").write_text("name: my-pi\nruntime: onnxruntime\nprovider: cpu\nthreads: 4\nhost: pi5\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "my-pi.yaml").write_text("name: my-pi\nthreads: 2\nhost: pi@10.0.0.5:2222\n")
    assert load_targets()["my-pi"].threads == 4
    target = load_targets([extra])["my-pi"]
    assert target.threads == 2 and target.host == "pi@10.0.0.5:2222"
    assert get_target("my-pi", host="other", extra_dirs=[extra]).host == "other"


def test_bad_target_files_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text("name: x\nruntime: onnxruntime\nthreadz: 4\n")
    with pytest.raises(BadInput, match="threadz"):
        load_targets([bad])
    (bad / "x.yaml").write_text("name: x\nprovider: npu\n")
    with pytest.raises(BadInput, match="provider"):
        load_targets([bad])
    with pytest.raises(BadInput, match="does not exist"):
        load_targets([tmp_path / "missing"])
    with pytest.raises(BadInput, match="unknown target 'nope'"):
        get_target("nope")


def test_ssh_destinations():
    assert ssh_destination("jetson") == "jetson"
    assert ssh_destination("pi@raspberrypi.local") == "pi@raspberrypi.local"
    assert ssh_destination("pi@10.0.0.5:2222") == "ssh://pi@10.0.0.5:2222"
    assert ssh_destination("ssh://pi@h:22") == "ssh://pi@h:22"
    url = get_target("ssh://ubuntu@orin:2222")
    assert url.host == "ssh://ubuntu@orin:2222" and url.runtime == "onnxruntime" and url.peak is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_tokenizer):
    from test_remote import make_tiny_onnx

    return make_tiny_onnx(tmp_path_factory.mktemp("t") / "tiny", minilm_tokenizer)


def test_graph_work_counts_every_matrix_product(tiny):
    macs, weight_bytes = graph_work(tiny.path, 1, 128)
    hidden, ffn, layers, seq = 32, 64, 2, 128
    projections = layers * seq * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 2 * seq * seq * hidden  # QK^T and AV over all heads
    assert macs == projections + attention
    assert graph_work(tiny.path, 4, 128)[0] == 4 * macs
    assert 0.9 * tiny.path.stat().st_size < weight_bytes <= tiny.path.stat().st_size


def test_estimate_is_labelled_and_never_passed_off_as_measured(tiny):
    from edgesmith.profiling import profile

    pi = estimate(tiny, get_target("raspberry-pi-5"), batch=1, seq=128)
    assert pi.kind == "estimate" and pi.is_estimate and pi.estimate is not None
    e = pi.estimate
    assert e.compute_ms == pytest.approx(2 * e.macs / 153.6e9 * 1000)
    assert e.memory_ms == pytest.approx(e.weight_bytes / 17.1e9 * 1000)
    assert pi.stats.p50 == max(e.compute_ms, e.memory_ms) and e.bound in ("compute", "memory")
    assert pi.runtime.providers == ["roofline-estimate"]
    with pytest.raises(BadInput, match="no published peak"):
        estimate(tiny, get_target("cpu-local"))
    measured = profile(tiny, batch=1, seq=128, warmup=1, iterations=6, threads=1)
    comparison = compare([measured, pi])
    row = comparison.rows[1]
    assert row.kind == "estimate" and row.verdict == "estimate" and row.ci_low is None
    assert row.target == "raspberry-pi-5"
    assert "(estimate)" in comparison.markdown() and "roofline estimate" in comparison.markdown()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGESMITH), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_targets_and_estimate(tiny, tmp_path):
    listed = _cli("targets")
    assert listed.returncode == 0
    assert all(name in listed.stdout for name in SHIPPED)
    data = json.loads(_cli("targets", "--json").stdout)
    assert data["raspberry-pi-5"]["threads"] == 4
    out = tmp_path / "est.json"
    proc = _cli("profile", str(tiny.folder), "--target", "jetson-orin-nano", "--estimate", "--seq", "128", "-o", str(out))
    assert proc.returncode == 0 and "ESTIMATE" in proc.stdout
    assert json.loads(out.read_text())["kind"] == "estimate"
    refused = _cli("profile", str(tiny.folder), "--target", "cpu-local", "--estimate")
    assert refused.returncode == 2 and "no published peak" in refused.stderr
    missing_host = _cli("profile", str(tiny.folder), "--target", "raspberry-pi-5")
    assert missing_host.returncode == 2 and "--host" in missing_host.stderr
