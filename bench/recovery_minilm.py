"""Recovery curves (issue 19): mildly pruned MiniLM distilled back toward the source, held-out cosine
against minutes of 2-core training, for each pruning level and loss set.

Each run: prune (the prune pass as it is) → distill (the distill pass; its held-out rows are the first
``eval_texts`` of the training slice, never trained on) with an evaluation every ``--eval-every``
steps; the pass's ``timeline`` gives the curve (cosine of the FP32 student to the teacher against
wall seconds). Then the distilled model is exported and quantized (dynamic INT8 per-channel with
8-bit embeddings) and scored against PyTorch FP32 on the top-level benchmark's held-out rows (the
corpus's last 512), before and after INT8. Results go to ``bench/results/recovery.md`` (+ JSON), after
every run, so a partial sweep still leaves its curves.

    nice -n 5 .venv/bin/python bench/recovery_minilm.py --runs ffn10-all,layer5-all --steps 600
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # as a script: the repo root, so `bench` imports

from bench.core import machine, results

log = logging.getLogger("bench.recovery")

ALL = {"cosine": 1.0, "hidden_mse": 0.1, "attention": 0.1}
#: run key → (label, prune options, distill losses)
RUNS: dict[str, tuple[str, dict[str, Any], dict[str, float]]] = {
    "ffn10-cos": ("FFN 10 % (taylor), cosine loss", {"ffn": 0.10, "importance": "taylor"}, {"cosine": 1.0}),
    "ffn10-all": ("FFN 10 % (taylor), cosine + hidden_mse 0.1 + attention 0.1", {"ffn": 0.10, "importance": "taylor"},
                  ALL),
    "hf25-all": ("heads 25 % + FFN 25 % (l2), cosine + hidden_mse 0.1 + attention 0.1",
                 {"heads": 0.25, "ffn": 0.25, "importance": "l2"}, ALL),
    "hf25-cos": ("heads 25 % + FFN 25 % (l2), cosine loss", {"heads": 0.25, "ffn": 0.25, "importance": "l2"},
                 {"cosine": 1.0}),
    "layer5-all": ("one layer of six removed (angular), cosine + hidden_mse 0.1 + attention 0.1",
                   {"layers": 0.17, "layer_importance": "angular"}, ALL),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="ffn10-all,layer5-all,hf25-all", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--limit", type=int, default=29000, help="training rows of the corpus (from row 1000)")
    p.add_argument("--eval-texts", type=int, default=256, help="distill's held-out rows (the curve)")
    p.add_argument("--bench-texts", type=int, default=512, help="the harness's held-out rows (final score)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "recovery")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "recovery.md")
    p.add_argument("--render-only", action="store_true", help="rebuild --out from its JSON; measure nothing")
    return p.parse_args(argv)


def one_run(key: str, args, source, texts, reference) -> dict[str, Any]:
    import edgesmith as es
    from edgesmith.data import builtin_corpus
    from edgesmith.passes import Context
    from edgesmith.quality import embed, fidelity

    label, prune, losses = RUNS[key]
    # the run's data as a recipe's (rows 0-511): taylor importance and the quantizer's checks read it
    ctx = Context(source=source, workdir=args.work / key, progress=False, texts=builtin_corpus(limit=512),
                  extras={"checkpoint_dir": str(args.work / "checkpoints")})
    t0 = time.perf_counter()
    pruned = es.compress.prune(source, ctx, **prune)
    prune_s = time.perf_counter() - t0
    start_fid = fidelity(reference, embed(pruned, texts), k=10)
    load = machine.load_average()[0]
    distilled = es.compress.distill(pruned, ctx, data="builtin:wordnet", offset=1000, limit=args.limit,
                                    steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                                    lr=args.lr, schedule=args.schedule, eval_every=args.eval_every,
                                    eval_texts=args.eval_texts, losses=losses, checkpoint_every=None)
    report = distilled.lineage[-1]["report"]
    fp32_fid = fidelity(reference, embed(distilled, texts), k=10)
    onnx_model = es.export.to_onnx(distilled, ctx)
    int8 = es.compress.quantize(onnx_model, ctx, mode="dynamic", per_channel=True, quantize_embeddings=True,
                                min_cosine=0.5)
    int8_fid = fidelity(reference, embed(int8, texts), k=10)
    params = sum(p.numel() for p in distilled.module.parameters())
    return {"key": key, "label": label, "prune": prune, "losses": losses, "params": params, "prune_s": prune_s,
            "pruned_fidelity": start_fid, "timeline": report["timeline"], "best_step": report["best_step"],
            "train_s": report["train_seconds"], "fp32_fidelity": fp32_fid, "int8_fidelity": int8_fid,
            "int8_size_mb": int8.size_bytes() / 1e6, "load_1min_at_start": load, "load_1min_at_end": machine.load_average()[0]}


def render(summary: dict[str, Any]) -> str:
    a = summary["settings"]
    lines = ["# Recovery curves: mildly pruned MiniLM, distilled (issue 19)", "",
             f"Command: `{summary['command']}`", "",
             *([machine.line(summary["machine"]), ""] if summary.get("machine") else []),
             (f"Distillation: {a['steps']} steps, batch {a['batch_size']}, ≤ {a['max_length']} tokens, lr {a['lr']:g} "
              f"({a['schedule']} schedule, 10 % warm-up), length-bucketed batches, corpus rows 1000–{1000 + a['limit']} "
              f"(the first {a['eval_texts']} held out: the curve); torch {a['threads']} threads on a 2-core machine "
              "shared with other jobs (1-minute load average per run below). Final fidelity against PyTorch FP32 on "
              f"the corpus's last {a['bench_texts']} rows (the top-level benchmark's held-out rows), FP32 and after "
              "dynamic INT8 per-channel with 8-bit embeddings."), "",
             "| run | params | cosine pruned | cosine distilled FP32 | recall@10 FP32 | cosine INT8 | recall@10 INT8 "
             "| train min | load 1-min start/end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['pruned_fidelity']['cosine']:.4f} | "
                     f"{r['fp32_fidelity']['cosine']:.4f} | {r['fp32_fidelity']['recall@10']:.3f} | "
                     f"{r['int8_fidelity']['cosine']:.4f} | {r['int8_fidelity']['recall@10']:.3f} | "
                     f"{r['train_s'] / 60:.1f} | {r['load_1min_at_start']:.1f} / {r['load_1min_at_end']:.1f} |")
    lines += ["", "Curves (held-out cosine of the FP32 student to the teacher, distill's own held-out rows, against "
                  "wall minutes of training including evaluations):", ""]
    for r in summary["runs"]:
        points = ", ".join(f"{e['seconds'] / 60:.1f} min → {e['metric']:.4f}" for e in r["timeline"])
        lines.append(f"- **{r['label']}** (step of the kept weights: {r['best_step']}): {points}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    import torch

    import edgesmith as es
    from edgesmith.data import builtin_corpus
    from edgesmith.quality import embed

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    source = es.load("minilm")
    texts = builtin_corpus()[-args.bench_texts:]
    reference = embed(source, texts)
    summary: dict[str, Any] = {
        "command": results.command_line("recovery_minilm.py", argv), "machine": machine.record(args.threads),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out", "render_only")}, "runs": []}
    for key in [k for k in args.runs.split(",") if k]:
        log.info("run %s: %s", key, RUNS[key][0])
        summary["runs"].append(one_run(key, args, source, texts, reference))
        machine.finish(summary["machine"])
        results.write(args.out, summary, render, indent=2)  # after every run: a killed study keeps its runs
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
