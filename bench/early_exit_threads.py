"""Benchmark: ONNX Runtime thread-pool settings for the early-exit controller's segment sessions.

Times the full MiniLM encoder as one ONNX graph against its five early-exit segments run one after
another (every sample through every segment: the controller's worst case), with each segment
session's pool spinning (ORT's default), not spinning, or spinning and stopping when a run returns
(``session.force_spinning_stop``, what ``edgesmith.early_exit.runtime`` uses). Real sentences,
batch 1 and 8, blocks of 40 distinct batches in 6 rounds with the order rotated; medians in ms.

    .venv/bin/python bench/early_exit_threads.py --work runs/bench-threads
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import edgesmith as es
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/bench-threads"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
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

    print(f"| batch | full graph | {' | '.join(f'5 segments, {n}' for n in CONFIGS)} |")
    print("|---:|---:|" + "---:|" * len(CONFIGS))
    for batch in (1, 8):
        feeds = [tokenize(ee.tokenizer, texts[i * batch:(i + 1) * batch], input_names=NAMES) for i in range(40)]
        runs = {"full": lambda f: full.run(None, f),
                **{n: (lambda f, s=s: chain(s, f)) for n, s in chains.items()}}
        times: dict[str, list[float]] = {k: [] for k in runs}
        keys = list(runs)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                for f in feeds[:3]:
                    runs[key](f)
                for f in feeds:
                    t0 = time.perf_counter()
                    runs[key](f)
                    times[key].append((time.perf_counter() - t0) * 1000.0)
        print(f"| {batch} | " + " | ".join(f"{np.median(times[k]):.2f} ms" for k in keys) + " |")


if __name__ == "__main__":
    main()
