"""The INT8 graph of MiniLM, lever by lever (issue 19): which graph changes pay on this CPU.

Every variant starts from edgesmith's FP32 export of the packaged MiniLM-L6 and is timed in this one
process against Optimum's best (dynamic INT8 per-channel on its plain export, produced in
``bench/.venv-optimum`` by ``optimum_side.py``), in rounds with a rotating order (bench/core/rounds.py), at
batch 1 and 8 × 128 tokens, 2 threads. Levers:

- size parity: the word-embedding Gather quantized too (``quantize_embeddings``);
- ORT transformer fusions (SkipLayerNorm, BiasGelu, Attention), one at a time, before dynamic
  quantization (the quantize pass's ``fusions``) and after it (fusing the quantized graph);
- static QDQ (the FFN down-projections float, the default) against dynamic;
- MatMulNBits 8-bit weight-only with accuracy level 4 (block 32 and 128) as another kernel family;
- what the per-op profile showed: Softmax over padded keys in ORT's slow exp path, floored
  (the quantize pass's ``softmax_floor``).

Fidelity: mean cosine and recall@10 of the mean-pooled embeddings against PyTorch FP32 on the held-out
corpus rows the top-level benchmark uses. Writes ``bench/results/int8_graph.md`` and a JSON beside it;
``--profile`` adds an ORT per-op profile (each op type's share) of the named variants.

    nice -n 5 .venv/bin/python bench/int8_graph_minilm.py --rounds 8 --profile dyn-emb,nbits8-b32
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # as a script: the repo root, so `bench` imports

from bench import optimum_env
from bench.core import cli, machine, results
from bench.core.rounds import paired_speedup, run_rounds

log = logging.getLogger("bench.int8_graph")

ONE = {"skip_layer_norm": ["layer_norm", "skip_layer_norm"], "bias_gelu": ["gelu", "bias_gelu"],
       "attention": ["layer_norm", "attention"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "int8-graph")
    cli.add_timing_args(p, rounds=8, threads=2, block=10, warmup=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--eval-texts", type=int, default=512)
    p.add_argument("--only", help="comma-separated variant keys (default: all)")
    p.add_argument("--profile", default="", help="comma-separated variant keys to profile per op (batch 1)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "int8_graph.md")
    p.add_argument("--render-only", action="store_true", help="rebuild --out from its JSON; measure nothing")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Building the variants
# ---------------------------------------------------------------------------------------------


def optimum_int8(work: Path):
    """Optimum's dynamic INT8 (per-channel, the plain export): produced once in its venv."""
    from bench import contenders as cs
    from edgesmith.artifacts import resolve_model_path

    folder = work / "optimum"
    done = work / "optimum.json"
    if not done.exists():
        optimum_env.ensure()
        proc = subprocess.run([str(optimum_env.python()), str(BENCH / "optimum_side.py"), "produce",
                               str(resolve_model_path("minilm")), str(folder)], capture_output=True, text=True,
                              check=True)
        done.write_text(proc.stdout.strip().splitlines()[-1])
    result = json.loads(done.read_text())
    v = result["variants"]["int8-fp32"]
    return cs.optimum_wrapper(Path(v["folder"]), v["file"], work / "optimum-wrapped", "optimum-int8")


def build_variants(work: Path, only: set[str] | None) -> tuple[dict[str, Any], dict[str, dict]]:
    import onnx

    import edgesmith as es
    from edgesmith.artifacts import OnnxModel, copy_companions
    from edgesmith.compress.quantization.weight_only import ort_quantize
    from edgesmith.onnx_graph.nodes import name_nodes
    from edgesmith.onnx_graph.optimize import optimized_copy
    from edgesmith.passes import Context

    source = es.load("minilm")
    ctx = Context(source=source, workdir=work / "ctx", progress=False)
    arts: dict[str, Any] = {}
    info: dict[str, dict] = {}

    def want(key: str) -> bool:
        return only is None or key in only

    def timed_build(key: str, label: str, fn):
        if not want(key):
            return
        t0 = time.perf_counter()
        try:
            arts[key] = fn()
            info[key] = {"label": label, "built_s": time.perf_counter() - t0}
        except Exception as exc:
            log.exception("variant %s failed", key)
            info[key] = {"label": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}

    fp32 = es.export.to_onnx(source, ctx)
    arts["optimum-int8"] = optimum_int8(work)
    info["optimum-int8"] = {"label": "Optimum dynamic INT8 per-channel (its best)"}
    if want("fp32"):
        arts["fp32"] = fp32
        info["fp32"] = {"label": "edgesmith ONNX FP32"}
    dyn = {"mode": "dynamic", "per_channel": True}
    timed_build("dyn", "dynamic per-channel, float embeddings (the old bench row)",
                lambda: es.compress.quantize(fp32, ctx, **dyn))
    timed_build("dyn-emb", "dynamic per-channel + 8-bit embeddings",
                lambda: es.compress.quantize(fp32, ctx, **dyn, quantize_embeddings=True))
    timed_build("dyn-emb-softmax", "dynamic + 8-bit embeddings, Softmax inputs floored at rowmax - 80",
                lambda: es.compress.quantize(fp32, ctx, **dyn, quantize_embeddings=True, softmax_floor=-80.0))
    for name, fusions in ONE.items():
        timed_build(f"fuse-{name}-dyn-emb", f"fusion {name} (only), then dynamic + 8-bit embeddings",
                    lambda f=fusions: es.compress.quantize(fp32, ctx, **dyn, quantize_embeddings=True,
                                                          optimize=True, fusions=f))
    timed_build("fuse-all-dyn-emb", "every ORT fusion, then dynamic + 8-bit embeddings",
                lambda: es.compress.quantize(fp32, ctx, **dyn, quantize_embeddings=True, optimize=True))

    def fuse_after(fusions):
        base = arts.get("dyn-emb") or es.compress.quantize(fp32, ctx, **dyn, quantize_embeddings=True)
        out, _ = optimized_copy(base, work / f"after-{'-'.join(fusions)}", fusions=fusions)
        return out

    for name, fusions in (("skip_layer_norm", ONE["skip_layer_norm"]), ("bias_gelu", ONE["bias_gelu"])):
        timed_build(f"dyn-emb-fuse-{name}", f"dynamic + 8-bit embeddings, then fusion {name}",
                    lambda f=fusions: fuse_after(f))
    timed_build("static", "static QDQ per-channel (FFN down-projections float)",
                lambda: es.compress.quantize(fp32, ctx, mode="static", per_channel=True, calibration_samples=256))

    def nbits(block: int):
        model = onnx.load(str(fp32.path))
        name_nodes(model.graph)
        q = ort_quantize(model, bits=8, block=block, method="rtn", symmetric=True, accuracy_level=4, exclude=[])
        folder = work / f"nbits8-b{block}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        onnx.save(q, str(folder / "model.onnx"))
        copy_companions(fp32.folder, folder)
        return OnnxModel(task=fp32.task, name=f"nbits8-b{block}", meta=dict(fp32.meta), folder=folder)

    for block in (32, 128):
        timed_build(f"nbits8-b{block}", f"MatMulNBits 8-bit, block {block}, accuracy level 4 (float embeddings)",
                    lambda b=block: nbits(b))
    return arts, info


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def op_profile(art, feeds: dict[str, np.ndarray], threads: int, folder: Path, runs: int = 30) -> dict[str, Any]:
    """ORT's own profiler over ``runs`` runs: each op type's share of the node time."""
    import onnxruntime as ort

    from edgesmith.runtimes.onnxruntime import session_options

    folder.mkdir(parents=True, exist_ok=True)
    so = session_options(threads=threads, enable_profiling=True, profile_prefix=str(folder / "ort"))
    sess = ort.InferenceSession(str(art.path), sess_options=so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for _ in range(5):
        sess.run(None, {n: feeds[n] for n in names})
    for _ in range(runs):
        sess.run(None, {n: feeds[n] for n in names})
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs_seen = 0
    run_us = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_seen += 1
            run_us.append(e["dur"])
    # the first 5 runs are warmup: scale per-op totals to one run (warmup included in both, so shares hold)
    total = sum(by_op.values())
    shares = {op: {"ms_per_run": us / 1000 / max(runs_seen, 1), "share": us / total}
              for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}
    Path(path).unlink(missing_ok=True)
    return {"runs": runs_seen, "model_run_ms_median": float(np.median(run_us)) / 1000 if run_us else None,
            "node_ms_per_run": total / 1000 / max(runs_seen, 1), "ops": shares}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    import torch

    from edgesmith.profiling import build_feeds
    from edgesmith.quality import embed, fidelity
    from edgesmith.runtimes.base import get_runtime

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rec = machine.record(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    arts, info = build_variants(args.work, only)

    import edgesmith as es
    from edgesmith.data import builtin_corpus

    texts = builtin_corpus()[-args.eval_texts:]
    reference = embed(es.load("minilm"), texts)
    for key, art in arts.items():
        info[key]["quality"] = fidelity(reference, embed(art, texts), k=10)
        info[key]["size_mb"] = art.size_bytes() / 1e6
        info[key]["folder"] = str(art.folder)
        log.info("%s: cosine %.4f, %.1f MB", key, info[key]["quality"]["cosine"], info[key]["size_mb"])

    sessions = {k: get_runtime("onnxruntime").load(a, threads=args.threads) for k, a in arts.items()}
    timing: dict[str, dict] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        runners = {}
        for key, sess in sessions.items():
            feeds = build_feeds(arts[key].tokenizer, sess.input_names, batch=batch, seq=args.seq, texts=texts)
            runners[key] = (lambda s, f: (lambda i: s.run(f[i % len(f)])))(sess, feeds)
        load = machine.load_average()[0]
        timed = run_rounds(runners, rounds=args.rounds, block=args.block, warmup=args.warmup,
                           on_round=lambda r: log.info("b%d round %d done", batch, r + 1))
        base = timed["optimum-int8"]
        timing[str(batch)] = {
            key: {"p50": float(np.median(t.all)), "vs_optimum": list(paired_speedup(base, t)),
                  "load_1min_start": load} for key, t in timed.items()}
    for sess in sessions.values():
        sess.close()

    profiles = {}
    for key in [k for k in args.profile.split(",") if k]:
        if key in arts:
            sess = get_runtime("onnxruntime").load(arts[key], threads=args.threads)
            feeds = build_feeds(arts[key].tokenizer, sess.input_names, batch=1, seq=args.seq, texts=texts)[0]
            sess.close()
            profiles[key] = op_profile(arts[key], feeds, args.threads, args.work / "ort-profile")
    machine.finish(rec)
    summary = {"command": results.command_line("int8_graph_minilm.py", argv), "machine": rec,
               "variants": info, "timing": timing, "profiles": profiles, "load": rec["load_average"],
               "wall_s": time.perf_counter() - started, "settings": vars(args) | {"work": None, "out": None}}
    results.write(args.out, summary, render, indent=2)
    print(render(summary))
    return 0


def render(s: dict[str, Any]) -> str:
    st = s["settings"]
    batches = list(s["timing"])
    lines = ["# The INT8 graph of MiniLM, lever by lever (issue 19)", "",
             f"Command: `{s['command']}`", "",
             *([machine.line(s["machine"]), ""] if s.get("machine") else []),
             (f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in s['load']['start'])}, at end "
              f"{'/'.join(f'{x:.2f}' for x in s['load']['end'])}; 2-core machine shared with other jobs. "
              f"{st['rounds']} rounds × {st['block']} runs per variant, order rotated; seq {st['seq']}, "
              f"{st['threads']} ORT threads. Speedup: median of per-round ratios to Optimum's best (its dynamic "
              f"INT8 per-channel) with a bootstrap 95 % interval. Fidelity vs PyTorch FP32 on {st['eval_texts']} "
              "held-out corpus rows."), ""]
    head = ["variant", "size MB", "cosine", "recall@10"]
    for b in batches:
        head += [f"b{b} p50 ms", f"b{b} × Optimum [95% CI]"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, v in s["variants"].items():
        if "error" in v:
            lines.append(f"| {v['label']} (`{key}`) | failed: {v['error']} |" + " |" * (len(head) - 2))
            continue
        q = v.get("quality", {})
        cells = [f"{v['label']} (`{key}`)", f"{v.get('size_mb', 0):.1f}", f"{q.get('cosine', 0):.4f}",
                 f"{q.get('recall@10', 0):.3f}"]
        for b in batches:
            t = s["timing"][b].get(key)
            if t:
                p, lo, hi = t["vs_optimum"]
                cells += [f"{t['p50']:.2f}", f"{p:.2f}x [{lo:.2f}-{hi:.2f}]"]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for key, prof in s.get("profiles", {}).items():
        lines += ["", f"## Per-op profile of `{key}` (batch 1 × {st['seq']}, ORT profiler, {prof['runs']} runs)", "",
                  f"Node time per run {prof['node_ms_per_run']:.2f} ms (session run median "
                  f"{prof['model_run_ms_median']:.2f} ms).", "", "| op | ms per run | share |", "|---|---:|---:|"]
        for op, v in list(prof["ops"].items())[:12]:
            lines.append(f"| {op} | {v['ms_per_run']:.3f} | {100 * v['share']:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
