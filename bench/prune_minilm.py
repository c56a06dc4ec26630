"""Benchmark: MiniLM pruned 30 % and 50 % (heads and FFN channels, no recovery) against the unpruned
model in the same run (not run in tests).

For each contender: parameters (torch), ONNX file size, ONNX Runtime CPU latency at batch 1 and
batch 8 × 128 tokens, and fidelity to the unpruned model (mean cosine of mean-pooled embeddings,
neighbour recall@10) on held-out corpus rows (rows from ``--eval-offset`` on; the pass reads none
of them: magnitude importance uses no data). Every model is exported with ``edgesmith.export
.to_onnx`` (which validates the graph against its torch model).

Latency is measured in rounds: in each round every contender runs a block of ``--iterations``
timed runs (after 2 warm-up runs), the order of the contenders rotating from round to round;
speedups are median(unpruned) / median(pruned) with a bootstrap 95 % interval
(``edgesmith.profiling.bootstrap_speedup``).

    .venv/bin/python bench/prune_minilm.py --rounds 6 --iterations 10 --threads 2 --out bench/results/prune.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import edgesmith as es
from edgesmith.data import builtin_corpus
from edgesmith.passes import Context
from edgesmith.profiling import bootstrap_speedup, build_feeds, measure, summarize
from edgesmith.quality import embed, fidelity
from edgesmith.runtimes.base import get_runtime

log = logging.getLogger("bench.prune")

RATIOS = (0.3, 0.5)
BATCHES = (1, 8)
SEQ = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="latency rounds (contenders interleaved)")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per contender per round")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--eval-texts", type=int, default=512, help="held-out texts for fidelity")
    parser.add_argument("--eval-offset", type=int, default=20000, help="first corpus row of the held-out texts")
    parser.add_argument("--importance", default="l2", help="importance criterion of the pruning")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    return parser.parse_args()


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


def latencies(contenders: dict[str, dict], args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    """Interleaved rounds: each round runs every contender's block, in a rotated order."""
    runtime = get_runtime("onnxruntime")
    names = list(contenders)
    sessions = {n: runtime.load(contenders[n]["onnx"], threads=args.threads) for n in names}
    tokenizer = contenders["unpruned"]["torch"].tokenizer
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        for batch in BATCHES:
            feeds = {n: build_feeds(tokenizer, sessions[n].input_names, batch=batch, seq=SEQ) for n in names}
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    samples.setdefault((name, batch), []).extend(
                        measure(sessions[name], feeds[name], warmup=2, iterations=args.iterations))
            log.info("batch %d measured", batch)
    finally:
        for session in sessions.values():
            session.close()
    return samples


def table(contenders: dict[str, dict], samples: dict[tuple[str, int], list[float]], args: argparse.Namespace) -> str:
    texts = builtin_corpus(limit=args.eval_texts, offset=args.eval_offset)
    reference = embed(contenders["unpruned"]["torch"], texts)
    header = ("| model | heads / FFN per layer | parameters | ONNX MB | b1 p50 ms | b1 speedup [95 % CI] "
              "| b8 p50 ms | b8 speedup [95 % CI] | cosine | recall@10 |")
    rows = [header, "|" + "---|" * 10]
    for name, entry in contenders.items():
        model = entry["torch"]
        fid = fidelity(reference, embed(model, texts), k=10)
        heads = model.module.encoder.layer[0].attention.self.num_attention_heads
        width = model.module.encoder.layer[0].intermediate.dense.out_features
        cells = [name, f"{heads} / {width}", f"{model.parameter_count():,}",
                 f"{entry['onnx'].size_bytes() / 1e6:.1f}"]
        for batch in BATCHES:
            stats = summarize(samples[(name, batch)])
            if name == "unpruned":
                speed = "1.00"
            else:
                s, low, high = bootstrap_speedup(samples[("unpruned", batch)], samples[(name, batch)])
                speed = f"{s:.2f} [{low:.2f}, {high:.2f}]"
            cells += [f"{stats['p50']:.1f}", speed]
        cells += [f"{fid['cosine']:.3f}", f"{fid['recall@10']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "edgesmith", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args()
    started = time.perf_counter()
    contenders = build_contenders(args)
    samples = latencies(contenders, args)
    body = table(contenders, samples, args)
    import onnxruntime
    import torch

    lines = [
        "# Pruning MiniLM-L6 (heads + FFN, no recovery): size, ONNX Runtime CPU latency, fidelity",
        "",
        f"Command: `.venv/bin/python {' '.join(['bench/prune_minilm.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} ORT threads; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Pruning: uniform, {args.importance} "
        f"importance, round_to 8. Latency: ONNX Runtime CPU FP32, seq {SEQ}, {args.rounds} interleaved rounds × "
        f"{args.iterations} runs per contender. Fidelity: {args.eval_texts} held-out WordNet sentences "
        f"(rows {args.eval_offset}…), mean-pooled embeddings vs the unpruned model.",
        "",
        body,
        "",
        f"Total time {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
