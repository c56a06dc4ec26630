"""The decoder peers' benchmark plumbing (bench/llm_peers.py, llm_worker.py, llamacpp_env.py) with a
fake backend in a real worker process: protocol, rotation, raw samples, agreement, KL, rendering.
No model, no llama.cpp, no timing asserts."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.append(str(REPO))

from bench import llamacpp_env, llm_contenders, llm_peers, llm_profiles, llm_report, llm_worker

VOCAB = 50

FAKE = textwrap.dedent('''
    """A deterministic fake decoder: next token = (last + shift) % VOCAB; logits peak there."""
    import sys, time
    import numpy as np
    sys.path.insert(0, {bench!r})
    import llm_worker

    VOCAB = {vocab}

    class Fake:
        def __init__(self, shift, fail):
            self.shift, self.fail = shift, fail

        def info(self):
            return {{"runtime": "fake", "shift": self.shift}}

        def generate(self, ids, n, mode):
            if self.fail:
                raise RuntimeError("kernel exploded")
            stamps, out, last = [time.perf_counter()], [], ids[-1]
            for _ in range(n):
                last = (last + self.shift + (1 if mode == "other" else 0)) % VOCAB
                out.append(last)
                stamps.append(time.perf_counter())
            return out, stamps

        def logits(self, ids):
            z = np.zeros((len(ids), VOCAB), dtype=np.float32)
            z[np.arange(len(ids)), (np.asarray(ids) + self.shift) % VOCAB] = 5.0
            return z

    def _args(p):
        p.add_argument("--shift", type=int, default=1)
        p.add_argument("--fail", action="store_true")
        p.add_argument("--model", default="x")

    sys.exit(llm_worker.main(lambda a: Fake(a.shift, a.fail), sys.argv[1:], 0.0, _args))
''')


@pytest.fixture()
def setup(tmp_path):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE.format(bench=str(BENCH), vocab=VOCAB))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": {"128": list(range(10)), "512": list(range(20)),
                                               "heldout": [i % VOCAB for i in range(30)]}}))
    return script, prompts


def _spec(key, script, *args, worker=None, mode=None):
    return llm_peers.Spec(key, key, "fake", Path(sys.executable), str(script), list(args), worker=worker or key,
                          mode=mode, size_bytes=1000)


def test_measure_rotates_records_raw_samples_and_compares(setup, tmp_path):
    script, prompts = setup
    specs = [_spec("torch-fp32", script, "--shift", "1", worker="ref"),
             _spec("same-worker", script, "--shift", "1", worker="ref", mode="other"),
             _spec("good", script, "--shift", "1"),
             _spec("off", script, "--shift", "2"),
             _spec("broken", script, "--fail")]
    res = llm_peers.measure(specs, str(prompts), rounds=3, new_tokens=6, warmup_tokens=2, quality=True,
                            work=tmp_path / "work", timeout=120)
    assert res["broken"]["status"] == "failed" and "kernel exploded" in " ".join(res["broken"]["notes"])
    for key in ("torch-fp32", "same-worker", "good", "off"):
        r = res[key]
        assert r["status"] == "ok"
        assert [run["round"] for run in r["runs"]["128"]] == [0, 1, 2]
        assert all(len(run["tokens"]) == 6 and len(run["token_ms"]) == 5 for run in r["runs"]["512"])
        assert r["peak_rss_mb"] > 0 and r["info"]["runtime"] == "fake"
        assert all(run["cpu_s"] >= 0 and run["wall_s"] > 0 for run in r["runs"]["128"])
    assert res["same-worker"]["logits"] == res["torch-fp32"]["logits"]  # one process, one model
    llm_peers.summarize(res, str(prompts))
    assert res["good"]["agreement"]["128"] == {"identical_prefix": 6, "matches": 6, "of": 6}
    assert res["same-worker"]["agreement"]["128"]["identical_prefix"] == 0
    assert res["good"]["quality"]["kld"] == pytest.approx(0.0, abs=1e-9)
    assert res["good"]["quality"]["top1"] == 1.0
    assert res["off"]["quality"]["top1"] == 0.0 and res["off"]["quality"]["kld"] > 1.0
    s = res["good"]["summary"]["128"]
    assert s["rounds"] == 3 and s["deterministic"] and len(s["decode_vs_torch"]) == 3
    assert len(s["cpu_share"]) == 3 and 0 <= s["uncontended"]["runs"] <= 3
    low, high = s["ttft_ms"][1], s["ttft_ms"][2]
    assert low <= s["ttft_ms"][0] <= high

    doc = {"command": "cmd", "settings": {"threads": 2, "rounds": 3, "new_tokens": 6, "lengths": [128, 512],
                                          "warmup_tokens": 2},
           "machine": {"cpu_model": "cpu", "cores": 2}, "versions": {},
           "load_average": {"start": [0.1], "end": [0.2], "rounds": [0.1, 0.3]}, "contenders": res}
    md = llm_report.markdown(doc)
    assert "| good |" in md and "6/6 identical prefix" in md and "failed" in md and "kernel exploded" in md
    assert "cpu (ISA not recorded)" in md

    # every measured contender becomes a generation Profile that edgesmith's compare reads
    from edgesmith.profiling import Profile, compare

    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    doc["models"] = {"good": str(model)}
    paths = llm_profiles.write_profiles(doc, "fake", tmp_path / "profiles")
    assert sorted(p.stem for p in paths) == ["good", "off", "same-worker", "torch-fp32"]
    good = Profile.load(tmp_path / "profiles" / "fake" / "good.json")
    assert good.kind == "generation" and good.generation.rounds == 3 and good.generation.new_tokens == 6
    assert good.generation.ttft_ms["128"] == [r["ttft_ms"] for r in res["good"]["runs"]["128"]]
    assert good.artifact.hash != "unknown" and good.environment.threads == 2
    assert Profile.load(tmp_path / "profiles" / "fake" / "off.json").artifact.hash == "unknown"  # no model path
    table = compare([Profile.load(p) for p in sorted(paths)])
    assert len(table.rows) == 4


def test_a_worker_that_cannot_load_is_a_failed_row(setup, tmp_path):
    script, prompts = setup
    bad = llm_peers.Spec("nope", "nope", "fake", Path(sys.executable), str(tmp_path / "missing.py"), [], worker="nope")
    res = llm_peers.measure([bad], str(prompts), rounds=1, new_tokens=2, work=tmp_path / "w", timeout=60)
    assert res["nope"]["status"] == "failed" and "exited" in res["nope"]["notes"][0]


def test_timing_and_agreement_helpers():
    t = llm_worker.timing([5, 6, 7], [0.0, 0.1, 0.15, 0.25])
    assert t["ttft_ms"] == pytest.approx(100.0) and t["token_ms"] == pytest.approx([50.0, 100.0])
    assert t["decode_tps"] == pytest.approx(2 / 0.15)
    assert llm_peers.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == {"identical_prefix": 2, "matches": 3, "of": 4}
    m, lo, hi = llm_peers.median_ci([3.0, 1.0, 2.0])
    assert m == 2.0 and lo <= m <= hi
    assert llm_peers.median_ci([None, None]) is None


def test_contender_table_names_real_workers_and_venvs():
    for key, c in llm_contenders.TABLE.items():
        assert c.key == key and (BENCH / c.script).is_file(), key
        assert c.venv in llm_contenders.VENVS, key
    assert set(llm_peers.DEFAULT) <= set(llm_contenders.TABLE)
    # the one edgesmith decoder worker serves llm_backends' contenders too
    assert {c.script for c in llm_contenders.TABLE.values() if c.family == "edgesmith"} == {"llm_peer_edgesmith.py"}
    assert not (BENCH / "llm_backends.py").read_text().count("class OrtBackend")


def test_a_prebuilt_folder_is_a_contender_without_code(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    c = llm_contenders.folder_contender(f"mine=ortgenai:{folder}=edgesmith folder in ORT GenAI's loop")
    assert (c.key, c.script, c.family, c.label) == ("mine", "llm_peer_ortgenai.py", "onnxruntime-genai",
                                                    "edgesmith folder in ORT GenAI's loop")
    assert c.make(llm_contenders.Sources(tmp_path)) == folder.resolve()
    assert llm_contenders.folder_contender(f"plain={folder}").script == "llm_peer_edgesmith.py"
    for bad in ("nokey", f"torch-fp32={folder}", f"x=ortgenai:{tmp_path / 'absent'}"):
        with pytest.raises(SystemExit):
            llm_contenders.folder_contender(bad)
    with pytest.raises(SystemExit, match="unknown contender"):
        llm_contenders.check_keys(["torch-fp32", "nope"])


def test_a_contender_whose_artifact_cannot_be_made_is_a_failed_row(tmp_path):
    def fail(src):
        raise RuntimeError("builder exploded")

    extra = {"x": llm_contenders.Contender("x", "X", "fake", "llm_peer_torch.py", "edgesmith", fail),
             "y": llm_contenders.Contender("y", "Y", "fake", "llm_peer_torch.py", "edgesmith", lambda src: tmp_path)}
    specs, models = llm_peers.specs(["x", "y"], llm_contenders.Sources(tmp_path), threads=3, extra=extra)
    assert specs[0].error and "builder exploded" in specs[0].error and "x" not in models
    assert specs[1].error is None and specs[1].args == ["--model", str(tmp_path), "--threads", "3"]


def test_logit_quality_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(70, VOCAB)).astype(np.float32), rng.normal(size=(70, VOCAB)).astype(np.float32)
    ids = list(rng.integers(0, VOCAB, size=70))
    got = llm_peers.logit_quality(p, q, ids)
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    assert got["kld"] == pytest.approx(float((np.exp(lp) * (lp - lq)).sum(-1).mean()), rel=1e-5)
    assert got["ppl"] == pytest.approx(float(np.exp(-lq[np.arange(69), ids[1:]].mean())), rel=1e-5)


def test_llamacpp_build_leaves_out_amx_only_where_the_cpu_has_it():
    assert llamacpp_env.cmake_args({"avx2", "fma", "f16c"}) == "-DGGML_NATIVE=ON"
    args = llamacpp_env.cmake_args({"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"})
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AVX512_BF16=ON" not in args
