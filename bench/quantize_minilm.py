"""Quantization variants of the packaged MiniLM on ONNX Runtime CPU, side by side, in one run.

Contenders: FP32 (edgesmith export), dynamic INT8 per-tensor, dynamic INT8 per-channel, static
QDQ with each calibration method (minmax, entropy, percentile; transformer defaults: weight
MatMuls only, FFN down-projections float), and accuracy-aware static (no default fallback, gate
cosine drop <= 0.01: the search picks the float nodes). Every variant is made by the quantize pass.

Latency: batch 1 and 8 at seq 128, measured in rotating rounds (``bench.core.rounds``: a block of
iterations per contender, the order rotating each round), p50/p90 of the per-round medians, speedups
paired by round (FIELD-NOTES: alternating single runs evict each model's weights from the caches). Quality:
cosine and neighbour recall@10 of mean-pooled embeddings against FP32 on held-out WordNet
sentences (not the calibration texts).

    .venv/bin/python bench/quantize_minilm.py [--rounds 6] [--block 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.core import cli, machine, results
from bench.core.rounds import Timed, run_rounds


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


def latency(variants: dict, batch: int, seq: int, rounds: int, block: int, threads: int) -> dict[str, Timed]:
    """Each contender's blocks, in rotating rounds."""
    from edgesmith.profiling import build_feeds
    from edgesmith.runtimes.base import get_runtime

    runtime = get_runtime("onnxruntime")
    sessions = {name: runtime.load(art, threads=threads) for name, (art, _) in variants.items()}
    first = next(iter(variants.values()))[0]
    feeds = build_feeds(first.tokenizer, sessions["FP32"].input_names, batch=batch, seq=seq)
    try:
        runners = {n: (lambda i, s=s: s.run(feeds[i % len(feeds)])) for n, s in sessions.items()}
        return run_rounds(runners, rounds=rounds, block=block, warmup=2)
    finally:
        for s in sessions.values():
            s.close()


def quality(variants: dict, texts: list[str]) -> dict[str, dict[str, float]]:
    from edgesmith.quality import embed, fidelity

    ref = embed(variants["FP32"][0], texts)
    return {name: fidelity(ref, embed(art, texts), k=10) for name, (art, _) in variants.items()}


def aware_line(report: dict[str, Any]) -> str:
    aware = report["fallback"]
    return (f"Accuracy-aware search: {aware['evaluations']} quantize-and-evaluate rounds in {aware['seconds']:.0f} s; "
            f"all quantized cosine {aware['all_quantized']['cosine']:.4f} -> {aware['final']['cosine']:.4f} with "
            f"{len(aware['float_nodes'])} nodes float: "
            + ", ".join(f"{v['module']} (cost {v['cosine_drop_if_quantized']:+.4f})"
                        for v in aware["float_node_costs"].values()))


def render(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = ["# Quantization of MiniLM-L6 on ONNX Runtime CPU", "",
             f"Command: `{doc['command']}`  ", machine.line(doc["machine"]) + "  ",
             f"Latency: seq 128, {s['rounds']} rounds x {s['block']} iterations per contender, blocks in a rotating "
             "order; p50/p90 over per-round medians; speedup vs FP32 = median of per-round ratios with a 95 % "
             "bootstrap interval over rounds.  ",
             f"Quality: mean cosine and recall@10 of mean-pooled embeddings vs FP32 on {doc['quality_texts']} held-out "
             "WordNet sentences.", "",
             "| variant | size MB | cosine | recall@10 | b1 p50 ms | b1 p90 ms | b1 speedup | b8 p50 ms | b8 p90 ms "
             "| b8 speedup | float weight nodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        cells = [r["name"], f"{r['size_mb']:.1f}", f"{r['cosine']:.4f}", f"{r['recall@10']:.3f}"]
        for b in ("1", "8"):
            lat = r["latency"][b]
            speed, low, high = lat["speedup"]
            cells += [f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{speed:.2f}x [{low:.2f}, {high:.2f}]"]
        cells.append("-" if r["float_nodes"] is None else str(r["float_nodes"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", doc["aware"]])


def main(argv: list[str] | None = None) -> int:
    from edgesmith.data import builtin_corpus
    from edgesmith.stats import paired_speedup, summarize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_timing_args(parser, rounds=6, threads=2, block=10)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--eval-texts", type=int, default=64)
    parser.add_argument("--quality-texts", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgesmith-bench-quantize"))
    cli.add_output_args(parser, "quantize")
    args = parser.parse_args(argv)
    cli.check_positive(parser, args, "rounds", "block", "threads", "calibration_samples", "quality_texts")
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0

    rec = machine.record(args.threads)
    variants = make_variants(args.workdir, args.calibration_samples, args.eval_texts)
    # held out: past the calibration (WordNet offset 64..64+samples) and the search's texts
    texts = builtin_corpus(limit=args.quality_texts, offset=5000)
    qual = quality(variants, texts)
    timing = {b: latency(variants, b, 128, args.rounds, args.block, args.threads) for b in (1, 8)}
    rows = []
    for name, (art, report) in variants.items():
        lat = {}
        for b in (1, 8):
            stats = summarize(timing[b][name].round_medians)
            lat[str(b)] = {"p50": stats["p50"], "p90": stats["p90"], "round_medians": timing[b][name].round_medians.tolist(),
                           "speedup": list(paired_speedup(timing[b]["FP32"].rounds, timing[b][name].rounds))}
        floats = report.get("float", {}).get("count", {}).get("MatMul", 0) if report else None
        rows.append({"name": name, "size_mb": art.size_bytes() / 1e6, "cosine": qual[name]["cosine"],
                     "recall@10": qual[name]["recall@10"], "latency": lat, "float_nodes": floats})
    doc = {"command": results.command_line("quantize_minilm.py", argv), "created": results.now(),
           "settings": {"rounds": args.rounds, "block": args.block, "threads": args.threads,
                        "calibration_samples": args.calibration_samples, "eval_texts": args.eval_texts},
           "quality_texts": len(texts), "rows": rows,
           "aware": aware_line(variants["static accuracy-aware (cosine drop <= 0.01)"][1]),
           "machine": machine.finish(rec)}
    _, md = results.write(args.out, doc, render)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
