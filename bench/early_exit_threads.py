"""Benchmark: ONNX Runtime thread-pool settings for the early-exit controller's segment sessions.

Times the full MiniLM encoder as one ONNX graph against its five early-exit segments run one after
another (every sample through every segment: the controller's worst case), with each segment
session's pool spinning (ORT's default), not spinning, or spinning and stopping when a run returns
(``session.force_spinning_stop``, what ``edgesmith.early_exit.runtime`` uses). Real sentences,
batch 1 and 8, blocks of 40 distinct batches in 6 rotating rounds (``bench.core.rounds``); medians in
ms. Writes ``--out`` (bench/results/early_exit_threads.md) and its JSON.

    .venv/bin/python bench/early_exit_threads.py --work runs/bench-threads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

import edgesmith as es
from bench.core import cli, machine, results
from bench.core.rounds import run_rounds
from edgesmith.artifacts import load
from edgesmith.data import builtin_corpus
from edgesmith.inputs import tokenize
from edgesmith.passes import Context

CONFIGS = {"spin (ORT default)": {}, "no spinning": {"session.intra_op.allow_spinning": "0"},
           "spin, stop after run": {"session.force_spinning_stop": "1"}}
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def artifacts(work: Path):
    """An early-exit MiniLM encoder (heads barely trained: only latency matters here) and the full graph."""
    ee_dir, full_dir = work / "early-exit", work / "full"
    if not (ee_dir / "policy.json").exists():
        enc = es.load("minilm")
        texts = builtin_corpus(limit=600)
        es.compress.early_exit(enc, Context(texts=texts, progress=False), steps=2, validation=100, max_length=64,
                               budget="cosine=0.5").save(ee_dir)
        es.export.to_onnx(enc).save(full_dir)
    return load(ee_dir), full_dir / "model.onnx"


def session(path, entries: dict[str, str], threads: int):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    for key, value in entries.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def render(doc: dict[str, Any]) -> str:
    keys = ["full", *CONFIGS]
    lines = [f"| batch | full graph | {' | '.join(f'5 segments, {n}' for n in CONFIGS)} |",
             "|---:|---:|" + "---:|" * len(CONFIGS)]
    for batch, medians in doc["medians_ms"].items():
        lines.append(f"| {batch} | " + " | ".join(f"{medians[k]:.2f} ms" for k in keys) + " |")
    return "\n".join(["# Thread pools of the early-exit segment sessions (ONNX Runtime CPU)", "",
                      f"Command: `{doc['command']}`  ", machine.line(doc["machine"]), "",
                      "The packaged MiniLM encoder as one ONNX graph against its five early-exit segments run one "
                      "after another (every sample through every segment: the controller's worst case), real "
                      f"sentences, 40 distinct batches per block, {doc['rounds']} rounds with the order rotated; "
                      "medians.", "", *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/bench-threads"))
    cli.add_timing_args(p, rounds=6, threads=2)
    cli.add_output_args(p, "early_exit_threads")
    args = p.parse_args(argv)
    cli.check_positive(p, args, "rounds", "threads")
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    rec = machine.record(args.threads)
    torch.set_num_threads(args.threads)
    ee, full_path = artifacts(args.work)
    segments = ee.policy_data["segments"]
    chains = {name: [session(path, entries, args.threads) for path in ee.segment_paths]
              for name, entries in CONFIGS.items()}
    full = session(full_path, {}, args.threads)
    texts = builtin_corpus(limit=2000)[1000:]

    def chain(sessions, feeds):
        current = feeds
        for sess, seg in zip(sessions, segments):
            out = sess.run(seg["outputs"], {n: current[n] for n in seg["inputs"]})
            if len(out) == 2:
                current = {"hidden_in": out[0], "attention_mask": feeds["attention_mask"]}

    medians: dict[str, dict[str, float]] = {}
    for batch in (1, 8):
        feeds = [tokenize(ee.tokenizer, texts[i * batch:(i + 1) * batch], input_names=NAMES) for i in range(40)]
        runs = {"full": lambda i: full.run(None, feeds[i % len(feeds)]),
                **{n: (lambda i, s=s: chain(s, feeds[i % len(feeds)])) for n, s in chains.items()}}
        timed = run_rounds(runs, rounds=args.rounds, block=len(feeds), warmup=3)
        medians[str(batch)] = {k: float(np.median(t.all)) for k, t in timed.items()}
    doc = {"command": results.command_line("early_exit_threads.py", argv), "created": results.now(),
           "rounds": args.rounds, "medians_ms": medians, "machine": machine.finish(rec)}
    _, md = results.write(args.out, doc, render)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
