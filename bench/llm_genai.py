"""ONNX decoders where ONNX users run them (issue 24): edgesmith's ORT GenAI folders in ORT GenAI's own
loop, against llama.cpp's 4-bit files, ORT GenAI's builder INT4, edgesmith's loop and PyTorch.

Every contender is an ``edgesmith profile`` (``es.profile``): a generation profile measured in a
worker process of its own with the runtime's native threading (``--threads`` intra-op threads),
so the numbers are what a user of that runtime gets. Contenders run in rotating rounds, one round
per process; the ratios are paired by round (``edgesmith.stats.paired_speedup``).

Artifacts (made once into ``bench/.cache/genai``; each command is what a user runs):

- ``es-q41``: ``edgesmith export smollm2 --to genai`` then ``quantize --mode int4 --method gguf``:
  the shipped Q4_1 blocks repacked exactly, q/k/v and gate/up packed (``onnx_graph/pack.py``);
- ``es-gptq``: the same from ``bench/.cache/gguf-quant/gptq-q4_0.gguf`` (``edgesmith quantize smollm2
  --to gguf --format q4_0 --method gptq``, issue 23), so the ONNX graph and the llama.cpp file hold
  the same Q4_0 blocks; ``es-gptq-unpacked`` the same without packing (``pack: false``);
- ``es-gptq-head4``: the GPTQ repack with the LM head left float (``--no-lm-head``), then that head
  alone to symmetric 4-bit RTN (``quantize --mode int4 --method rtn --symmetric``: the only float
  MatMul left), as ORT GenAI's builder quantizes its head;
- ``builder-int4``: ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` with its defaults;
- llama.cpp: the shipped Q4_1, llama.cpp's own Q4_0 (``export --to gguf --quant q4_0``), the GPTQ Q4_0.

KL and top-1 are against the FP32 source (the dequantized shipped Q4_1) on the held-out passages,
through each artifact's own runtime (``edgesmith evaluate --runtime``). Batched generation:
``es.profile(batch=[1, 2, 4, 8])`` (static batches of mixed-length prompts). Where the time goes:
ONNX Runtime's profiler over the decode steps of each graph, by op type.

    nice -n 5 .venv/bin/python bench/llm_genai.py --rounds 5
    .venv/bin/python bench/llm_genai.py --render-only
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.core import machine, results
from bench.core.cli import add_output_args, add_timing_args
from bench.core.rounds import median_ci, rotation

log = logging.getLogger("bench.llm_genai")
CACHE = REPO / "bench" / ".cache" / "genai"
GPTQ_GGUF = REPO / "bench" / ".cache" / "gguf-quant" / "gptq-q4_0.gguf"
PROFILES = REPO / "profiles" / "bench-llm" / "llm_genai"
STEM = "llm_genai"
#: (key, label, runtime, artifact key)
CONTENDERS = [
    ("llamacpp-q4_1", "llama.cpp, shipped Q4_1", "llamacpp", "gguf-q4_1"),
    ("llamacpp-q4_0", "llama.cpp, its own Q4_0", "llamacpp", "gguf-q4_0"),
    ("llamacpp-gptq", "llama.cpp, edgesmith GPTQ Q4_0", "llamacpp", "gguf-gptq"),
    ("genai-builder", "ORT GenAI, builder INT4", "ortgenai", "builder-int4"),
    ("genai-q41", "ORT GenAI, edgesmith Q4_1 repack", "ortgenai", "es-q41"),
    ("genai-gptq", "ORT GenAI, edgesmith GPTQ Q4_0 repack", "ortgenai", "es-gptq"),
    ("genai-gptq-unpacked", "ORT GenAI, GPTQ Q4_0, q/k/v unpacked", "ortgenai", "es-gptq-unpacked"),
    ("genai-gptq-head4", "ORT GenAI, GPTQ Q4_0 repack + 4-bit head", "ortgenai", "es-gptq-head4"),
    ("es-loop-gptq", "edgesmith loop (ORT), GPTQ Q4_0 repack", "onnxruntime", "es-gptq"),
    ("torch-fp32", "PyTorch FP32", "torch", "fp32"),
]
BATCHED = ["llamacpp-gptq", "genai-gptq", "es-loop-gptq", "torch-fp32"]
BASELINE = "llamacpp-q4_0"
GRAPHS = ["builder-int4", "es-q41", "es-gptq", "es-gptq-unpacked", "es-gptq-head4"]


def _edgesmith(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgesmith", *args, "--cache-dir", str(CACHE / "steps"), "--runs-dir", str(CACHE / "runs")]
    log.info("running %s", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_artifacts() -> dict[str, Path]:
    """Every artifact, made once (the commands a user runs), by key."""
    from edgesmith.gguf.source import gguf_to_folder, smollm2_gguf_path

    CACHE.mkdir(parents=True, exist_ok=True)
    shipped = smollm2_gguf_path()
    paths = {"gguf-q4_1": shipped, "fp32": gguf_to_folder(shipped), "gguf-gptq": GPTQ_GGUF}
    steps = [("genai-fp32", ["export", "smollm2", "--to", "genai"]),
             ("es-q41", ["quantize", str(CACHE / "genai-fp32"), "--mode", "int4", "--method", "gguf"]),
             ("gguf-q4_0", ["export", "smollm2", "--to", "gguf", "--quant", "q4_0"])]
    if not GPTQ_GGUF.exists():
        steps.insert(0, ("gptq", ["quantize", "smollm2", "--to", "gguf", "--format", "q4_0", "--method", "gptq"]))
    steps += [("genai-gptq-fp32", ["export", str(GPTQ_GGUF), "--to", "genai"]),
              ("es-gptq", ["quantize", str(CACHE / "genai-gptq-fp32"), "--mode", "int4", "--method", "gguf"]),
              ("es-gptq-h8", ["quantize", str(CACHE / "genai-gptq-fp32"), "--mode", "int4", "--method", "gguf",
                              "--no-lm-head"]),
              ("es-gptq-head4", ["quantize", str(CACHE / "es-gptq-h8"), "--mode", "int4", "--method", "rtn",
                                 "--symmetric"])]
    for key, args in steps:
        out = GPTQ_GGUF.parent if key == "gptq" else CACHE / key
        if key == "gptq" or not out.exists():
            _edgesmith(*args, "-o", str(out))
    paths["gguf-q4_0"] = next((CACHE / "gguf-q4_0").glob("*.gguf"))
    paths.update({key: CACHE / key for key in ("es-q41", "es-gptq", "es-gptq-head4")})
    paths["es-gptq-unpacked"] = _unpacked(CACHE / "genai-gptq-fp32", CACHE / "es-gptq-unpacked")
    paths["builder-int4"] = _builder(paths["fp32"], CACHE / "builder-int4")
    return paths


def _unpacked(parent: Path, out: Path) -> Path:
    if not out.exists():
        import edgesmith as es

        es.compress.quantize(es.load(parent), mode="int4", method="gguf", pack=False).save(out)
    return out


def _builder(fp32: Path, out: Path) -> Path:
    if not (out / "genai_config.json").exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(fp32), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(CACHE / "builder-cache")]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def _load(runtime: str, path: Path):
    from edgesmith.runtimes.base import get_runtime

    return get_runtime(runtime).load_artifact(path)


def _numbers(profile) -> dict[str, Any]:
    gen = profile.model_dump()["generation"]
    return {"decode_tokens_per_s": statistics.median(gen["decode_tokens_per_s"]),
            "ttft_ms": {n: statistics.median(v) for n, v in gen["ttft_ms"].items()},
            "peak_rss_mb": gen.get("peak_rss_mb"), "load_s": gen.get("load_s")}


def measure_speed(paths: dict[str, Path], args) -> dict[str, list[dict[str, Any]]]:
    """Rotating rounds: each contender profiled once per round, in a fresh worker process."""
    import edgesmith as es

    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    keys = [c[0] for c in CONTENDERS]
    spec = {c[0]: c for c in CONTENDERS}
    PROFILES.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        for key in rotation(keys, r):
            _, label, runtime, art = spec[key]
            profile = es.profile(_load(runtime, paths[art]), runtime, prompt_tokens=[128, 512],
                                 new_tokens=args.new_tokens, rounds=1, warmup=1, threads=args.threads, label=label)
            rows[key].append(_numbers(profile))
            profile.save(PROFILES / f"{key}.json")
            log.info("round %d %s: %.1f tokens/s, TTFT@128 %.0f ms", r, key, rows[key][-1]["decode_tokens_per_s"],
                     rows[key][-1]["ttft_ms"]["128"])
    return dict(rows)


def measure_batched(paths: dict[str, Path], args) -> dict[str, list[dict[str, Any]]]:
    import edgesmith as es

    spec = {c[0]: c for c in CONTENDERS}
    out = {}
    for key in BATCHED:
        _, label, runtime, art = spec[key]
        profiles = es.profile(_load(runtime, paths[art]), runtime, batch=[1, 2, 4, 8], prompt_tokens=[128],
                              new_tokens=args.batched_tokens, rounds=args.batched_rounds, warmup=1,
                              threads=args.threads, label=label)
        out[key] = []
        for p in profiles:
            gen = p.model_dump()["generation"]
            out[key].append({"batch": gen["batch"], "decode_tokens_per_s": statistics.median(gen["decode_tokens_per_s"]),
                             "ttft_ms": statistics.median(next(iter(gen["ttft_ms"].values()))),
                             "ms_per_token": statistics.median(p.latencies_ms) if p.latencies_ms else None})
            p.save(PROFILES / f"{key}-b{gen['batch']}.json")
    return out


def measure_quality(paths: dict[str, Path], args) -> dict[str, dict[str, float]]:
    """KL / top-1 / perplexity against the FP32 source through each artifact's own runtime."""
    from edgesmith.artifacts import load
    from edgesmith.lm_quality import lm_fidelity, session_logits

    reference = load(paths["fp32"])
    out, seen = {}, set()
    for key, _, runtime, art in CONTENDERS:
        if art in seen or runtime == "torch":
            continue
        seen.add(art)
        fidelity = lm_fidelity(session_logits(_load(runtime, paths[art]), runtime=runtime, threads=args.threads),
                               reference, tokenizer=reference.tokenizer, threads=args.threads)
        out[key] = {k: round(float(v), 5) for k, v in fidelity.items()}
    return out


def graph_profile(path: Path, steps: int = 32) -> dict[str, Any]:
    """Nodes and ONNX Runtime's per-op time over ``steps`` decode steps after a 128-token prompt."""
    import onnx

    from edgesmith.runtimes.onnxruntime import OrtDecoderSession

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    session = OrtDecoderSession(_load("ortgenai", path), threads=2, enable_profiling=True)
    import numpy as np

    ids = np.random.default_rng(0).integers(100, 20000, size=(1, 128))
    logits = session.prefill(ids)
    for _ in range(steps):
        logits = session.step(logits.argmax(-1))
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    by_op: Counter = Counter()
    model_runs = sorted((e["ts"], e["dur"]) for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    prefill_end = model_runs[0][0] + model_runs[0][1]  # the first run is the prefill: decode steps only
    runs = len(model_runs) - 1
    for event in trace:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] > prefill_end):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    total = sum(by_op.values())
    return {"nodes": len(graph.node), "op_types": dict(Counter(n.op_type for n in graph.node).most_common()),
            "runs": runs, "kernel_us_per_run": round(total / max(runs, 1), 1),
            "share": {op: round(us / total, 4) for op, us in by_op.most_common(8)}}


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    from edgesmith.stats import paired_speedup

    rows = doc["speed"]
    base = [r["decode_tokens_per_s"] for r in rows[BASELINE]]
    out = {}
    for key, _, _, _ in CONTENDERS:
        if key not in rows:
            continue
        decode = [r["decode_tokens_per_s"] for r in rows[key]]
        n = min(len(decode), len(base))
        ratio = paired_speedup([[1.0 / b] for b in base[:n]], [[1.0 / d] for d in decode[:n]]) if n > 1 else None
        out[key] = {"decode": median_ci(decode), "vs_baseline": list(ratio) if ratio else None,
                    "ttft128": median_ci([r["ttft_ms"]["128"] for r in rows[key]]),
                    "ttft512": median_ci([r["ttft_ms"]["512"] for r in rows[key]]),
                    "rss_mb": statistics.median([r["peak_rss_mb"] for r in rows[key] if r["peak_rss_mb"]] or [0])}
    return out


GOAL_DECODE, GOAL_BATCH4 = 1.2, 2.5


def goal_lines(doc: dict[str, Any], quality: dict[str, dict], arts: dict[str, str], labels: dict[str, str]) -> list[str]:
    """The issue's goals, read off the measurements: the best ONNX artifact's decode against llama.cpp's
    Q4_0 at a KL no worse than that file's, its TTFT against the best peer's, batch 4 against batch 1."""
    s = doc["summary"]
    limit = quality.get(arts[BASELINE], {}).get("kld", float("inf"))
    onnx = [k for k in s if k.startswith(("genai-", "es-")) and quality.get(arts[k], {}).get("kld", 1e9) <= limit]
    if not onnx:
        return ["Goals: no ONNX artifact was measured at a KL within llama.cpp Q4_0's."]
    best = max(onnx, key=lambda k: s[k]["decode"][0])
    ratio = s[best]["vs_baseline"] or [float("nan")] * 3
    peers = [k for k in s if not k.startswith(("genai-", "es-"))]
    ttft = {n: min(s[k][f"ttft{n}"][0] for k in peers) for n in (128, 512)}
    met = "met" if ratio[0] >= GOAL_DECODE else "not met"
    lines = [f"Goals. Decode ≥ {GOAL_DECODE}× llama.cpp Q4_0 at a KL ≤ its {limit:.3f}: **{met}** — best "
             f"{labels[best]}, {ratio[0]:.2f}× [{ratio[1]:.2f}–{ratio[2]:.2f}] at KL "
             f"{quality[arts[best]]['kld']:.3f}. TTFT no worse than the best peer ({ttft[128]:.0f} / {ttft[512]:.0f} ms "
             f"at 128 / 512): {s[best]['ttft128'][0]:.0f} / {s[best]['ttft512'][0]:.0f} ms, **"
             + ("met" if s[best]["ttft128"][0] <= ttft[128] and s[best]["ttft512"][0] <= ttft[512] else "not met") + "**."]
    for key, rows in doc.get("batched", {}).items():
        one = next(r["decode_tokens_per_s"] for r in rows if r["batch"] == 1)
        four = next((r["decode_tokens_per_s"] for r in rows if r["batch"] == 4), None)
        if four is not None:
            lines.append(f"Batch 4 ≥ {GOAL_BATCH4}× batch 1, {labels[key]}: {four / one:.2f}×, "
                         f"**{'met' if four / one >= GOAL_BATCH4 else 'not met'}**.")
    return lines


def render(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    labels = {c[0]: c[1] for c in CONTENDERS}
    arts = {c[0]: c[3] for c in CONTENDERS}
    lines = ["# ONNX decoders in ORT GenAI against llama.cpp (issue 24)", "",
             machine.line(doc["machine"]) + f"; {doc['rounds']} rotating rounds, one worker process per "
             f"contender and round, {doc['new_tokens']} new tokens.", "", f"Command: `{doc['command']}`", "",
             "| contender | decode tok/s @128 | × llama.cpp Q4_0 | TTFT@128 ms | TTFT@512 ms | KL | top-1 | peak RSS MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    quality_by_art = {arts[k]: v for k, v in doc["quality"].items()}
    for key, row in s.items():
        q = quality_by_art.get(arts[key], {})
        ratio = row["vs_baseline"]
        lines.append(f"| {labels[key]} | {row['decode'][0]:.1f} | "
                     + (f"{ratio[0]:.2f} [{ratio[1]:.2f}–{ratio[2]:.2f}]" if ratio else "–")
                     + f" | {row['ttft128'][0]:.0f} | {row['ttft512'][0]:.0f} | "
                     + (f"{q['kld']:.4f} | {q['top1']:.3f}" if q else "– | –") + f" | {row['rss_mb']:.0f} |")
    lines += ["", *goal_lines(doc, quality_by_art, arts, labels)]
    lines += ["", "Decode tokens/s: median over rounds; × llama.cpp Q4_0: round-paired median ratio with its 95 % "
              "bootstrap interval. KL / top-1 against the FP32 source on 540 held-out tokens, in the artifact's own "
              "runtime (PyTorch FP32 is the source).", "", "## Batched (static batches of mixed-length prompts)", "",
              "| contender | batch | aggregate decode tok/s | × batch 1 | TTFT per request ms | ms per output token |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, rows in doc.get("batched", {}).items():
        one = next(r["decode_tokens_per_s"] for r in rows if r["batch"] == 1)
        for r in rows:
            lines.append(f"| {labels[key]} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['decode_tokens_per_s'] / one:.2f} | {r['ttft_ms']:.0f} | "
                         + (f"{r['ms_per_token']:.1f}" if r["ms_per_token"] else "–") + " |")
    lines += ["", "## Where a decoded token's time goes (ONNX Runtime's profiler, edgesmith's loop, 32 steps)", "",
              "| graph | nodes | kernel µs per step | top ops (share of kernel time) |", "|---|---:|---:|---|"]
    for key, g in doc.get("graphs", {}).items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(g["share"].items())[:5])
        lines.append(f"| {key} | {g['nodes']} | {g['kernel_us_per_run']:.0f} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(p, rounds=5)
    add_output_args(p, STEM)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batched-tokens", type=int, default=32)
    p.add_argument("--batched-rounds", type=int, default=3)
    p.add_argument("--skip-batched", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render_only:
        results.render_only(args.out.with_suffix(""), render)
        return 0
    paths = make_artifacts()
    rec = machine.record(args.threads)
    t0 = time.time()
    doc: dict[str, Any] = {"command": results.command_line("llm_genai.py", argv), "machine": rec,
                           "rounds": args.rounds, "new_tokens": args.new_tokens, "started": results.now()}
    doc["speed"] = measure_speed(paths, args)
    if not args.skip_batched:
        doc["batched"] = measure_batched(paths, args)
    machine.finish(rec)
    doc["quality"] = measure_quality(paths, args)
    doc["graphs"] = {key: graph_profile(paths[key]) for key in GRAPHS}
    doc["summary"] = summarize(doc)
    doc["seconds"] = round(time.time() - t0, 1)
    results.write(args.out.with_suffix(""), doc, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
