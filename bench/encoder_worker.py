"""One encoder contender in its own process (edgesmith's ``.venv``), timed block by block.

The encoder comparison (``harness.py``) starts one worker per contender, so each runtime runs with its
own threading in a process of its own (PyTorch's OpenMP pool never shares a process with ONNX Runtime's),
and its peak RSS is its own. Protocol (JSON lines, see ``bench/core/workers.py``):

- first line ``{"ready": true, "load_s", "info": {"runtime", "providers", "options", "input_names"}}``;
- ``{"op": "feeds", "key": K, "path": NPZ}``: the distinct input batches of a shape, saved by the
  orchestrator (``i<n>__<input name>`` arrays), kept under ``K``;
- ``{"op": "block", "key": K, "n": N, "warmup": W}`` → ``{"ms": [...]}``: W untimed then N timed runs,
  run ``i`` on batch ``i % count`` (``bench.core.rounds.timed_block``, the in-process timing, unchanged);
- ``{"op": "stats"}`` → ``{"peak_rss_mb"}``; ``{"op": "quit"}``.

    .venv/bin/python bench/encoder_worker.py serve --artifact FOLDER_OR_NAME --runtime onnxruntime --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.core.rounds import timed_block
from bench.llm_worker import memory


def open_artifact(where: str, kind: str | None):
    """An edgesmith artifact folder or model name; ``kind`` onnx for a bare folder with a model.onnx
    (Optimum's files, wrapped) that has no edgesmith.json."""
    from edgesmith.artifacts import META_FILE, OnnxModel, load

    path = Path(where)
    if kind == "onnx" and path.is_dir() and not (path / META_FILE).exists():
        return OnnxModel(task="feature-extraction", name=path.name, folder=path)
    return load(where)


def feeds_of(path: str) -> list[dict]:
    import numpy as np

    with np.load(path) as data:
        count = 1 + max(int(k.split("__", 1)[0][1:]) for k in data.files)
        return [{k.split("__", 1)[1]: data[k] for k in data.files if k.startswith(f"i{i}__")} for i in range(count)]


def serve(args: argparse.Namespace) -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed from now on goes to stderr
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        from edgesmith.runtimes.base import get_runtime

        t0 = time.perf_counter()
        if args.runtime == "torch":
            import torch

            torch.set_num_threads(args.threads)
        session = get_runtime(args.runtime).load(open_artifact(args.artifact, args.kind), threads=args.threads)
        load_s = time.perf_counter() - t0
    except Exception as exc:
        traceback.print_exc()
        say({"ready": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"})
        return 1
    say({"ready": True, "load_s": load_s, "info": {
        "runtime": session.runtime, "providers": list(session.providers),
        "options": dict(getattr(session, "options", {}) or {}), "input_names": list(session.input_names)}})
    feeds: dict[str, list[dict]] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            op = req.get("op")
            if op == "quit":
                say({"ok": True})
                break
            if op == "feeds":
                feeds[req["key"]] = feeds_of(req["path"])
                say({"count": len(feeds[req["key"]])})
            elif op == "block":
                batches = feeds[req["key"]]
                say({"ms": timed_block(lambda i: session.run(batches[i % len(batches)]), int(req["n"]),
                                       int(req["warmup"]))})
            elif op == "stats":
                say(memory())
            else:
                say({"error": f"unknown op {op!r}"})
        except Exception as exc:
            traceback.print_exc()
            say({"error": f"{type(exc).__name__}: {exc}"[:400]})
    session.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["serve"])
    p.add_argument("--artifact", required=True, help="an edgesmith artifact folder or a model name (minilm)")
    p.add_argument("--runtime", required=True, help="the edgesmith runtime that opens it (torch, onnxruntime)")
    p.add_argument("--kind", choices=["onnx"], help="onnx: a bare folder with a model.onnx and a tokenizer")
    p.add_argument("--threads", type=int, default=2)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
