"""How far MiniLM's INT8 artifacts are from this CPU's roofline floor (issue 19).

Reads ``bench/results/int8_graph.json`` (measured p50 and ORT per-op profiles, written by
int8_graph_minilm.py) and the variants' ONNX files, counts each graph's matrix-product work and
weight bytes with edgesmith's roofline machinery (:mod:`edgesmith.profiling.roofline`), and sets
them against this machine's peaks, derived from its CPU flags and clock (not published figures, so
labelled as derived): 2 cores × the clock × 64 FP32 FLOP (two AVX-512 FMA units), × 256 int8 ops
(AVX-512 VNNI) or × 2048 int8 ops (AMX tiles) per cycle; memory is taken as the weights streamed
once at ``--bandwidth`` GB/s (a copy loop measured here, see the output). Writes
``bench/results/int8_graph_roofline.md``.

    .venv/bin/python bench/roofline_minilm.py --work runs/int8-graph
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.append(str(REPO))  # as a script: the repo root, so `bench` imports

from bench.core import machine, results


def clock_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return 2.0


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best of ``repeats`` copies of a ``mb`` MB array (read + write bytes / seconds)."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def per_op_sections(args, paths: dict[str, Path]) -> list[str]:
    """ORT's per-op profile (batch 1 × 128) of each variant in ``--profile``: every op type's share."""
    from bench.int8_graph_minilm import op_profile
    from edgesmith.artifacts import OnnxModel
    from edgesmith.data import builtin_corpus
    from edgesmith.profiling import build_feeds
    from edgesmith.runtimes.base import get_runtime

    texts = builtin_corpus()[-512:]
    out: list[str] = []
    jobs = [(key, int(t)) for t in args.profile_threads.split(",") if t for key in args.profile.split(",") if key]
    for key, threads in jobs:
        path = paths.get(key)
        if path is None or not path.exists():
            continue
        art = OnnxModel(task="feature-extraction", name=key, folder=path.parent)
        sess = get_runtime("onnxruntime").load(art, threads=threads)
        feeds = build_feeds(art.tokenizer, sess.input_names, batch=1, seq=128, texts=texts)[0]
        sess.close()
        load = machine.load_average()[0]
        prof = op_profile(art, feeds, threads, args.work / "ort-profile", runs=50)
        out += ["", f"## Per-op profile of `{key}` (batch 1 × 128, {threads} ORT thread(s), ORT profiler, "
                    f"{prof['runs']} runs, load average {load:.1f})", "",
                f"Node time per run {prof['node_ms_per_run']:.2f} ms; session run median "
                f"{prof['model_run_ms_median']:.2f} ms.", "", "| op | ms per run | share |", "|---|---:|---:|"]
        for op, v in list(prof["ops"].items())[:14]:
            out.append(f"| {op} | {v['ms_per_run']:.3f} | {100 * v['share']:.1f} % |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "int8-graph", help="int8_graph_minilm.py's --work")
    p.add_argument("--results", type=Path, default=BENCH / "results" / "int8_graph.json")
    p.add_argument("--variants", default="optimum-int8,dyn-emb,fuse-all-dyn-emb,nbits8-b32,fp32")
    p.add_argument("--summary", type=Path, default=REPO / "profiles" / "bench" / "summary.json",
                   help="the top-level benchmark's summary: b1 p50 of variants int8_graph.json lacks (its row keys)")
    p.add_argument("--paths", default="", help="KEY=MODEL.onnx,... for variants whose folder the JSON lacks")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--profile", default="dyn-emb,optimum-int8", help="variants to profile per op (ORT profiler)")
    p.add_argument("--profile-threads", default="2,1",
                   help="ORT thread counts of the per-op profiles (1: no waits on a preempted second thread)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "int8_graph_roofline.md")
    args = p.parse_args(argv)
    from edgesmith.profiling.roofline import graph_work

    rec = machine.record(threads=None)

    summary = json.loads(args.results.read_text())
    harness_p50 = {}
    if args.summary.exists():
        top = json.loads(args.summary.read_text())
        harness_p50 = {r["key"]: r["latency"]["1"]["p50"] for r in top["rows"] if "1" in (r.get("latency") or {})}
    ghz = clock_ghz()
    peaks = {"fp32": args.cores * ghz * 1e9 * 64, "int8 VNNI": args.cores * ghz * 1e9 * 256,
             "int8 AMX": args.cores * ghz * 1e9 * 2048}
    load = machine.load_average()[0]
    bandwidth = copy_bandwidth_gbs()
    paths = {"optimum-int8": args.work / "optimum-wrapped" / "model.onnx", "nbits8-b32": args.work / "nbits8-b32" / "model.onnx",
             "nbits8-b128": args.work / "nbits8-b128" / "model.onnx"}
    for item in [x for x in args.paths.split(",") if x]:
        key, _, path = item.partition("=")
        paths[key] = Path(path)
    for key, info in summary["variants"].items():
        if "folder" in info:
            paths.setdefault(key, Path(info["folder"]) / "model.onnx")
    lines = ["# MiniLM INT8 against this CPU's roofline (issue 19)", "",
             f"Command: `{results.command_line('roofline_minilm.py', argv)}` (after `bench/int8_graph_minilm.py`)", "",
             machine.line(rec), "",
             (f"Derived peaks of this VM ({args.cores} cores at {ghz:.1f} GHz, {rec['isa']}): FP32 "
              f"{peaks['fp32'] / 1e12:.2f} TFLOP/s, int8 {peaks['int8 VNNI'] / 1e12:.2f} TOP/s with VNNI, "
              f"{peaks['int8 AMX'] / 1e12:.1f} TOP/s with AMX tiles; memory {bandwidth:.1f} GB/s (best of 5 copies of "
              f"512 MB, load average {load:.1f}). Work: MACs of the matrix products at batch 1 × 128 and the "
              "weight bytes (edgesmith.profiling.roofline.graph_work). Floors are lower bounds: they ignore "
              "element-wise ops, quantizing activations, and kernel efficiency."), "",
             "| variant | GMACs | weight MB | measured b1 p50 ms | floor VNNI ms | floor AMX ms | memory floor ms "
             "| × above the higher floor |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in [k for k in args.variants.split(",") if k]:
        path = paths.get(key)
        if path is None or not path.exists():
            continue
        macs, weight_bytes = graph_work(path, 1, 128)
        measured = summary["timing"].get("1", {}).get(key, {}).get("p50") or harness_p50.get(key)
        peak = peaks["fp32"] if key == "fp32" else peaks["int8 VNNI"]
        floor = 2 * macs / peak * 1000
        amx = 2 * macs / (peaks["fp32"] if key == "fp32" else peaks["int8 AMX"]) * 1000
        mem = weight_bytes / (bandwidth * 1e9) * 1000
        ratio = f"{measured / max(floor, mem):.1f}" if measured else "-"
        lines.append(f"| `{key}` | {macs / 1e9:.2f} | {weight_bytes / 1e6:.1f} | {measured:.2f} | {floor:.2f} | {amx:.2f} | "
                     f"{mem:.2f} | {ratio} |" if measured else f"| `{key}` | {macs / 1e9:.2f} | {weight_bytes / 1e6:.1f} "
                     f"| - | {floor:.2f} | {amx:.2f} | {mem:.2f} | - |")
    lines += per_op_sections(args, paths)
    doc = {"command": results.command_line("roofline_minilm.py", argv), "created": results.now(),
           "machine": machine.finish(rec), "peaks": peaks, "bandwidth_gbs": bandwidth, "markdown": "\n".join(lines)}
    _, md = results.write(args.out, doc, lambda d: d["markdown"])
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
