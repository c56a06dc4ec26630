"""Benchmark: how much of MiniLM distillation recovers, and what it costs (not run in tests).

Two students of the packaged MiniLM-L6, each distilled with the cosine loss on mean-pooled
embeddings on the shipped WordNet corpus for the same fixed budget of steps:

1. MiniLM pruned 50 % (heads and FFN channels), then distilled (teacher: the unpruned model);
2. a 3-layer copy of MiniLM (every other layer: 1, 3, 5), then distilled.

Fidelity (mean cosine to the unpruned model, neighbour recall@10) is measured on held-out corpus
rows (the first ``--eval-texts`` rows, which the pass never trains on) before and after; latency
is ONNX Runtime FP32 at batch 1 × 128 tokens against the unpruned model.

    .venv/bin/python bench/distill_minilm.py --steps 250 --threads 2 --out bench/results/distill.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

import edgesmith as es
from bench.core import machine, results
from edgesmith.data import builtin_corpus
from edgesmith.passes import Context
from edgesmith.profiling import compare, profile
from edgesmith.quality import embed, fidelity

log = logging.getLogger("bench.distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-texts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=40, help="latency samples per model")
    parser.add_argument("--out", type=Path, default=results.RESULTS / "distill.md",
                        help="the Markdown report; its JSON goes beside it")
    return parser.parse_args(argv)


def measure_fidelity(model, reference_embeddings, texts) -> dict[str, float]:
    return fidelity(reference_embeddings, embed(model, texts), k=10)


def distill(student, source, args, **options):
    ctx = Context(source=source, progress=True)
    out = es.compress.distill(student, ctx, data="builtin:wordnet", steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, max_length=args.max_length, eval_texts=args.eval_texts,
                              eval_every=max(25, args.steps // 5), checkpoint_every=None, **options)
    return out, out.lineage[-1]["report"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rec = machine.record(args.threads)

    source = es.load("minilm")
    held = builtin_corpus(limit=args.eval_texts)  # the rows the distill pass holds out
    reference = embed(source, held)

    pruned = es.compress.prune(source, Context(source=source, progress=False), heads=0.5, ffn=0.5)
    log.info("distilling the pruned model for %d steps", args.steps)
    pruned_distilled, pruned_report = distill(pruned, source, args)
    log.info("distilling a 3-layer copy for %d steps", args.steps)
    shallow_distilled, shallow_report = distill(source, source, args, every_k=2)

    rows = [
        ("MiniLM-L6 (source)", source, {"cosine": 1.0, "recall@10": 1.0}, None),
        ("pruned 50 % heads+FFN", pruned, measure_fidelity(pruned, reference, held), None),
        ("pruned 50 % + distilled", pruned_distilled, measure_fidelity(pruned_distilled, reference, held),
         pruned_report),
        ("3 layers (1,3,5), not trained", None,
         {"cosine": shallow_report["cosine_before"], "recall@10": shallow_report["recall@10_before"]}, None),
        ("3 layers + distilled", shallow_distilled, measure_fidelity(shallow_distilled, reference, held),
         shallow_report),
    ]

    profiles = []
    for label, model, quality, _ in rows:
        if model is None:
            continue
        onnx_model = es.export.to_onnx(model)
        prof = profile(onnx_model, "onnxruntime", batch=1, seq=128, warmup=5, iterations=args.iterations,
                       threads=args.threads, label=label)
        prof.quality = {"cosine": quality["cosine"], "recall@10": quality["recall@10"]}
        profiles.append(prof)
    comparison = compare(profiles, baseline=0)
    p50 = {row.label: row for row in comparison.rows}

    lines = [
        "| model | params | cosine | recall@10 | train s | best step | ORT p50 ms (b1 s128) | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, model, quality, report in rows:
        params = f"{sum(p.numel() for p in model.module.parameters()) / 1e6:.1f} M" if model is not None else "-"
        train = f"{report['train_seconds']:.0f}" if report else "-"
        best = f"{report['best_step']}/{report['steps_run']}" if report else "-"
        row = p50.get(label)
        latency = f"{row.p50:.2f}" if row else "-"
        speedup = ("1.00x" if row and row.verdict == "baseline" else
                   f"{row.speedup:.2f}x [{row.ci_low:.2f}-{row.ci_high:.2f}]" if row and row.ci_low is not None
                   else f"{row.speedup:.2f}x" if row and row.speedup else "-")
        lines.append(f"| {label} | {params} | {quality['cosine']:.4f} | {quality['recall@10']:.4f} | {train} | "
                     f"{best} | {latency} | {speedup} |")
    table = "\n".join(lines)
    wall = time.perf_counter() - started
    header = (f"Distillation on the shipped WordNet corpus: {args.steps} steps per student, batch {args.batch_size}, "
              f"≤ {args.max_length} tokens, lr {args.lr}, cosine loss on mean-pooled embeddings; fidelity on the "
              f"first {args.eval_texts} corpus rows (held out from training). {machine.line(machine.finish(rec))} "
              f"Torch and ORT threads {args.threads}, shared with other jobs. Wall time {wall / 60:.1f} min.")
    command = results.command_line("distill_minilm.py", argv)
    doc = {"command": command, "created": results.now(), "machine": rec, "settings": vars(args) | {"out": None},
           "markdown": f"# Distilling MiniLM-L6\n\nCommand: `{command}`\n\n{header}\n\n{table}"}
    _, md = results.write(args.out, doc, lambda d: d["markdown"])
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
