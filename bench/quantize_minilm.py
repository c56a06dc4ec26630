"""Quantization variants of the packaged MiniLM on ONNX Runtime CPU, side by side, in one run.

Contenders: FP32 (edgesmith export), dynamic INT8 per-tensor, dynamic INT8 per-channel, static
QDQ with each calibration method (minmax, entropy, percentile; transformer defaults: weight
MatMuls only, FFN down-projections float), and accuracy-aware static (no default fallback, gate
cosine drop <= 0.01: the search picks the float nodes). Every variant is made by the quantize pass.

Latency: batch 1 and 8 at seq 128, measured in interleaved rounds (a block of iterations per
contender, the order rotating each round) and summarised from per-round medians
(FIELD-NOTES: alternating single runs evict each model's weights from the caches). Quality:
cosine and neighbour recall@10 of mean-pooled embeddings against FP32 on held-out WordNet
sentences (not the calibration texts).

    .venv/bin/python bench/quantize_minilm.py [--rounds 6] [--block 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def make_variants(workdir: Path, calibration_samples: int, eval_texts: int) -> dict:
    from edgesmith.artifacts import load
    from edgesmith.compress.quantization import QuantizePass
    from edgesmith.export.onnx import ExportPass
    from edgesmith.passes import Context

    ctx = Context(workdir=workdir)
    fp32 = ExportPass()(load("minilm"), ctx)
    static = dict(mode="static", calibration_samples=calibration_samples)
    recipes = {
        "dynamic per-tensor": dict(per_channel=False),
        "dynamic per-channel": dict(),
        "static minmax": dict(static),
        "static entropy": dict(static, method="entropy"),
        "static percentile": dict(static, method="percentile"),
        "static accuracy-aware (cosine drop <= 0.01)": dict(static, ffn_down_float=False, max_drop={"cosine": 0.01},
                                                             eval_texts=eval_texts),
    }
    variants = {"FP32": (fp32, {})}
    for name, options in recipes.items():
        t0 = time.perf_counter()
        # the bench reports quality itself: a low floor so every variant is measured
        out = QuantizePass(**options, min_cosine=0.5)(fp32, ctx)
        report = out.lineage[-1]["report"]
        report["_seconds"] = time.perf_counter() - t0
        variants[name] = (out, report)
        print(f"made {name} in {report['_seconds']:.0f} s", file=sys.stderr)
    return variants


def latency(variants: dict, batch: int, seq: int, rounds: int, block: int, threads: int) -> dict[str, list[float]]:
    """Per-round medians (ms) of each contender, blocks interleaved with rotating order."""
    from edgesmith.profiling import build_feeds, measure
    from edgesmith.runtimes.base import get_runtime

    runtime = get_runtime("onnxruntime")
    sessions = {name: runtime.load(art, threads=threads) for name, (art, _) in variants.items()}
    first = next(iter(variants.values()))[0]
    feeds = build_feeds(first.tokenizer, sessions["FP32"].input_names, batch=batch, seq=seq)
    names = list(sessions)
    medians: dict[str, list[float]] = {n: [] for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            ms = measure(sessions[name], feeds, warmup=2, iterations=block)
            samples[name] += ms
            medians[name].append(float(np.median(ms)))
    for s in sessions.values():
        s.close()
    return {"medians": medians, "samples": samples}


def quality(variants: dict, texts: list[str]) -> dict[str, dict[str, float]]:
    from edgesmith.quality import embed, fidelity

    ref = embed(variants["FP32"][0], texts)
    return {name: fidelity(ref, embed(art, texts), k=10) for name, (art, _) in variants.items()}


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}"


def main() -> None:
    from edgesmith.data import builtin_corpus
    from edgesmith.profiling import bootstrap_speedup, summarize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--eval-texts", type=int, default=64)
    parser.add_argument("--quality-texts", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgesmith-bench-quantize"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    variants = make_variants(args.workdir, args.calibration_samples, args.eval_texts)
    # held out: past the calibration (WordNet offset 64..64+samples) and the search's texts
    texts = builtin_corpus(limit=args.quality_texts, offset=5000)
    qual = quality(variants, texts)
    timing = {b: latency(variants, b, 128, args.rounds, args.block, args.threads) for b in (1, 8)}

    command = "python bench/quantize_minilm.py " + " ".join(sys.argv[1:])
    lines = ["# Quantization of MiniLM-L6 on ONNX Runtime CPU", "",
             f"Command: `{command}`  ", f"Machine: {machine()}, {args.threads} intra-op threads  ",
             f"Latency: seq 128, {args.rounds} rounds x {args.block} iterations per contender, blocks interleaved "
             "with rotating order; p50/p90 over per-round medians; speedup vs FP32 = median ratio with a 95 % "
             "bootstrap interval over all samples.  ",
             f"Quality: mean cosine and recall@10 of mean-pooled embeddings vs FP32 on {len(texts)} held-out "
             "WordNet sentences.", "",
             "| variant | size MB | cosine | recall@10 | b1 p50 ms | b1 p90 ms | b1 speedup | b8 p50 ms | b8 p90 ms "
             "| b8 speedup | float weight nodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (art, report) in variants.items():
        cells = [name, f"{art.size_bytes() / 1e6:.1f}", f"{qual[name]['cosine']:.4f}", f"{qual[name]['recall@10']:.3f}"]
        for b in (1, 8):
            stats = summarize(timing[b]["medians"][name])
            speed, low, high = bootstrap_speedup(timing[b]["samples"]["FP32"], timing[b]["samples"][name])
            cells += [f"{stats['p50']:.1f}", f"{stats['p90']:.1f}", f"{speed:.2f}x [{low:.2f}, {high:.2f}]"]
        floats = report.get("float", {}).get("count", {}).get("MatMul", 0) if report else 0
        cells.append(str(floats) if report else "-")
        lines.append("| " + " | ".join(cells) + " |")
    aware = variants["static accuracy-aware (cosine drop <= 0.01)"][1]["fallback"]
    lines += ["", f"Accuracy-aware search: {aware['evaluations']} quantize-and-evaluate rounds in {aware['seconds']:.0f} s; "
              f"all quantized cosine {aware['all_quantized']['cosine']:.4f} -> {aware['final']['cosine']:.4f} with "
              f"{len(aware['float_nodes'])} nodes float: "
              + ", ".join(f"{v['module']} (cost {v['cosine_drop_if_quantized']:+.4f})"
                          for v in aware["float_node_costs"].values()), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {"quality": qual, "latency": {b: timing[b]["medians"] for b in timing}}, indent=1))


if __name__ == "__main__":
    main()
