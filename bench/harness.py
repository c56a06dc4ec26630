"""The top-level benchmark: edgesmith against what users would pick instead, side by side, in one run.

Contenders (the packaged MiniLM-L6 by default, ONNX Runtime CPU unless stated): PyTorch FP32 eager;
Hugging Face Optimum (export, ORTOptimizer O2, ORTQuantizer dynamic INT8 for this CPU, produced in
its own venv ``bench/.venv-optimum`` and timed here with edgesmith's ORT session settings);
edgesmith ONNX FP32, INT8 dynamic per-channel, INT8 static accuracy-aware, pruned + distilled +
INT8, early exit + INT8 (rows whose passes do not exist yet say "not built yet").

Every contender is timed in a worker process of its own (``encoder_worker.py``: its runtime's own
threading, its own peak memory), in rounds with a rotating order (bench/core/rounds.py), on the same
real sentences padded to the same length, with the same thread count. Writes the raw
profiles (edgesmith's Profile schema) and a summary JSON under ``--profiles-dir`` and rewrites
BENCHMARKS.md (``--out``) with the machine, this comparison and ``bench/results/*.md``.

    .venv/bin/python bench/harness.py                 # the full run (make bench)
    .venv/bin/python bench/harness.py --quick --model PATH --out /tmp/B.md --profiles-dir /tmp/p
    .venv/bin/python bench/harness.py --render-only   # rebuild BENCHMARKS.md from the last summary
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # as a script: the repo root, so `bench` imports (after the venv and PYTHONPATH)

from bench import benchmarks_md, optimum_env
from bench import contenders as cs
from bench.core import encoder_runs, results, workers
from bench.core import machine as machine_record
from bench.core.rounds import Timed, paired_speedup, run_block_rounds

log = logging.getLogger("bench.harness")

QUICK = {"rounds": 2, "block": 2, "warmup": 1, "eval_texts": 24, "batches": "1,2", "seq": 16, "distill_steps": 2,
         "data_limit": 32}
FULL = {"rounds": 20, "block": 10, "warmup": 2, "eval_texts": 512, "batches": "1,8", "seq": 128,
        "distill_steps": 400, "data_limit": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few iterations, small inputs, no Optimum venv (for the test; give --model a tiny model)")
    p.add_argument("--model", default="minilm", help="model (edgesmith name or Hugging Face folder)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every runtime")
    p.add_argument("--seq", type=int, help="tokens per row (default 128; quick 16)")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8; quick 1,2)")
    p.add_argument("--rounds", type=int, help="measurement rounds (default 20; quick 2)")
    p.add_argument("--block", type=int, help="timed runs per contender per round (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed runs before each block (default 2; quick 1)")
    p.add_argument("--shape-budget", type=float, default=240.0,
                   help="seconds of timing per batch size: fewer rounds (at least 3) when the machine is slow")
    p.add_argument("--eval-texts", type=int, help="held-out sentences for fidelity (default 512; quick 24)")
    p.add_argument("--data-limit", type=int, help="corpus rows of the recipes' data (calibration; default 512)")
    p.add_argument("--prune-heads", type=float, default=0.25)
    p.add_argument("--prune-ffn", type=float, default=0.25)
    p.add_argument("--distill-steps", type=int, help="distillation steps (default 400; quick 2)")
    p.add_argument("--max-drop", type=float, default=0.01, help="cosine drop allowed by the accuracy-aware search")
    p.add_argument("--no-optimum", action="store_true", help="skip the Optimum contenders and the interop check")
    p.add_argument("--rows", help="comma-separated edgesmith row keys to build and time (default: all; e.g. "
                                  "es-int8-dynamic,es-int8-fused); PyTorch and Optimum always run")
    p.add_argument("--optimum-timeout", type=int, default=1800, help="seconds for the Optimum venv's work")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="artifacts, caches and logs")
    p.add_argument("--profiles-dir", type=Path, default=REPO / "profiles" / "bench")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--render-only", action="store_true", help="rebuild --out from the last summary; measure nothing")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = [int(b) for b in str(args.batches).split(",") if b.strip()]
    if args.quick:
        args.no_optimum = True
    return args


def command_line(argv: list[str] | None) -> str:
    return results.command_line("harness.py", argv)


# ---------------------------------------------------------------------------------------------
# Producing the contenders
# ---------------------------------------------------------------------------------------------


def build_contenders(args: argparse.Namespace, source, model_dir: Path) -> tuple[list[cs.Contender], dict]:
    wanted = {k.strip() for k in args.rows.split(",") if k.strip()} if args.rows else None
    es_rows = cs.edgesmith_rows(quick=args.quick, prune_heads=args.prune_heads, prune_ffn=args.prune_ffn,
                                distill_steps=args.distill_steps, max_drop=args.max_drop)
    unknown = sorted((wanted or set()) - {r.key for r in es_rows})
    if unknown:
        print(f"--rows: unknown row(s) {', '.join(unknown)}; use some of {', '.join(r.key for r in es_rows)}",
              file=sys.stderr)
        raise SystemExit(2)
    torch_row = cs.Contender("torch-fp32", "PyTorch FP32 eager", "pytorch", artifact=source,
                             steps=["transformers AutoModel (as shipped)"],
                             size_bytes=cs.torch_size_on_disk(model_dir, source))
    rows = [torch_row]
    optimum: dict[str, Any] = {}
    if args.no_optimum:
        reason = "--quick: no Optimum venv" if args.quick else "--no-optimum"
        rows.append(cs.Contender("optimum", "Hugging Face Optimum", "optimum", cs.SKIPPED, reason))
    else:
        log.info("Optimum venv: %s", optimum_env.VENV_DIR)
        optimum["versions"] = optimum_env.ensure()
        log.info("producing Optimum's artifacts (in its venv)")
        opt_rows, optimum["produce"] = cs.run_optimum(optimum_env.python(), BENCH / "optimum_side.py", model_dir,
                                                      args.work, args.optimum_timeout)
        rows += opt_rows
    for row in es_rows:
        if wanted is not None and row.key not in wanted:
            continue
        log.info("edgesmith: %s", row.label)
        rows.append(cs.run_edgesmith_row(row, model=args.model, work=args.work, data_limit=args.data_limit))
    return rows, optimum


def held_out_texts(n: int) -> list[str]:
    """The last ``n`` corpus sentences: recipes calibrate and train on the first rows, never on these."""
    from edgesmith.data import builtin_corpus

    return builtin_corpus()[-n:]


def measure_quality(rows: list[cs.Contender], texts: list[str], reference: np.ndarray) -> None:
    from edgesmith.quality import embed, fidelity

    for row in rows:
        if not row.measurable:
            continue
        try:
            row.quality = fidelity(reference, embed(row.artifact, texts), k=10)
        except Exception as exc:
            log.exception("fidelity of %s failed", row.key)
            row.status, row.note = cs.FAILED, f"fidelity: {cs._first_line(exc)}"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def start_workers(rows: list[cs.Contender], args) -> dict[str, workers.Worker]:
    """One worker process per measurable contender (``encoder_worker.py``), its runtime's own threading."""
    from edgesmith.runtimes.base import default_runtime_for

    started = {}
    for row in rows:
        if not row.measurable:
            continue
        where = args.model if row.family == "pytorch" else str(row.artifact.folder)
        try:
            started[row.key] = encoder_runs.start(row.key, where, default_runtime_for(row.artifact), args.threads,
                                                  args.work / "worker-logs",
                                                  kind="onnx" if row.family == "optimum" else None)
        except Exception as exc:
            log.exception("cannot start %s", row.key)
            row.status, row.note = cs.FAILED, f"worker: {cs._first_line(exc)}"
    return started


def time_shape(rows: list[cs.Contender], running: dict[str, workers.Worker], texts: list[str], *, batch: int,
               seq: int, rounds: int, block: int, warmup: int, budget_s: float | None, work: Path) -> dict[str, Timed]:
    """The same real sentences at ``batch`` × ``seq`` for every worker, then rotating rounds of blocks."""
    from edgesmith.profiling import build_feeds

    blocks, key = {}, f"b{batch}s{seq}"
    for row in rows:
        if row.key in running:
            worker = running[row.key]
            feeds = build_feeds(row.artifact.tokenizer, encoder_runs.input_names(worker), batch=batch, seq=seq,
                                texts=texts)
            encoder_runs.send_feeds(worker, key, feeds, work / "feeds")
            blocks[row.key] = encoder_runs.block_runner(worker, key)
    log.info("timing batch %d × %d: %d contenders, %d rounds × %d runs", batch, seq, len(blocks), rounds, block)
    return run_block_rounds(blocks, rounds=rounds, block=block, warmup=warmup, time_budget_s=budget_s,
                            on_round=lambda r: log.info("  round %d/%d done", r + 1, rounds))


def optimum_best(rows: list[cs.Contender], timed: dict[str, Timed]) -> str | None:
    """Optimum's fastest variant (median of per-round medians) at ≤ 1 % fidelity loss, else its fastest."""
    measured = [r for r in rows if r.family == "optimum" and r.key in timed]
    if not measured:
        return None
    good = [r for r in measured if benchmarks_md.qualifies(r.quality)] or measured
    return min(good, key=lambda r: float(np.median(timed[r.key].round_medians))).key


def latency_entry(row: cs.Contender, timed: dict[str, Timed], batch: int, best: str | None) -> dict[str, Any]:
    from edgesmith.profiling import summarize

    t = timed[row.key]
    stats = summarize(t.all)
    entry: dict[str, Any] = {"p50": stats["p50"], "p90": stats["p90"], "n": stats["n"],
                             "throughput": batch * 1000.0 / stats["p50"]}
    if "torch-fp32" in timed:
        entry["vs_torch"] = list(paired_speedup(timed["torch-fp32"], t))
    if best is not None:
        entry["vs_optimum"] = list(paired_speedup(timed[best], t))
    return entry


def save_profile(row: cs.Contender, worker: workers.Worker, timed: Timed, *, batch: int, seq: int, args,
                 folder: Path) -> Path:
    """The contender's latencies at this shape as an edgesmith Profile (``edgesmith compare`` reads it);
    the runtime and the peak memory are its worker process's."""
    from edgesmith.profiling import RuntimeInfo, artifact_info
    from edgesmith.profiling.environment import fingerprint
    from edgesmith.profiling.measure import measured_profile

    art = artifact_info(row.artifact)
    art.size_bytes = row.size_bytes if row.size_bytes is not None else art.size_bytes
    info = worker.ready["info"]
    prof = measured_profile(
        label=row.label, artifact=art,
        runtime=RuntimeInfo(name=info["runtime"], providers=info["providers"], options=info["options"]),
        target="cpu-local", environment=fingerprint(threads=args.threads), batch=batch, seq=seq, warmup=args.warmup,
        iterations=len(timed.all), time_budget_s=None, latencies=timed.all,
        peak_host_memory_mb=worker.request(op="stats")["peak_rss_mb"])
    prof.quality = dict(row.quality)
    return prof.save(folder / f"b{batch}s{seq}-{row.key}.json")


# ---------------------------------------------------------------------------------------------
# Goal, interop
# ---------------------------------------------------------------------------------------------


def goal(rows: list[cs.Contender], latency: dict[str, dict[str, dict]], labels: dict[str, str]) -> dict[str, Any]:
    """Batch 1 (and 8): edgesmith's fastest artifact at ≤ 1 % fidelity loss against the goal's marks.

    The goal (issue 19): cosine ≥ 0.99 and recall@10 within 1 % of the source, ≥ 1.5× Optimum's best
    at batch 1 (intermediate mark 1.25×) and ≥ 1.3× at batch 8, no larger than Optimum's best. Each
    condition is reported on its own; ``met`` needs all of them."""
    if "1" not in latency:
        return {}
    at1 = latency["1"]
    good = [r for r in rows if r.family == "edgesmith" and r.key in at1 and benchmarks_md.qualifies(r.quality)
            and "vs_torch" in at1[r.key]]
    if not good:
        return {"best": None, "met": False}
    speed_key = "vs_optimum" if all("vs_optimum" in at1[r.key] for r in good) else "vs_torch"
    best = max(good, key=lambda r: at1[r.key][speed_key][0])
    entry = at1[best.key]
    recall = best.quality.get("recall@10", 0.0)
    out: dict[str, Any] = {"best": best.key, "best_label": best.label, "cosine": best.quality.get("cosine", 0.0),
                           "recall": recall, "recall_met": recall >= benchmarks_md.GOAL_RECALL,
                           "size_mb": best.size_bytes / 1e6 if best.size_bytes is not None else None,
                           "vs_torch": entry["vs_torch"],
                           "torch_met": entry["vs_torch"][0] >= benchmarks_md.GOAL_SPEEDUP_TORCH}
    if "vs_optimum" in entry:
        opt_key = latency["optimum_best"]["1"]
        opt_row = next((r for r in rows if r.key == opt_key), None)
        out.update({"vs_optimum": entry["vs_optimum"], "optimum_label": labels.get(opt_key, "?"),
                    "optimum_met": entry["vs_optimum"][0] >= benchmarks_md.GOAL_SPEEDUP_OPTIMUM,
                    "optimum_intermediate_met": entry["vs_optimum"][0] >= benchmarks_md.GOAL_SPEEDUP_INTERMEDIATE})
        if opt_row is not None and opt_row.size_bytes is not None and best.size_bytes is not None:
            out.update({"optimum_size_mb": opt_row.size_bytes / 1e6, "size_met": best.size_bytes <= opt_row.size_bytes})
        at8 = latency.get("8", {}).get(best.key)
        if at8 and "vs_optimum" in at8:
            out.update({"vs_optimum_b8": at8["vs_optimum"],
                        "optimum_b8_met": at8["vs_optimum"][0] >= benchmarks_md.GOAL_SPEEDUP_OPTIMUM_B8})
    if "optimum_met" not in out:  # None: only half of the goal could be checked (no Optimum contender)
        out["met"] = None if out["torch_met"] else False
    else:
        out["met"] = bool(out["optimum_met"] and out.get("optimum_b8_met", True) and out.get("size_met", True)
                          and out["recall_met"])
    return out


def interop_check(rows: list[cs.Contender], texts: list[str], args) -> dict[str, Any]:
    """edgesmith's ONNX FP32 folder through Optimum's ORTModelForFeatureExtraction (in its venv)."""
    from edgesmith.profiling import build_feeds
    from edgesmith.quality import mean_pool, row_cosines
    from edgesmith.runtimes.base import get_runtime

    if args.no_optimum:
        return {"status": "skipped", "note": "--quick: no Optimum venv" if args.quick else "--no-optimum"}
    fp32 = next((r for r in rows if r.key == "es-fp32" and r.measurable), None)
    if fp32 is None:
        return {"status": "not run", "note": "no edgesmith ONNX FP32 artifact"}
    art = fp32.artifact
    session = get_runtime("onnxruntime").load(art, threads=args.threads)
    feeds = build_feeds(art.tokenizer, session.input_names, batch=8, seq=args.seq, texts=texts)[0]
    ours = session.run(feeds)["last_hidden_state"]
    session.close()
    feeds_path, out_path = args.work / "interop-feeds.npz", args.work / "interop-out.npy"
    np.savez(feeds_path, **feeds)
    done = subprocess.run([str(optimum_env.python()), str(BENCH / "optimum_side.py"), "interop", str(art.folder),
                           str(feeds_path), str(out_path)], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "note": tail[:300]}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = np.load(out_path)
    mask = feeds["attention_mask"]
    cos = row_cosines(mean_pool(ours, mask), mean_pool(theirs, mask))
    return {"status": "ok", "folder": str(art.folder), "optimum_class": info["class"], "shape": list(ours.shape[:2]),
            "max_abs_diff": float(np.abs(ours - theirs).max()), "min_cosine": float(cos.min())}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def render(args, summary: dict[str, Any] | None) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(args.out, benchmarks_md.benchmarks_md(summary, args.results_dir, REPO))
    log.info("wrote %s", args.out)


def run(args, argv: list[str] | None) -> dict[str, Any]:
    import torch

    import edgesmith as es
    from edgesmith.artifacts import resolve_model_path
    from edgesmith.quality import embed

    started = time.perf_counter()
    rec = machine_record.record(args.threads)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.profiles_dir.mkdir(parents=True, exist_ok=True)

    source = es.load(args.model)
    model_dir = resolve_model_path(args.model)
    texts = held_out_texts(args.eval_texts)
    reference = embed(source, texts)

    rows, optimum = build_contenders(args, source, model_dir)
    measure_quality(rows, texts, reference)
    running = start_workers(rows, args)

    latency: dict[str, Any] = {"optimum_best": {}, "rounds_run": {}}
    for batch in args.batch_sizes:
        timed = time_shape(rows, running, texts, batch=batch, seq=args.seq, rounds=args.rounds, block=args.block,
                           warmup=args.warmup, budget_s=args.shape_budget, work=args.work)
        latency["rounds_run"][str(batch)] = min((len(t.rounds) for t in timed.values()), default=0)
        best = optimum_best(rows, timed)
        latency["optimum_best"][str(batch)] = best
        latency[str(batch)] = {r.key: latency_entry(r, timed, batch, best) for r in rows if r.key in timed}
        for row in rows:
            if row.key in timed:
                save_profile(row, running[row.key], timed[row.key], batch=batch, seq=args.seq, args=args,
                             folder=args.profiles_dir)
    for worker in running.values():
        worker.close()

    interop = interop_check(rows, texts, args)
    labels = {r.key: r.label for r in rows}
    summary_rows = []
    for row in rows:
        best_at = [b for b, key in latency["optimum_best"].items() if key == row.key]
        summary_rows.append({
            "key": row.key, "label": row.label, "family": row.family, "status": row.status, "note": row.note,
            "steps": row.steps, "produce_seconds": row.produce_seconds,
            "size_mb": row.size_bytes / 1e6 if row.size_bytes is not None else None,
            "quality": row.quality, "optimum_best_at": best_at,
            "latency": {str(b): latency[str(b)][row.key] for b in args.batch_sizes if row.key in latency[str(b)]}})
    summary = {
        "schema": 1, "command": command_line(argv), "quick": args.quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_record.finish(rec), "optimum_venv": optimum.get("versions") or None},
        "settings": {"model": args.model, "seq": args.seq, "batches": args.batch_sizes, "rounds": args.rounds,
                     "block": args.block, "warmup": args.warmup, "eval_texts": args.eval_texts,
                     "threads": args.threads, "max_drop": args.max_drop, "shape_budget_s": args.shape_budget,
                     "rounds_run": latency["rounds_run"], "process_per_contender": True},
        "rows": summary_rows, "optimum_best": latency["optimum_best"],
        "optimum_errors": (optimum.get("produce") or {}).get("errors", {}),
        "optimum_quantization": (optimum.get("produce") or {}).get("quantization_config"),
        "goal": goal(rows, latency, labels), "interop": interop,
        "load_average": rec["load_average"],
        "wall_seconds": time.perf_counter() - started,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    summary_path = args.profiles_dir / "summary.json"
    if args.render_only:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        render(args, summary)
        return 0
    summary = run(args, argv)
    results.write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    render(args, summary)
    print(benchmarks_md.section(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
