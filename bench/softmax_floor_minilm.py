"""The Softmax floor, measured at the shapes users send (issue 25): MiniLM INT8 with ``softmax_floor``
against the same INT8 without it, interleaved, on this machine.

Both artifacts are the encoder comparison's dynamic INT8 row (per-channel, 8-bit embeddings, no node
metadata: ``contenders.DYNAMIC_INT8``, the ``es-int8-dynamic`` row), one with the quantize pass's
``softmax_floor`` (-80: every last-axis Softmax input floored at rowmax - 80, so padded keys skip
ORT's slow exp path where it has one), one without. Each runs in a worker process of its own
(``encoder_worker.py``), timed in rotating rounds (``bench.core.rounds``), blocks of ``--block`` runs,
on held-out corpus sentences, at:

- batch 1, unpadded (each sentence at its own length);
- batch 8, padded to the longest of the 8;
- batch 1 padded to 128 tokens (the encoder comparison's shape).

The speedup is the floor's over no floor, paired by round (``edgesmith.stats.paired_speedup``); below
1 the floor costs time. Writes ``bench/results/softmax_floor.{json,md}``; the table names the CPU and
its ISA, and the load average, which on a shared machine makes the numbers provisional.

    nice -n 5 .venv/bin/python bench/softmax_floor_minilm.py --rounds 20
    .venv/bin/python bench/softmax_floor_minilm.py --render-only
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.core import cli, encoder_runs, machine, results
from bench.core.rounds import Timed, paired_speedup, run_block_rounds

log = logging.getLogger("bench.softmax_floor")

STEM = "softmax_floor"
FLOOR = -80.0
#: (key, label, batch, tokens per row: None = unpadded / padded to the batch's longest)
SHAPES = (("b1-unpadded", "batch 1, unpadded", 1, None),
          ("b8-longest", "batch 8, padded to the longest", 8, None),
          ("b1-128", "batch 1, padded to 128", 1, 128))
CONTENDERS = {"no-floor": "INT8 dynamic per-channel (8-bit embeddings)",
              "floor": f"the same + softmax_floor {FLOOR:g}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_timing_args(p, rounds=20, threads=2, block=10, warmup=2)
    p.add_argument("--texts", type=int, default=64, help="held-out sentences the inputs cycle through")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "softmax-floor")
    cli.add_output_args(p, STEM)
    args = p.parse_args(argv)
    cli.check_positive(p, args, "threads", "rounds", "block", "texts")
    return args


def build(work: Path) -> dict[str, Any]:
    """The two INT8 artifacts, through the quantize pass, from one FP32 export."""
    import edgesmith as es
    from bench.contenders import DYNAMIC_INT8
    from edgesmith.passes import Context

    options = dict(DYNAMIC_INT8)
    source = es.load("minilm")
    ctx = Context(source=source, workdir=work / "ctx", progress=False)
    fp32 = es.export.to_onnx(source, ctx)
    return {"no-floor": es.compress.quantize(fp32, ctx, **options, softmax_floor=None),
            "floor": es.compress.quantize(fp32, ctx, **options, softmax_floor=FLOOR)}


def feeds_for(tokenizer, input_names: list[str], texts: list[str], batch: int, seq: int | None) -> list[dict]:
    """Batches of ``batch`` consecutive sentences; ``seq`` pads each row to it, None to the batch's longest."""
    from edgesmith.inputs import tokenize

    count = max(1, len(texts) // batch)
    return [tokenize(tokenizer, texts[b * batch:(b + 1) * batch], input_names=input_names, seq=seq)
            for b in range(count)]


def measure(args: argparse.Namespace, artifacts: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    """Each artifact in a worker process of its own (``encoder_worker.py``), the shapes one after another."""
    from edgesmith.stats import summarize, verdict_of

    running = {k: encoder_runs.start(k, a.folder, "onnxruntime", args.threads, args.work / "worker-logs")
               for k, a in artifacts.items()}
    tokenizer = artifacts["no-floor"].tokenizer
    rows = []
    try:
        for key, label, batch, seq in SHAPES:
            feeds = feeds_for(tokenizer, encoder_runs.input_names(running["no-floor"]), texts, batch, seq)
            for worker in running.values():
                encoder_runs.send_feeds(worker, key, feeds, args.work / "feeds")
            log.info("%s: %d rounds x %d runs", label, args.rounds, args.block)
            timed: dict[str, Timed] = run_block_rounds({n: encoder_runs.block_runner(w, key) for n, w in running.items()},
                                                       rounds=args.rounds, block=args.block, warmup=args.warmup)
            speedup = paired_speedup(timed["no-floor"], timed["floor"])
            lengths = [int(f["attention_mask"].shape[1]) for f in feeds]
            real = [float(f["attention_mask"].sum(axis=1).mean()) for f in feeds]
            rows.append({"key": key, "label": label, "batch": batch, "seq": seq,
                         "padded_tokens": float(np.mean(lengths)), "real_tokens": float(np.mean(real)),
                         "p50_ms": {n: summarize(t.all)["p50"] for n, t in timed.items()},
                         "speedup": list(speedup), "verdict": verdict_of(speedup[1], speedup[2]),
                         "rounds": len(timed["floor"].rounds), "rounds_ms": {n: t.rounds for n, t in timed.items()}})
    finally:
        for worker in running.values():
            worker.close()
    return rows


def render(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    load = doc["machine"].get("load_average") or {}
    busy = (load.get("start") or [0])[0] > 0.75 or (load.get("end") or [0])[0] > 0.75
    head = ["shape", "tokens per row (real / as fed)", "no floor p50 ms", "floor p50 ms",
            "floor vs no floor [95% CI]", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lo, mid, hi = r["speedup"][1], r["speedup"][0], r["speedup"][2]
        lines.append(f"| {r['label']} | {r['real_tokens']:.1f} / {r['padded_tokens']:.0f} | {r['p50_ms']['no-floor']:.2f} "
                     f"| {r['p50_ms']['floor']:.2f} | {mid:.3f}x [{lo:.3f}-{hi:.3f}] | {r['verdict']} |")
    return "\n".join([
        "# The Softmax floor at the shapes users send: MiniLM INT8 with and without it",
        "",
        f"Command: `{doc['command']}` ({doc['created']})",
        "",
        machine.line(doc["machine"]),
        "",
        f"MiniLM {CONTENDERS['no-floor']} with `softmax_floor` {FLOOR:g} against the same without it, ONNX Runtime CPU, {s['threads']} threads, "
        f"each in a worker process of its own; {s['rounds']} rotating rounds of {s['block']} timed runs each (after {s['warmup']} untimed) on "
        f"{s['texts']} held-out corpus sentences. The ratio is paired by round (median of no floor's block over "
        "the floor's); above 1 the floor is faster.",
        *(["", "**Provisional:** other jobs shared this machine (load average above). Rerun on a quiet machine "
               "for numbers of record."] if busy else []),
        "",
        *lines,
    ])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    import torch

    from edgesmith.data import builtin_corpus

    torch.set_num_threads(args.threads)
    rec = machine.record(args.threads)
    artifacts = build(args.work)
    texts = builtin_corpus()[-args.texts:]
    rows = measure(args, artifacts, texts)
    doc = {"schema": 1, "command": results.command_line("softmax_floor_minilm.py", argv), "created": results.now(),
           "machine": machine.finish(rec),
           "settings": {"threads": args.threads, "rounds": args.rounds, "block": args.block, "warmup": args.warmup,
                        "texts": args.texts, "floor": FLOOR},
           "contenders": CONTENDERS, "rows": rows}
    _, md = results.write(args.out, doc, render)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
