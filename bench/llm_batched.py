"""Batched generation on SmolLM2-135M: aggregate decode tokens/s, each request's time to first
token and time per output token at batch 1, 2, 4, 8 — static batches of mixed-length prompts (all
requests arrive together; lengths spread ±50 % around --prompt-tokens, from the shipped corpus) —
for edgesmith's ONNX loop (the dynamo FP32 export, or its exact GGUF-repacked int4 with
``--onnx dynamo-gguf``), PyTorch FP32 and llama.cpp (the shipped Q4_1 file, and any ``--gguf
LABEL=FILE``, e.g. a Q4_0 from ``edgesmith export smollm2 --to gguf --quant q4_0``).

Each contender is measured as ``edgesmith profile ART --batch 1,2,4,8`` measures it
(:func:`edgesmith.profiling.batched.profile_batched`): a worker process of its own per round, every
batch size in that worker on one session (room for the largest batch made first), the runtime's own
threading with ``--threads``. Rounds rotate the contenders' order; each number is the median over
rounds with a bootstrap interval, and the scaling (batch N against batch 1) is paired by round.

    .venv/bin/python bench/llm_batched.py --rounds 3 --new-tokens 32
    .venv/bin/python bench/llm_batched.py --onnx dynamo-gguf --gguf "Q4_0=out/q4_0/model.gguf"

Writes bench/results/llm_batched.md and .json (CPU model, ISA, load average at start and end).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.core import cli, machine, results
from bench.core.rounds import median_ci, rotation

STEM = "llm_batched"
GOAL_SCALING = 2.5  # issue 24: aggregate decode at batch 4 >= 2.5x batch 1


def contenders(args) -> dict[str, dict[str, Any]]:
    """key -> {label, artifact, runtime}: what each worker loads (the ONNX folder built once, cached)."""
    import edgesmith as es
    from edgesmith.runtimes.llamacpp import load_gguf_file

    out: dict[str, dict[str, Any]] = {}
    if args.onnx:
        from bench.llm_contenders import TABLE, Sources

        folder = TABLE[args.onnx].make(Sources(threads=args.threads))
        out[f"onnx-{args.onnx}"] = {"label": f"edgesmith loop, ONNX Runtime: {TABLE[args.onnx].label}",
                                    "artifact": es.load(folder), "runtime": "onnxruntime", "path": str(folder)}
    if not args.skip_torch:
        out["torch-fp32"] = {"label": "PyTorch FP32 eager (edgesmith loop, left padding)", "artifact": es.load("smollm2"),
                             "runtime": "torch", "path": "smollm2"}
    out["llamacpp-q4_1"] = {"label": "llama.cpp Q4_1 (the shipped file), one llama_decode for all rows",
                            "artifact": load_gguf_file("smollm2"), "runtime": "llamacpp", "path": "smollm2"}
    for spec in args.gguf:
        label, _, file = spec.partition("=")
        out[f"llamacpp-{label}"] = {"label": f"llama.cpp {label} ({file})", "artifact": load_gguf_file(file),
                                    "runtime": "llamacpp", "path": file}
    return out


def measure(args, entries: dict[str, dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """Per contender and batch size, one value per round: aggregate tok/s, TTFT, ms per output token."""
    from edgesmith.profiling.batched import profile_batched

    rows: dict[str, dict[str, Any]] = {k: {str(b): {"decode_tokens_per_s": [], "ttft_ms": [], "tpot_ms": []}
                                           for b in batches} for k in entries}
    for r in range(args.rounds):
        for key in rotation(list(entries), r):
            entry = entries[key]
            profiles = profile_batched(entry["artifact"], entry["runtime"], batch=batches,
                                       prompt_tokens=[args.prompt_tokens], new_tokens=args.new_tokens, warmup=1,
                                       rounds=1, threads=args.threads, label=key)
            for prof in profiles:
                gen = prof.generation
                cell = rows[key][str(prof.shapes.batch)]
                cell["decode_tokens_per_s"] += gen.decode_tokens_per_s
                cell["ttft_ms"] += gen.ttft_of(args.prompt_tokens)
                cell["tpot_ms"] += gen.batched.time_per_output_token_ms
                cell["prompt_tokens"] = gen.batched.row_prompt_tokens
                cell["peak_rss_mb"] = max(cell.get("peak_rss_mb") or 0, gen.peak_rss_mb or 0) or None
                entry.setdefault("options", prof.runtime.options)
                entry.setdefault("loop", gen.batched.loop)
        print(f"round {r + 1}/{args.rounds} load {machine.load_average()[0]:.2f}", file=sys.stderr)
    return rows


def summarize(rows: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """Medians with intervals per cell; scaling per batch size against batch 1, paired by round."""
    out: dict[str, Any] = {}
    for key, by_batch in rows.items():
        one = by_batch.get("1", {}).get("decode_tokens_per_s")
        out[key] = {}
        for b in batches:
            cell = by_batch[str(b)]
            scaling = [v / base for v, base in zip(cell["decode_tokens_per_s"], one)] if one else []
            out[key][str(b)] = {"decode_tokens_per_s": median_ci(cell["decode_tokens_per_s"]),
                                "ttft_ms": median_ci(cell["ttft_ms"]), "tpot_ms": median_ci(cell["tpot_ms"]),
                                "scaling": median_ci(scaling), "prompt_tokens": cell.get("prompt_tokens"),
                                "peak_rss_mb": cell.get("peak_rss_mb")}
    return out


def _ci(value: list[float] | None, fmt: str = "{:.1f}") -> str:
    if not value:
        return "-"
    mid, low, high = value
    return f"{fmt.format(mid)} [{fmt.format(low)}-{fmt.format(high)}]"


def _best(summary: dict[str, Any], at: str) -> tuple[str, float] | None:
    scaled = [(k, v[at]["scaling"][0]) for k, v in summary.items() if at in v and v[at]["scaling"]]
    return max(scaled, key=lambda kv: kv[1]) if scaled else None


def _why(doc: dict[str, Any], at: str) -> list[str]:
    """Per contender: what a step costs at batch ``at`` against batch 1 (the weights are read once per
    step for every row, so a step that costs little more is the runtime that scales)."""
    lines = []
    for key, by_batch in doc["summary"].items():
        one, many = by_batch.get("1", {}).get("tpot_ms"), by_batch.get(at, {}).get("tpot_ms")
        if one and many:
            lines.append(f"- {key}: a decode step takes {one[0]:.1f} ms at batch 1 and {many[0]:.1f} ms at batch {at} "
                         f"({many[0] / one[0]:.2f}x for {at}x the tokens); the batch's TTFT "
                         f"{by_batch['1']['ttft_ms'][0]:.0f} -> {by_batch[at]['ttft_ms'][0]:.0f} ms.")
    return lines


def render(doc: dict[str, Any]) -> str:
    batches = [str(b) for b in doc["batches"]]
    out = ["# Batched generation: SmolLM2-135M, static batches of mixed-length prompts", "",
           machine.line(doc["machine"]), "",
           f"Command: `{doc['command']}`. Prompts {doc['prompt_tokens']} tokens ±50 % (mixed in every batch), "
           f"{doc['new_tokens']} new tokens (greedy, EOS ignored), {doc['rounds']} rotating rounds, each contender in "
           "a worker process of its own per round. Medians over rounds [95 % bootstrap interval]. TTFT is each "
           "request's: all requests arrive together, so it is the batch's prefill plus its first token.", ""]
    if doc.get("provisional"):
        out += [f"**Provisional**: {doc['provisional']}", ""]
    out += ["| contender | batch | prompt tokens | aggregate decode tok/s | vs batch 1 | TTFT ms | ms per output token "
            "| peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for key, by_batch in doc["summary"].items():
        for b in batches:
            cell = by_batch[b]
            lengths = cell["prompt_tokens"] or []
            spread = f"{min(lengths)}-{max(lengths)}" if len(lengths) > 1 else "".join(map(str, lengths))
            rss = "-" if not cell["peak_rss_mb"] else f"{cell['peak_rss_mb']:.0f}"
            out.append(f"| {key} | {b} | {spread} | {_ci(cell['decode_tokens_per_s'])} | "
                       f"{_ci(cell['scaling'], '{:.2f}')}x | {_ci(cell['ttft_ms'], '{:.0f}')} | "
                       f"{_ci(cell['tpot_ms'], '{:.2f}')} | {rss} |")
    at = "4" if "4" in batches else batches[-1]
    best = _best(doc["summary"], at)
    if best is not None:
        met = "met" if best[1] >= GOAL_SCALING else "not met"
        low = doc["summary"][best[0]][at]["scaling"][1]
        tied = [k for k, v in doc["summary"].items()
                if k != best[0] and v.get(at, {}).get("scaling") and v[at]["scaling"][2] >= low]
        caveat = (f" Its interval overlaps {', '.join(tied)}'s: at this run's noise the ranking is not settled."
                  if tied else "")
        out += ["", f"**Scales best: {best[0]}** — batch {at} decodes {best[1]:.2f}x the aggregate tokens/s of batch 1 "
                f"(median of the per-round ratios; issue 24's goal ≥ {GOAL_SCALING}x at batch 4: {met}).{caveat}",
                "", "Why, from the step times (a step gives every request one token):", ""]
        out += _why(doc, at)
        out += ["", "The mechanism these step times read as: a decode step reads every weight once whatever the "
                "batch, so where a batch-1 step is bound by reading weights the extra rows come almost free until the "
                "matrix products turn compute-bound (FP32: ~540 MB of weights per step); a 4-bit file reads about a "
                "quarter of those bytes, so its batch-1 step is already short and each extra row's arithmetic "
                "(per-row dequantized dot products, attention over each row's own cache) shows sooner. Prefill is "
                "the other side: every request waits for the whole batch's prompts, so TTFT grows with the batch."]
    out += ["", "Contenders: " + "; ".join(f"{k}: {v['label']} ({v.get('loop', '')})" for k, v in doc["contenders"].items())]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_timing_args(parser, rounds=3, threads=2)
    cli.add_output_args(parser, STEM)
    parser.add_argument("--batch", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="center of the mixed prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--onnx", default="dynamo-fp32", help="bench/llm_contenders.py key of the ONNX folder "
                        "(dynamo-fp32, dynamo-gguf); empty: none")
    parser.add_argument("--gguf", action="append", default=[], help="LABEL=FILE.gguf, another llama.cpp contender")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--provisional", default="", help="a note printed above the table (e.g. the machine's load)")
    args = parser.parse_args(argv)
    cli.check_positive(parser, args, "threads", "rounds", "prompt_tokens", "new_tokens")
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    logging.basicConfig(level=logging.WARNING)
    from edgesmith.profiling.batched import parse_batches

    batches = parse_batches(args.batch)
    rec = machine.record(args.threads)
    entries = contenders(args)
    rows = measure(args, entries, batches)
    machine.finish(rec)
    doc = {"command": results.command_line("llm_batched.py", argv), "machine": rec, "batches": batches,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "provisional": args.provisional, "rounds_raw": rows, "summary": summarize(rows, batches),
           "contenders": {k: {key: v for key, v in e.items() if key != "artifact"} for k, e in entries.items()},
           "created": results.now()}
    results.write(args.out, doc, render)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
