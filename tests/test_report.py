"""The HTML report: self-contained, with table, Pareto plot, distributions and lineage, rendered by a
real headless Chromium (Debian's `chromium`; skipped with that reason where it is absent)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.profiling import profile
from edgesmith.profiling.roofline import estimate
from edgesmith.reports.html import write_html
from edgesmith.targets import get_target

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EDGESMITH = Path(sys.executable).with_name("edgesmith")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, minilm_tokenizer) -> Path:
    """A run folder in the layout `edgesmith run` writes: manifest.json (source, steps with their output
    hashes, metrics) and profiles/*.json measured here on two real tiny ONNX models."""
    from test_remote import make_tiny_onnx

    root = tmp_path_factory.mktemp("run") / "demo-20261129-120000"
    big = make_tiny_onnx(root / "artifacts" / "export", minilm_tokenizer, seed=0, intermediate=64)
    small = make_tiny_onnx(root / "artifacts" / "shrink", minilm_tokenizer, seed=1, intermediate=16)
    profiles = []
    for art, label, cosine in ((big, "export onnxruntime fp32", 1.0), (small, "shrink onnxruntime fp32", 0.97)):
        prof = profile(art, batch=1, seq=32, warmup=2, iterations=15, threads=1, label=label, per_op=True, per_op_runs=3)
        prof.quality = {"cosine": cosine}
        prof.save(root / "profiles" / f"{label.replace(' ', '_')}.json")
        profiles.append(prof)
    manifest = {
        "schema": 1, "created": "2026-11-29T12:00:00+00:00", "deployable": True, "final_artifact": "shrink",
        "source": {"model": "tiny-bert", "kind": "torch", "name": "tiny-bert", "content_hash": "ab" * 32,
                   "task": "feature-extraction"},
        "steps": [
            {"id": "export", "pass": "export", "config": {"attention": "eager"}, "cached": False, "seconds": 1.2,
             "input_hash": "ab" * 32, "output_hash": big.content_hash(), "kind": "onnx"},
            {"id": "shrink", "pass": "prune", "config": {"ffn_ratio": 0.75}, "cached": True, "seconds": 0.1,
             "input_hash": big.content_hash(), "output_hash": small.content_hash(), "kind": "onnx"},
        ],
        "metrics": {"source": {"cosine": 1.0}, "export": {"cosine": 1.0}, "shrink": {"cosine": 0.97}},
        "profiles": [{"artifact": "export", "file": "profiles/export_onnxruntime_fp32.json"},
                     {"artifact": "shrink", "file": "profiles/shrink_onnxruntime_fp32.json"}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    est = estimate(small, get_target("raspberry-pi-5"), batch=1, seq=32, label="shrink on pi5")
    est.quality = {"cosine": 0.97}
    est.save(root.parent / "estimate.json")
    return root


def test_report_is_self_contained_and_complete(run_folder, tmp_path):
    page = write_html([run_folder, run_folder.parent / "estimate.json"], tmp_path / "report.html")
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text) and "<script" not in text
    assert text.count("<svg") == 2 and 'id="pareto"' in text and 'id="distribution"' in text
    assert "export onnxruntime fp32" in text and "shrink onnxruntime fp32" in text
    assert "target: cpu-local" in text and "target: raspberry-pi-5" in text  # grouped by target
    assert "shrink on pi5 (estimate)" in text and "roofline estimate" in text
    assert "Per-op deltas" in text and "MatMul" in text
    assert "prune" in text and "ffn_ratio" in text  # lineage from the manifest
    assert "Lineage" in text and "deployable" in text


def test_report_cli_from_profile_files(run_folder, tmp_path):
    files = sorted((run_folder / "profiles").glob("*.json"))
    out = tmp_path / "r.html"
    proc = subprocess.run([str(EDGESMITH), "report", *map(str, files), "--html", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "lineage is recorded in run folders" in out.read_text()
    bad = subprocess.run([str(EDGESMITH), "report", str(tmp_path), "--html", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "manifest.json" in bad.stderr


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium: apt-get install -y chromium")
def test_report_renders_in_headless_chromium(run_folder, tmp_path):
    from PIL import Image

    page = write_html([run_folder, run_folder.parent / "estimate.json"], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile_dir = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile_dir}", f"--screenshot={shot}", "--window-size=1280,2400",
         page.as_uri()], capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.exists(), proc.stderr[-500:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    small = image.resize((320, 600))
    pixels = list(small.getdata())
    non_white = sum(1 for p in pixels if sum(p) < 720)
    assert non_white / len(pixels) > 0.02  # text, table borders and plots, not a blank page
    assert len(set(pixels)) > 50  # coloured plot marks and anti-aliased text
    # the plots drew: blue Pareto points/lines exist somewhere on the page
    assert any(b > 150 and r < 100 and g < 160 for r, g, b in pixels)


# ---------------------------------------------------------------------------------------------
# The comparison at 80 columns (edgesmith run recipes/smollm2-gguf.yaml in a new user's terminal)
# ---------------------------------------------------------------------------------------------


def _generation(label: str, runtime: str, provider: str, decode_ms: float, ttft: dict[int, float], seed: int):
    import numpy as np

    from edgesmith.profiling.generation import generation_profile
    from edgesmith.profiling.schema import ArtifactInfo, RuntimeInfo

    rng = np.random.default_rng(seed)
    return generation_profile(
        label=label, artifact=ArtifactInfo(name=label, kind="gguf", hash="0" * 64, size_bytes=98_000_000,
                                           task="text-generation"),
        runtime=RuntimeInfo(name=runtime, providers=[provider]), threads=2, batch=1, new_tokens=64, warmup=1,
        ttft_ms={n: list(ms * rng.lognormal(0, 0.02, 3)) for n, ms in ttft.items()},
        decode_ms=[list(decode_ms * rng.lognormal(0, 0.05, 63)) for _ in range(3)], load_s=0.2,
        peak_rss_mb=180.0, rss_source="test").model_copy(
            update={"quality": {"kld": 0.0123, "top1": 0.9512, "perplexity": 17.25}})


def test_a_decoder_comparison_reads_at_80_columns_and_report_md_keeps_every_column():
    from rich.console import Console

    from edgesmith.profiling import compare

    comparison = compare([
        _generation("smollm2-source (llamacpp)", "llamacpp", "llama.cpp-cpu", 9.0, {128: 480.0, 512: 2100.0}, 1),
        _generation("smollm2-gguf-q4_1-pruned (llamacpp)", "llamacpp", "llama.cpp-cpu", 7.5,
                    {128: 400.0, 512: 1800.0}, 2),
        _generation("smollm2 (torch)", "torch", "torch-cpu", 70.0, {128: 380.0, 512: 1500.0}, 3)])
    wide = comparison.table("generation comparison")
    assert len(wide.columns) >= 14  # the grid a wide terminal gets (and what the 80-column one could not show)
    for width in (80, 100):
        console = Console(record=True, width=width)
        console.print(comparison.table("generation comparison", width=width))
        text = console.export_text()
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= width
        for needle in ("smollm2-gguf-q4_1-pruned", "decode tok/s", "TTFT@512 ms", "slower", "faster",
                       "peak RSS MB", "kld"):
            assert needle in text
    console = Console(record=True, width=250)
    console.print(comparison.table("generation comparison", width=250))  # room: the grid as before
    text = console.export_text()
    assert "…" not in text and "TTFT@128" in text and "speedup" in text, text
    markdown = comparison.markdown().splitlines()
    for column in ("label", "target", "artifact", "runtime", "provider", "shapes", "decode tok/s", "ms/token p50",
                   "decode speedup [95% CI]", "verdict", "TTFT@128 ms", "TTFT@128 speedup", "TTFT@512 ms",
                   "TTFT@512 speedup", "kld", "top1", "perplexity", "peak RSS MB", "size MB"):
        assert f" {column} |" in markdown[0]
    assert markdown[0].count("|") == 20 and all(line.count("|") == 20 for line in markdown[:5])


def test_an_encoder_comparison_reads_at_80_columns():
    from rich.console import Console

    from edgesmith.profiling import compare
    from edgesmith.profiling.schema import Shapes

    profiles = []
    for i, (label, ms) in enumerate((("minilm fp32 (onnxruntime)", 20.0), ("minilm int8 pruned 30 % (onnxruntime)", 9.0),
                                     ("minilm fp16 (onnxruntime)", 15.0))):
        prof = _generation(label, "onnxruntime", "CPUExecutionProvider", ms, {8: ms}, i)
        profiles.append(prof.model_copy(update={"kind": "measured", "generation": None, "shapes": Shapes(batch=8, seq=128),
                                                "quality": {"cosine": 0.999, "cosine_min": 0.98, "spearman": 0.97,
                                                            "top1": 0.99}}))
    comparison = compare(profiles)
    console = Console(record=True, width=80)
    console.print(comparison.table(width=80))
    text = console.export_text()
    assert "…" not in text and "minilm int8 pruned 30 %" in text and "cosine" in text
