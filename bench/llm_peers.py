"""The decoder benchmark's peers, side by side on SmolLM2-135M, measured the way edgesmith will be.

Contenders (threads = 2 for everyone unless ``--threads``; greedy; forced length, EOS ignored):

- ``torch-fp32``: PyTorch FP32 eager, manual KV-cache loop (the FP32 source: every agreement,
  KL and top-1 number is measured against it); ``torch-fp32-generate``: the same model through
  Hugging Face ``generate``;
- ``llamacpp-q4_1``: llama.cpp (llama-cpp-python in ``bench/.venv-llamacpp``) on the shipped Q4_1
  GGUF; ``llamacpp-q8_0`` / ``llamacpp-q4_k_m``: on GGUFs made by llama.cpp's own quantizer from
  the dequantized F32 GGUF (like-for-like INT8, and its usual 4-bit K-quant);
- ``ortgenai-int4``: ORT GenAI's model builder ``-p int4 -e cpu`` with its defaults, run by
  ``og.Generator``;
- ``optimum-fp32``: Optimum's ``ORTModelForCausalLM`` export in ``bench/.venv-optimum``
  (``--optimum``; recorded as failed with the reason when the export does not work).

Each contender runs in its own worker process (``llm_worker.py``), loaded once; the orchestrator
sends one block per contender per round — a warm-up generation, then one greedy generation per
prompt length — in an order that rotates every round (``rounds.rotation``), so drift of this
shared machine hits everyone alike. Per contender and prompt length: TTFT and decode tokens/s
per round (medians with 95 % bootstrap intervals over rounds), every per-token latency, peak RSS
(the worker's VmHWM before the held-out logits are read), load time, size on disk, greedy
agreement with the FP32 source over the generated tokens (identical prefix and matches), and
with ``--quality`` the KL divergence, top-1 agreement and perplexity on a held-out passage.

    .venv/bin/python bench/llm_peers.py                       # writes bench/results/llm_peers.{json,md}
    .venv/bin/python bench/llm_peers.py --rounds 5 --new-tokens 128 --optimum
    .venv/bin/python bench/llm_peers.py --only torch-fp32,llamacpp-q4_1 --rounds 2 --json-out /tmp/x.json
    .venv/bin/python bench/llm_peers.py --render-only         # the table again from the raw JSON

The contenders are ``llm_contenders.TABLE`` (one entry each); ``specs()`` makes their artifacts once and
turns them into workers, ``measure(specs, ...)`` returns raw samples per contender (a dict each),
``summarize`` and ``markdown`` turn them into the table, ``llm_profiles`` into generation Profiles
(``profiles/bench-llm/llm_peers/KEY.json``, read by ``edgesmith compare``). ``--folder
KEY=RUNTIME:PATH[=LABEL]`` adds a prebuilt folder (RUNTIME: edgesmith, ortgenai, llamacpp, torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # as a script: the repo root, so `bench` imports (after the venv and PYTHONPATH)

from bench import llm_profiles, llm_sources
from bench.core import cli, workers
from bench.core import machine as machine_record
from bench.core import results as results_io
from bench.core.rounds import Timed, median_ci, paired_speedup, rotation
from bench.llm_contenders import TABLE, VENVS, Contender, Sources, check_keys, folder_contender
from bench.llm_report import FULL_SHARE, REFERENCE, markdown  # the table: llm_report.py

log = logging.getLogger("bench.llm_peers")

DEFAULT = ("torch-fp32", "torch-fp32-generate", "llamacpp-q4_1", "llamacpp-q8_0", "llamacpp-q4_k_m", "ortgenai-int4")


@dataclass
class Spec:
    """One contender: which worker (interpreter + script + arguments) and which mode of it."""

    key: str
    label: str
    family: str
    python: Path
    script: str
    args: list[str]
    worker: str  # contenders with the same worker share one process (same model, two modes)
    mode: str | None = None
    size_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # shown under the table
    error: str | None = None  # set when the contender could not be made: a failed row, no worker


def _size(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.iterdir()
                         if f.is_file() and f.name.endswith((".onnx", ".onnx.data", ".onnx_data", ".safetensors")))
        elif p.exists():
            total += p.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------
# Inputs and contenders
# ---------------------------------------------------------------------------------------------


def specs(keys: list[str], sources: Sources, *, threads: int = 2,
          extra: dict[str, Contender] | None = None) -> tuple[list[Spec], dict[str, str]]:
    """The contenders' workers, their artifacts made once (``llm_contenders``); a contender whose
    artifact cannot be made is a failed row with the reason. Also returns key → the path its worker loads."""
    table = {**TABLE, **(extra or {})}
    check_keys(keys, extra)
    out, models = [], {}
    for key in keys:
        c = table[key]
        spec = Spec(key, c.label, c.family, Path(sys.executable), c.script, [], worker=c.worker or key, mode=c.mode)
        try:
            path = c.make(sources)
            spec.python = VENVS[c.venv]()
            spec.args = ["--model", str(path), "--threads", str(threads)]
            spec.size_bytes = _size(path) if path.exists() else None
            models[key] = str(path)
        except Exception as exc:
            log.exception("%s: its artifact could not be made", key)
            spec.error = f"not made: {_first_line(exc)}"
        spec.notes += sources.notes.get(key, [])
        spec.error = sources.errors.get(key) or spec.error
        out.append(spec)
    return out, models


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


class Worker(workers.Worker):
    """One decoder contender process speaking llm_worker's JSON-lines protocol."""

    def __init__(self, spec: Spec, prompts: str, log_dir: Path, timeout: float) -> None:
        cmd = [str(spec.python), str(BENCH / spec.script), "serve", prompts, *spec.args]
        super().__init__(spec.worker, cmd, log_dir, timeout, cwd=BENCH)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def measure(contenders: list[Spec], prompts: str, *, rounds: int = 3, new_tokens: int = 64,
            lengths: tuple[str, ...] = ("128", "512"), warmup_tokens: int = 8, quality: bool = False,
            work: Path = llm_sources.CACHE / "run", timeout: float = 900.0) -> dict[str, dict[str, Any]]:
    """Start one worker per distinct ``Spec.worker``, run ``rounds`` rotating rounds; raw results per key."""
    results: dict[str, dict[str, Any]] = {}
    workers: dict[str, Worker] = {}
    for spec in contenders:
        results[spec.key] = {"label": spec.label, "family": spec.family, "mode": spec.mode, "worker": spec.worker,
                             "size_bytes": spec.size_bytes, "status": "ok", "notes": list(spec.notes),
                             "runs": {n: [] for n in lengths}}
        if spec.error:
            results[spec.key].update(status="failed", notes=results[spec.key]["notes"] + [spec.error])
            continue
        if spec.worker in workers:
            continue
        try:
            workers[spec.worker] = Worker(spec, prompts, work / "logs", timeout)
            if not workers[spec.worker].ready.get("ready"):
                raise RuntimeError(workers[spec.worker].ready.get("error", "not ready"))
        except Exception as exc:
            log.error("%s cannot start: %s", spec.key, exc)
            results[spec.key].update(status="failed", notes=results[spec.key]["notes"] + [_first_line(exc)])
            workers.pop(spec.worker, None)
    live = [s for s in contenders if results[s.key]["status"] == "ok" and s.worker in workers]
    for spec in live:
        ready = workers[spec.worker].ready
        results[spec.key].update(info=ready.get("info"), import_s=ready.get("import_s"), load_s=ready.get("load_s"),
                                 load_rss_mb=ready.get("rss_mb"))
    keys = [s.key for s in live]
    by_key = {s.key: s for s in live}
    for r in range(rounds):
        for key in rotation(keys, r):
            spec = by_key[key]
            if results[key]["status"] != "ok":
                continue
            w = workers[spec.worker]
            try:
                w.request(op="generate", prompt=lengths[0], new_tokens=warmup_tokens, mode=spec.mode)
                for n in lengths:
                    run = w.request(op="generate", prompt=n, new_tokens=new_tokens, mode=spec.mode)
                    run.update(round=r, load1=machine_record.load_average()[0])
                    results[key]["runs"][n].append(run)
            except Exception as exc:
                log.error("%s failed in round %d: %s", key, r, exc)
                results[key]["status"] = "failed"
                results[key]["notes"].append(f"round {r}: {_first_line(exc)}")
        log.info("round %d/%d done (load %.2f)", r + 1, rounds, machine_record.load_average()[0])
    seen = set()
    for spec in live:
        if spec.worker in seen or results[spec.key]["status"] != "ok":
            continue
        seen.add(spec.worker)
        w = workers[spec.worker]
        try:
            stats = w.request(op="stats")
            for s in live:
                if s.worker == spec.worker:
                    results[s.key]["peak_rss_mb"] = stats["peak_rss_mb"]
            if quality:
                out = work / f"logits-{spec.worker}.npy"
                answer = w.request(op="logits", prompt="heldout", out=str(out))
                for s in live:
                    if s.worker == spec.worker:
                        results[s.key]["logits"] = answer["path"]
        except Exception as exc:
            results[spec.key]["notes"].append(f"after rounds: {_first_line(exc)}")
    for w in workers.values():
        w.close()
    return results


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def agreement(tokens: list[int], reference: list[int]) -> dict[str, int]:
    n = min(len(tokens), len(reference))
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return {"identical_prefix": prefix, "matches": int(sum(a == b for a, b in zip(tokens, reference))), "of": n}


def logit_quality(reference: np.ndarray, logits: np.ndarray, ids: list[int]) -> dict[str, float]:
    """Mean KL(P_ref ‖ Q) per position, top-1 agreement, and Q's perplexity on the next tokens."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    kl, top1, nll = [], [], []
    nxt = np.asarray(ids[1:], dtype=np.int64)
    for start in range(0, reference.shape[0], 64):
        lp, lq = log_softmax(reference[start:start + 64]), log_softmax(logits[start:start + 64])
        kl.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        top1.append(lp.argmax(-1) == lq.argmax(-1))
        rows = np.arange(start, min(start + 64, reference.shape[0]))
        keep = rows < len(nxt)
        nll.append(-lq[keep, :][np.arange(keep.sum()), nxt[rows[keep]]])
    return {"kld": float(np.concatenate(kl).mean()), "top1": float(np.concatenate(top1).mean()),
            "ppl": float(np.exp(np.concatenate(nll).mean())), "tokens": int(reference.shape[0])}


def cpu_share(run: dict[str, Any], threads: int) -> float | None:
    """CPU time of the worker over wall time × threads for one generation (≈ 1: it had its cores)."""
    if not run.get("wall_s") or run.get("cpu_s") is None:
        return None
    return run["cpu_s"] / (run["wall_s"] * threads)


def summarize(results: dict[str, dict[str, Any]], prompts_path: str, threads: int = 2) -> None:
    """Adds ``summary`` (medians + intervals), ``agreement`` and ``quality`` to each measured contender."""
    ref = results.get(REFERENCE)
    ref_tokens = {n: runs[0]["tokens"] for n, runs in (ref or {}).get("runs", {}).items() if runs}
    # logits live in the run's cache: a re-render without them keeps the quality already summarized
    ref_logits = np.load(ref["logits"]) if ref and ref.get("logits") and Path(ref["logits"]).exists() else None
    ids = json.loads(Path(prompts_path).read_text())["prompts"]["heldout"] if ref_logits is not None else []
    ref_timed = {n: Timed(REFERENCE, [r["token_ms"] for r in runs]) for n, runs in (ref or {}).get("runs", {}).items()}
    for key, res in results.items():
        runs = res.get("runs", {})
        if not any(runs.values()):
            continue
        summary: dict[str, Any] = {}
        for n, rs in runs.items():
            if not rs:
                continue
            entry = {"ttft_ms": median_ci([r["ttft_ms"] for r in rs]), "decode_tps": median_ci([r["decode_tps"] for r in rs]),
                     # the best round: on a shared machine, what the runtime does when it gets the cores
                     "best_ttft_ms": min(r["ttft_ms"] for r in rs),
                     "best_decode_tps": max(r["decode_tps"] for r in rs if r["decode_tps"] is not None),
                     "token_ms_p50": float(np.median([x for r in rs for x in r["token_ms"]])),
                     "token_ms_p90": float(np.percentile([x for r in rs for x in r["token_ms"]], 90)),
                     "rounds": len(rs), "load1": [r["load1"] for r in rs],
                     "deterministic": all(r["tokens"] == rs[0]["tokens"] for r in rs)}
            shares = [cpu_share(r, threads) for r in rs]
            full = [r for r, sh in zip(rs, shares) if sh is not None and sh >= FULL_SHARE]
            if any(sh is not None for sh in shares):
                entry["cpu_share"] = [None if sh is None else round(sh, 3) for sh in shares]
                entry["uncontended"] = {"runs": len(full),
                                        "ttft_ms": float(np.median([r["ttft_ms"] for r in full])) if full else None,
                                        "decode_tps": float(np.median([r["decode_tps"] for r in full])) if full else None}
            if n in ref_timed and key != REFERENCE and len(ref_timed[n].rounds) == len(rs):
                entry["decode_vs_torch"] = list(paired_speedup(ref_timed[n], Timed(key, [r["token_ms"] for r in rs])))
            summary[n] = entry
        res["summary"] = summary
        res["agreement"] = {n: agreement(rs[0]["tokens"], ref_tokens[n]) for n, rs in runs.items()
                            if rs and n in ref_tokens}
        if ref_logits is not None and res.get("logits") and Path(res["logits"]).exists():
            res["quality"] = logit_quality(ref_logits, np.load(res["logits"]), ids)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated contenders (default: {','.join(DEFAULT)}; known: {','.join(TABLE)})")
    p.add_argument("--optimum", action="store_true", help="add optimum-fp32 (builds bench/.venv-optimum once)")
    p.add_argument("--folder", action="append", default=[], metavar="KEY=RUNTIME:PATH[=LABEL]",
                   help="also measure a prebuilt folder or GGUF (RUNTIME: edgesmith, ortgenai, llamacpp, torch)")
    cli.add_timing_args(p, rounds=3, threads=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lengths", default="128,512", help="prompt lengths (tokens)")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--no-quality", action="store_true", help="skip the held-out logits (KL, top-1, perplexity)")
    p.add_argument("--cache", type=Path, default=llm_sources.CACHE)
    p.add_argument("--json-out", type=Path, default=BENCH / "results" / "llm_peers.json")
    p.add_argument("--md-out", type=Path, default=BENCH / "results" / "llm_peers.md")
    p.add_argument("--profiles-dir", type=Path, default=llm_profiles.PROFILES,
                   help="generation Profiles go to PROFILES_DIR/llm_peers/KEY.json")
    p.add_argument("--render-only", action="store_true", help="re-summarize --json-out's raw runs into --md-out")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.new_tokens < 2:
        p.error("--threads and --rounds must be at least 1, --new-tokens at least 2")
    return args


def render_only(args: argparse.Namespace) -> int:
    doc = results_io.read(args.json_out)
    summarize(doc["contenders"], doc["sources"]["prompts"], doc["settings"]["threads"])
    results_io.write_text(args.json_out, json.dumps(doc, indent=1) + "\n")
    results_io.write_text(args.md_out, markdown(doc) + "\n")
    print(markdown(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    extra = {c.key: c for c in map(folder_contender, args.folder)}
    keys = (args.only.split(",") if args.only else list(DEFAULT)) + list(extra)
    if args.optimum and "optimum-fp32" not in keys:
        keys.append("optimum-fp32")
    check_keys(keys, extra)
    if REFERENCE not in keys:
        log.warning("%s is not in the run: no agreement, KL or × PyTorch columns", REFERENCE)
    lengths = tuple(x.strip() for x in args.lengths.split(","))
    rec = machine_record.record(args.threads)
    sources = Sources(args.cache, args.threads)
    contenders, models = specs(keys, sources, threads=args.threads, extra=extra)
    prompts = str(llm_sources.prompts(sources.fp32_folder(), lengths=tuple(int(n) for n in lengths), cache=args.cache))
    started = time.perf_counter()
    results = measure(contenders, prompts, rounds=args.rounds, new_tokens=args.new_tokens, lengths=lengths,
                      warmup_tokens=args.warmup_tokens, quality=not args.no_quality, work=args.cache / "run")
    summarize(results, prompts, args.threads)
    machine_record.finish(rec)
    rounds_load = [run["load1"] for r in results.values() for rs in r.get("runs", {}).values() for run in rs]
    doc = {
        "schema": 2, "command": results_io.command_line("llm_peers.py", argv), "created": results_io.now(),
        "machine": rec,
        "settings": {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
                     "lengths": [int(n) for n in lengths], "warmup_tokens": args.warmup_tokens,
                     "reference": REFERENCE},
        "versions": {**(sources.versions.get("llamacpp") or {}), "optimum_venv": sources.versions.get("optimum")},
        "sources": {**sources.record(), "prompts": prompts}, "models": models,
        "load_average": {**rec["load_average"], "rounds": rounds_load or rec["load_average"]["start"][:1]},
        "wall_seconds": time.perf_counter() - started,
        "contenders": results,
    }
    results_io.write_text(args.json_out, json.dumps(doc, indent=1) + "\n")
    text = markdown(doc)
    results_io.write_text(args.md_out, text + "\n")
    llm_profiles.write_profiles(doc, "llm_peers", args.profiles_dir)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
