"""Benchmark: MiniLM pruned 30 % and 50 % (heads and FFN channels, no recovery) against the unpruned
model in the same run (not run in tests).

For each contender: parameters (torch), ONNX file size, ONNX Runtime CPU latency at batch 1 and
batch 8 × 128 tokens, and fidelity to the unpruned model (mean cosine of mean-pooled embeddings,
neighbour recall@10) on held-out corpus rows (rows from ``--eval-offset`` on; the pass reads none
of them: magnitude importance uses no data). Every model is exported with ``edgesmith.export
.to_onnx`` (which validates the graph against its torch model).

Latency is measured in rotating rounds (``bench.core.rounds``): in each round every contender runs
a block of ``--iterations`` timed runs (after 2 warm-up runs), the order rotating from round to
round; speedups are paired by round (median of the unpruned block over the pruned one, 95 %
bootstrap interval over rounds: ``edgesmith.stats.paired_speedup``). Writes ``--out`` and its JSON.

    .venv/bin/python bench/prune_minilm.py --rounds 6 --iterations 10 --threads 2 --out bench/results/prune.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

import edgesmith as es
from bench.core import cli, machine, results
from bench.core.rounds import Timed, paired_speedup, run_rounds
from edgesmith.data import builtin_corpus
from edgesmith.passes import Context
from edgesmith.profiling import build_feeds, summarize
from edgesmith.quality import embed, fidelity
from edgesmith.runtimes.base import get_runtime

log = logging.getLogger("bench.prune")

RATIOS = (0.3, 0.5)
BATCHES = (1, 8)
SEQ = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_timing_args(parser, rounds=6, threads=2)
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per contender per round")
    parser.add_argument("--eval-texts", type=int, default=512, help="held-out texts for fidelity")
    parser.add_argument("--eval-offset", type=int, default=20000, help="first corpus row of the held-out texts")
    parser.add_argument("--importance", default="l2", help="importance criterion of the pruning")
    cli.add_output_args(parser, "prune")
    args = parser.parse_args(argv)
    cli.check_positive(parser, args, "rounds", "threads", "iterations", "eval_texts")
    return args


def build_contenders(args: argparse.Namespace) -> dict[str, dict]:
    source = es.load("minilm")
    contenders = {"unpruned": {"torch": source, "ratio": 0.0}}
    for ratio in RATIOS:
        started = time.perf_counter()
        pruned = es.compress.prune(source, Context(), heads=ratio, ffn=ratio, importance=args.importance,
                                   check_latency=False)
        report = pruned.lineage[-1]["report"]
        log.info("pruned %.0f %% in %.1f s: heads %s, ffn %s", ratio * 100, time.perf_counter() - started,
                 report["heads_after"], report["ffn_after"])
        contenders[f"pruned {ratio:.0%}"] = {"torch": pruned, "ratio": ratio, "report": report}
    for name, entry in contenders.items():
        started = time.perf_counter()
        entry["onnx"] = es.export.to_onnx(entry["torch"], Context())
        log.info("exported %s in %.1f s", name, time.perf_counter() - started)
    return contenders


def latencies(contenders: dict[str, dict], args: argparse.Namespace) -> dict[int, dict[str, Timed]]:
    """Rotating rounds per batch size: {batch: {contender: its blocks}}."""
    runtime = get_runtime("onnxruntime")
    sessions = {n: runtime.load(contenders[n]["onnx"], threads=args.threads) for n in contenders}
    tokenizer = contenders["unpruned"]["torch"].tokenizer
    timed: dict[int, dict[str, Timed]] = {}
    try:
        for batch in BATCHES:
            feeds = {n: build_feeds(tokenizer, sessions[n].input_names, batch=batch, seq=SEQ) for n in sessions}
            runners = {n: (lambda i, s=sessions[n], f=feeds[n]: s.run(f[i % len(f)])) for n in sessions}
            timed[batch] = run_rounds(runners, rounds=args.rounds, block=args.iterations, warmup=2)
            log.info("batch %d measured", batch)
    finally:
        for session in sessions.values():
            session.close()
    return timed


def rows(contenders: dict[str, dict], timed: dict[int, dict[str, Timed]], args: argparse.Namespace) -> list[dict]:
    texts = builtin_corpus(limit=args.eval_texts, offset=args.eval_offset)
    reference = embed(contenders["unpruned"]["torch"], texts)
    out = []
    for name, entry in contenders.items():
        model = entry["torch"]
        fid = fidelity(reference, embed(model, texts), k=10)
        layer = model.module.encoder.layer[0]
        row: dict[str, Any] = {"name": name, "heads": layer.attention.self.num_attention_heads,
                               "ffn": layer.intermediate.dense.out_features, "parameters": model.parameter_count(),
                               "onnx_mb": entry["onnx"].size_bytes() / 1e6, "cosine": fid["cosine"],
                               "recall@10": fid["recall@10"], "latency": {}}
        for batch in BATCHES:
            t = timed[batch][name]
            row["latency"][str(batch)] = {"p50": summarize(t.all)["p50"],
                                          "speedup": list(paired_speedup(timed[batch]["unpruned"], t))}
        out.append(row)
    return out


def render(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = ["| model | heads / FFN per layer | parameters | ONNX MB | b1 p50 ms | b1 speedup [95 % CI] "
             "| b8 p50 ms | b8 speedup [95 % CI] | cosine | recall@10 |", "|" + "---|" * 10]
    for r in doc["rows"]:
        cells = [r["name"], f"{r['heads']} / {r['ffn']}", f"{r['parameters']:,}", f"{r['onnx_mb']:.1f}"]
        for batch in BATCHES:
            lat = r["latency"][str(batch)]
            speed, low, high = lat["speedup"]
            cells += [f"{lat['p50']:.1f}", "1.00" if r["name"] == "unpruned" else f"{speed:.2f} [{low:.2f}, {high:.2f}]"]
        cells += [f"{r['cosine']:.3f}", f"{r['recall@10']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    libs = doc["machine"]["libraries"]
    return "\n".join([
        "# Pruning MiniLM-L6 (heads + FFN, no recovery): size, ONNX Runtime CPU latency, fidelity",
        "",
        f"Command: `{doc['command']}`",
        "",
        machine.line(doc["machine"]),
        "",
        f"torch {libs.get('torch')}, onnxruntime {libs.get('onnxruntime')}. Pruning: uniform, {s['importance']} "
        f"importance, round_to 8. Latency: ONNX Runtime CPU FP32, {s['threads']} threads, seq {SEQ}, {s['rounds']} "
        f"rotating rounds × {s['iterations']} runs per contender; speedups paired by round. Fidelity: "
        f"{s['eval_texts']} held-out WordNet sentences (rows {s['eval_offset']}…), mean-pooled embeddings vs the "
        "unpruned model.",
        "",
        *lines,
        "",
        f"Total time {doc['wall_s']:.0f} s.",
    ])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "edgesmith", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    started = time.perf_counter()
    rec = machine.record(args.threads)
    contenders = build_contenders(args)
    timed = latencies(contenders, args)
    doc = {"command": results.command_line("prune_minilm.py", argv), "created": results.now(),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "render_only")},
           "rows": rows(contenders, timed, args), "wall_s": time.perf_counter() - started,
           "machine": machine.finish(rec)}
    _, md = results.write(args.out, doc, render)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
