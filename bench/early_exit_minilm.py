"""Benchmark: early exit on MiniLM — layers executed, quality kept, ONNX Runtime CPU latency.

Two rows, each against its own full model, in one run:

1. **Classifier**: MiniLM fine-tuned on the 8 most frequent WordNet categories
   (``bench/wordnet_classifier.py`` builds it into ``bench/.cache/`` when it is not there), early
   exit after every layer from the 2nd, heads trained by self-distillation (frozen backbone), one
   threshold per exit calibrated on 1,500 labelled calibration rows for ``accuracy=0.01``; accuracy measured
   on 2,000 test rows that neither the classifier nor the exits saw.
2. **Encoder**: the packaged MiniLM sentence encoder with projection exits, agreement policy,
   calibrated for ``cosine=0.98``; fidelity (mean cosine of sentence embeddings to the full model)
   on the same test rows.

Latency: ONNX Runtime CPU, the early-exit controller over its segments against the full model
exported to one ONNX graph, at batch 1 and 8, on 64 distinct batches of test sentences (each padded
to its longest row, as deployed), measured in blocks with the order rotated across rounds; speedup =
ratio of medians with a bootstrap 95 % interval (``edgesmith.profiling``). A table of all classifier
policies, each calibrated on the same heads with one shared and with per-exit thresholds, follows.

    .venv/bin/python bench/early_exit_minilm.py --threads 2 --out bench/results/early_exit.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

import edgesmith as es
from bench.core import cli, machine, results
from bench.core.rounds import Timed, paired_speedup, run_rounds
from bench.wordnet_classifier import build_classifier, wordnet_splits
from edgesmith.early_exit.objective import exit_outputs, single_token_mask
from edgesmith.early_exit.policy import Budget, calibrate, evaluate_policy
from edgesmith.inputs import tokenize
from edgesmith.passes import Context, get_pass
from edgesmith.runtimes.base import get_runtime
from edgesmith.stats import summarize, verdict_of

log = logging.getLogger("bench.early_exit")
HERE = Path(__file__).resolve().parent
LATENCY_BATCHES = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", type=Path, default=HERE / ".cache" / "minilm-wordnet")
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=800, help="exit-head training steps (classifier)")
    parser.add_argument("--encoder-steps", type=int, default=300, help="exit-head training steps (encoder)")
    parser.add_argument("--thresholds", default="per-exit", help="per-exit or shared (the deployed policy)")
    parser.add_argument("--policy", default="entropy", help="classifier policy that is deployed and timed")
    parser.add_argument("--budget", default="accuracy=0.01")
    parser.add_argument("--encoder-budget", default="cosine=0.98")
    parser.add_argument("--train-rows", type=int, default=8000, help="rows the exit heads train on")
    cli.add_timing_args(parser, rounds=5, threads=2)
    parser.add_argument("--iterations", type=int, default=30, help="timed runs per model per round")
    cli.add_output_args(parser, "early_exit", render_only=False)
    args = parser.parse_args(argv)
    cli.check_positive(parser, args, "rounds", "threads", "iterations")
    return args


def latency(models: dict[str, object], texts: list[str], tokenizer, batch: int, args) -> dict[str, Timed]:
    """Each model's blocks (ms) on the same distinct batches, in rotating rounds (``bench.core.rounds``)."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = [tokenize(tokenizer, texts[i * batch:(i + 1) * batch], input_names=names)
             for i in range(min(LATENCY_BATCHES, len(texts) // batch))]
    sessions = {k: get_runtime("onnxruntime").load(m, threads=args.threads) for k, m in models.items()}
    stats: dict[str, dict] = {}
    try:
        runners = {k: (lambda i, s=s: s.run(feeds[i % len(feeds)])) for k, s in sessions.items()}
        out: dict[str, Timed] = run_rounds(runners, rounds=args.rounds, block=args.iterations, warmup=3)
        for k, s in sessions.items():
            if hasattr(s, "exit_stats"):
                stats[k] = s.exit_stats()
    finally:
        for s in sessions.values():
            s.close()
    out["_stats"] = stats  # type: ignore[assignment]
    return out


def classifier_quality(ee, full_onnx, texts, labels, label2id) -> dict:
    from edgesmith.quality import logits

    full = logits(full_onnx, texts)
    session = get_runtime("onnxruntime").load(ee)
    preds, layers = [], []
    try:
        for s in range(0, len(texts), 8):
            out = session.run(tokenize(ee.tokenizer, texts[s:s + 8], input_names=session.input_names))
            preds.append(out["logits"].argmax(-1))
            layers.append(out["exit_layer"])
    finally:
        session.close()
    pred, layer = np.concatenate(preds), np.concatenate(layers)
    y = np.asarray([label2id[x] for x in labels])
    return {"accuracy_full": float((full.argmax(-1) == y).mean()), "accuracy": float((pred == y).mean()),
            "agreement": float((pred == full.argmax(-1)).mean()), "mean_layers": float(layer.mean()),
            "histogram": {str(k): int((layer == k).sum()) for k in sorted(set(layer.tolist()))}}


def encoder_quality(ee, full_onnx, texts) -> dict:
    from edgesmith.quality import embed, row_cosines

    full = embed(full_onnx, texts)
    session = get_runtime("onnxruntime").load(ee)
    layers = []
    try:
        cand = embed(ee, texts, session=session)
        for s in range(0, len(texts), 32):
            out = session.run(tokenize(ee.tokenizer, texts[s:s + 32], input_names=session.input_names))
            layers.append(out["exit_layer"])
    finally:
        session.close()
    layer = np.concatenate(layers)
    cos = row_cosines(full, cand)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "mean_layers": float(layer.mean()),
            "histogram": {str(k): int((layer == k).sum()) for k in sorted(set(layer.tolist()))}}


def speed_rows(name: str, lat: dict, batch: int) -> list[str]:
    full, ee = lat["full"], lat["early-exit"]
    sp, lo, hi = paired_speedup(full, ee)
    f, e = summarize(full.all), summarize(ee.all)
    return [f"| {name} | {batch} | {f['p50']:.2f} | {e['p50']:.2f} | {e['p90']:.2f} | {sp:.2f}x [{lo:.2f}-{hi:.2f}] | "
            f"{verdict_of(lo, hi)} |"]


def policy_table(ee_net, tokenizer, calib, test, label2id, budget: Budget) -> list[str]:
    """Every classifier policy, with one shared and with per-exit thresholds, calibrated on the same
    heads (calibration rows), judged on test rows."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    cal_out = exit_outputs(ee_net, tokenizer, calib[0], max_length=128, input_names=names)
    test_out = exit_outputs(ee_net, tokenizer, test[0], max_length=128, input_names=names)
    y_cal = np.asarray([label2id[x] for x in calib[1]])
    y_test = np.asarray([label2id[x] for x in test[1]])
    lines = ["| policy | thresholds | layers (calibration) | accuracy drop (calibration) | layers (test) | "
             "layer share (test) | accuracy drop (test) | agreement (test) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("entropy", "maxprob", "patience"):
        for mode in ("shared", "per-exit"):
            policy = calibrate(name, "sequence-classification", ee_net.exit_layers, cal_out,
                               single_token_mask(cal_out), budget, y_cal, thresholds=mode)
            res = evaluate_policy(policy, test_out, single_token_mask(test_out), y_test)
            shown = (f"{policy.threshold:.4g}" if policy.thresholds is None
                     else "per exit: " + ", ".join(f"{t:.3g}" for t in policy.thresholds))
            lines.append(f"| {name} | {shown} | {policy.calibration['expected_layers']:.2f} | "
                         f"{policy.calibration['accuracy_drop']:+.4f} | {res['expected_layers']:.2f} | "
                         f"{res['expected_layers'] / ee_net.exit_layers[-1]:.1%} | "
                         f"{res['accuracy_drop']:+.4f} | {res['agreement']:.4f} |")
    return lines


def _thresholds_text(policy: str, report: dict) -> str:
    if report.get("thresholds") is None:
        return f"{policy} (threshold {report['threshold']:.4g})"
    pairs = ", ".join(f"{layer}: {t:.3g}" for layer, t in zip(report["exit_layers"], report["thresholds"]))
    return f"{policy} (thresholds per exit layer {pairs})"


def report_lines(args, argv, rec: dict, summary: dict, classifier: tuple, encoder: tuple) -> list[str]:
    """The report's head: the classifier, the results table, calibration and training; (report, quality,
    seconds) of the classifier's and the encoder's early-exit pass."""
    report, cq, ee_seconds = classifier
    enc_report, eq, enc_seconds = encoder
    return [
        "# Early exit on MiniLM (ONNX Runtime CPU)", "",
        f"Command: `{results.command_line('early_exit_minilm.py', argv)}`  ",
        f"{machine.line(rec)} onnxruntime {rec['libraries'].get('onnxruntime')}, {time.strftime('%Y-%m-%d')}. "
        "Timings on this machine are noisy (±20-30 % run to run): read latencies with their intervals. One run; "
        "speedups paired by round.", "",
        "## The classifier", "",
        f"MiniLM-L6 + classification head, fine-tuned by `bench/wordnet_classifier.py` on the "
        f"{len(summary['classes'])} most frequent WordNet categories ({', '.join(summary['classes'])}); "
        f"{summary['train_rows']} training rows, {summary['steps']} steps. Test accuracy "
        f"**{summary['test_accuracy']:.4f}** on 2,000 held-out rows (majority class {summary['majority_class_share']:.4f}).", "",
        "## Results", "",
        "| model | policy | budget | avg layers (of 6) | layer share | quality, full model | quality, early exit | change |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        f"| classifier | {_thresholds_text(args.policy, report)} | {args.budget} | {cq['mean_layers']:.2f} | "
        f"{cq['mean_layers'] / 6:.0%} | accuracy {cq['accuracy_full']:.4f} | accuracy {cq['accuracy']:.4f} | "
        f"{cq['accuracy'] - cq['accuracy_full']:+.4f} (agreement {cq['agreement']:.4f}) |",
        f"| encoder | {_thresholds_text('agreement', enc_report)} | {args.encoder_budget} | {eq['mean_layers']:.2f} | "
        f"{eq['mean_layers'] / 6:.0%} | cosine 1.0 | cosine {eq['cosine']:.4f} (min {eq['cosine_min']:.3f}) | "
        f"{eq['cosine'] - 1:+.4f} |", "",
        f"Test-set exit histograms (layers: samples): classifier {cq['histogram']}; encoder {eq['histogram']}.  ",
        f"Calibration (1,500 rows): classifier {report['calibration']['expected_layers']:.2f} layers, accuracy drop "
        f"{report['calibration']['accuracy_drop']:+.4f}; encoder {enc_report['calibration']['expected_layers']:.2f} layers, "
        f"cosine {enc_report['calibration']['cosine']:.4f}.  ",
        f"Exit-head training: classifier {report['steps_run']} steps, exit agreement with the final layer "
        f"{report['exit_agreement_before']:.3f} → {report['exit_agreement_after']:.3f} ({ee_seconds:.0f} s for the whole pass "
        f"incl. export); encoder {enc_report['steps_run']} steps, exit cosine {enc_report['exit_agreement_before']:.3f} → "
        f"{enc_report['exit_agreement_after']:.3f} ({enc_seconds:.0f} s).  ",
        "Segment validation (max abs diff ONNX vs PyTorch per segment): classifier "
        + ", ".join(f"{s['max_abs']:.1e}" for s in report["segment_validation"]) + "; encoder "
        + ", ".join(f"{s['max_abs']:.1e}" for s in enc_report["segment_validation"]) + ".", "",
        "## Latency (ONNX Runtime CPU, test sentences padded to the longest in each batch)", "",
        "| model | batch | full p50 ms | early exit p50 ms | early exit p90 ms | speedup [95% CI] | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rec = machine.record(args.threads)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    started = time.perf_counter()
    if not (args.classifier / "config.json").exists():
        build_classifier(args.classifier, steps=args.classifier_steps)
    summary = json.loads((args.classifier / "wordnet-classifier.json").read_text())
    splits = wordnet_splits(len(summary["classes"]))
    label2id = {n: i for i, n in enumerate(summary["classes"])}
    export = get_pass("export")

    # -- classifier ------------------------------------------------------------------------
    clf = es.load(args.classifier)
    cal_texts, cal_labels = splits.calibration
    tr_texts, tr_labels = splits.train
    ctx = Context(texts=cal_texts + tr_texts[:args.train_rows], labels=cal_labels + tr_labels[:args.train_rows])
    t0 = time.perf_counter()
    ee = es.compress.early_exit(clf, ctx, policy=args.policy, budget=args.budget, validation=len(cal_texts),
                                steps=args.steps, lr=1e-3, max_length=64, thresholds=args.thresholds)
    ee_seconds = time.perf_counter() - t0
    report = ee.lineage[-1]["report"]
    full = export()(clf, Context())
    test_texts, test_labels = splits.test
    cq = classifier_quality(ee, full, test_texts, test_labels, label2id)
    from edgesmith.early_exit.runtime import load_network

    policies = policy_table(load_network(ee), clf.tokenizer, splits.calibration, splits.test, label2id,
                            Budget.parse(args.budget))
    clf_lat = {b: latency({"full": full, "early-exit": ee}, test_texts, clf.tokenizer, b, args) for b in (1, 8)}

    # -- encoder ---------------------------------------------------------------------------
    enc = es.load("minilm")
    t0 = time.perf_counter()
    ee_enc = es.compress.early_exit(enc, Context(texts=cal_texts + tr_texts[:args.train_rows]), policy="agreement",
                                    budget=args.encoder_budget, validation=len(cal_texts),
                                    steps=args.encoder_steps, lr=1e-3, max_length=64, thresholds=args.thresholds)
    enc_seconds = time.perf_counter() - t0
    enc_report = ee_enc.lineage[-1]["report"]
    full_enc = export()(enc, Context())
    eq = encoder_quality(ee_enc, full_enc, test_texts)
    enc_lat = {b: latency({"full": full_enc, "early-exit": ee_enc}, test_texts, enc.tokenizer, b, args) for b in (1, 8)}

    # -- report ----------------------------------------------------------------------------
    machine.finish(rec)
    lines = report_lines(args, argv, rec, summary, (report, cq, ee_seconds), (enc_report, eq, enc_seconds))
    for b in (1, 8):
        lines += speed_rows("classifier", clf_lat[b], b)
    for b in (1, 8):
        lines += speed_rows("encoder", enc_lat[b], b)
    lines += ["", "Per-segment mean ms per run during the timed loop (segment 1 = embeddings + layers 1-2):", ""]
    for name, lat in (("classifier", clf_lat), ("encoder", enc_lat)):
        for b in (1, 8):
            st = lat[b]["_stats"]["early-exit"]
            seg = ", ".join("-" if ms is None else f"{ms:.2f}" for ms in st["segment_ms"])
            lines.append(f"- {name}, batch {b}: {seg} ms; rows per segment {st['segment_rows']}; "
                         f"mean layers {st['mean_layers']:.2f}")
    lines += ["", f"## Every classifier policy on the same heads ({args.budget})", ""]
    lines += policies
    lines += ["", f"Total benchmark time {time.perf_counter() - started:.0f} s."]
    doc = {"command": results.command_line("early_exit_minilm.py", argv), "created": results.now(), "machine": rec,
           "classifier": {"quality": cq, "report_calibration": report["calibration"]},
           "encoder": {"quality": eq, "report_calibration": enc_report["calibration"]},
           "latency_ms": {name: {str(b): {k: t.rounds for k, t in lat[b].items() if k != "_stats"} for b in lat}
                          for name, lat in (("classifier", clf_lat), ("encoder", enc_lat))},
           "markdown": "\n".join(lines)}
    _, md = results.write(args.out, doc, lambda d: d["markdown"])
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
