"""The MiniLM sweep (bench/sweep_minilm.yaml, 12 variants) with 1 and with 2 local workers.

Each run starts from an empty step cache of its own, so both do all the work. Writes the wall
times, the machine's load and the Pareto front to bench/results/sweep.md. Optimum's artifacts
(FP32 export and its best, dynamic INT8 per-channel; made in bench/.venv-optimum) are measured
the way the sweep measures a trial (the recipe's profile settings and evaluation rows) and drawn
beside the trials in bench/results/sweep_pareto.png (``--no-peers``: without them).

    .venv/bin/python bench/sweep_minilm.py [--workers 1 2] [--out /tmp/edgesmith-sweep-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # as a script: the repo root, so `bench` imports

from bench.core import machine, results

RECIPE = HERE / "sweep_minilm.yaml"
RESULTS = HERE / "results" / "sweep.md"
EDGESMITH = Path(sys.executable).with_name("edgesmith")


def run_once(workers: int, out: Path) -> dict:
    folder, cache = out / f"workers-{workers}", out / f"cache-{workers}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    load_before = machine.load_average()
    started = time.perf_counter()
    command = [str(EDGESMITH), "sweep", str(RECIPE), "--parallel", str(workers), "--out", str(folder),
               "--cache-dir", str(cache)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    summary = json.loads((folder / "pareto.json").read_text())
    return {"workers": workers, "seconds": seconds, "load_before": load_before, "load_after": machine.load_average(),
            "summary": summary, "folder": folder,
            # printed in BENCHMARKS.md: paths relative to the repository, never this machine's
            "command": " ".join(command[1:]).replace(str(HERE.parent) + "/", "").replace(str(out), "OUT")}


def front_table(summary: dict) -> list[str]:
    metrics = ["cosine", "recall@10", "latency_p50", "latency_p90", "size"]
    lines = ["| trial | variant | cosine | recall@10 | p50 ms | p90 ms | size MB |", "|---|---|---|---|---|---|---|"]
    from edgesmith.sweep import describe_params

    for r in summary["front"]:
        m = r["measured"]
        cells = [f"{m[k]:.4f}" if k in ("cosine", "recall@10") else f"{m[k] / 1e6:.1f}" if k == "size"
                 else f"{m[k]:.2f}" for k in metrics]
        lines.append(f"| t{r['trial']} | {describe_params(r['params'])} | " + " | ".join(cells) + " |")
    return lines


def all_table(summary: dict) -> list[str]:
    from edgesmith.sweep import describe_params

    lines = ["| trial | variant | cosine | p50 ms | size MB | note |", "|---|---|---|---|---|---|"]
    front = {r["trial"] for r in summary["front"]}
    for r in summary["trials"]:
        m = r["measured"]
        if r["state"] != "COMPLETE":
            lines.append(f"| t{r['trial']} | {describe_params(r['params'])} | | | | {r['state'].lower()}: "
                         f"{(r['failure'] or '').replace('|', '/')} |")
            continue
        note = "front" if r["trial"] in front else ("cosine < 0.9" if m["cosine"] < 0.9 else "")
        lines.append(f"| t{r['trial']} | {describe_params(r['params'])} | {m['cosine']:.4f} | {m['latency_p50']:.2f} | "
                     f"{m['size'] / 1e6:.1f} | {note} |")
    return lines


def peer_points(out: Path) -> list[dict]:
    """Optimum's FP32 export and dynamic INT8, measured as the sweep measures a trial."""
    import yaml

    import edgesmith as es
    from bench import contenders as cs
    from bench import optimum_env
    from edgesmith.artifacts import resolve_model_path
    from edgesmith.data import builtin_corpus

    recipe = yaml.safe_load(RECIPE.read_text())
    prof, data = recipe["profile"], recipe["data"]
    optimum_env.ensure()
    opt_rows, _ = cs.run_optimum(optimum_env.python(), HERE / "optimum_side.py", resolve_model_path(recipe["model"]),
                                 out / "optimum", 1800)
    source = es.load(recipe["model"])
    texts = builtin_corpus(limit=data["limit"])
    labels = {"optimum-fp32": "Optimum FP32", "optimum-int8-fp32": "Optimum INT8 (its best)"}
    points = []
    for row in opt_rows:
        if row.key not in labels or not row.measurable:
            continue
        quality = es.evaluate(row.artifact, source, texts)
        p = es.profile(row.artifact, batch=prof["batch"], seq=prof["seq"], warmup=prof["warmup"],
                       iterations=prof["iterations"], time_budget_s=prof["time_budget_s"], threads=prof["threads"])
        points.append({"label": labels[row.key], "measured": {"cosine": quality["cosine"],
                                                             "recall@10": quality.get("recall@10"),
                                                             "latency_p50": p.stats.p50, "latency_p90": p.stats.p90,
                                                             "size": row.size_bytes}})
    return points


def command_args(args) -> str:
    """The options this run was given, the output folder shown as OUT (never this machine's path)."""
    words = []
    if args.workers != [1, 2]:
        words += ["--workers", *map(str, args.workers)]
    if args.out != Path("/tmp/edgesmith-sweep-bench"):
        words += ["--out", "OUT"]
    if args.no_peers:
        words.append("--no-peers")
    return "".join(" " + w for w in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgesmith-sweep-bench"))
    parser.add_argument("--no-peers", action="store_true", help="leave Optimum's points out of the plot")
    args = parser.parse_args()
    rec = machine.record(threads=None)
    runs = [run_once(w, args.out) for w in args.workers]
    peers = [] if args.no_peers else peer_points(args.out)
    lines = ["# Sweep: 12 variants of the packaged MiniLM", "",
             (f"{machine.line(machine.finish(rec))} Python {rec['python']}. The machine was shared with other jobs while this ran: the load averages below say how busy it was."),
             ("Recipe: `bench/sweep_minilm.yaml` (prune off / ffn 0.25 / ffn 0.5 x quantize off / dynamic per-channel / "
              "dynamic per-tensor / static; grid sampler; objectives max cosine, min latency_p50 (b1 s128, ORT, "
              "2 threads), min size; constraint cosine >= 0.9). Command: "
              f"`.venv/bin/python bench/sweep_minilm.py{command_args(args)}`."), "",
             "| workers | wall time | trials completed | failed | load (1/5/15 min) before | after |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        c = r["summary"]["counts"]
        lb, la = r["load_before"], r["load_after"]
        lines.append(f"| {r['workers']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) | {c['complete']} | {c['failed']} | "
                     f"{lb[0]:.1f} / {lb[1]:.1f} / {lb[2]:.1f} | {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} |")
    lines += ["", ("Each run started with an empty step cache (`--cache-dir` of its own). With 2 workers the builds "
                   "(prune, export, quantize, evaluate) of two trials overlap; profiles still run one at a time with "
                   "no build beside them."), ""]
    last = runs[-1]
    lines += [f"## Pareto front ({last['workers']} worker run: `edgesmith {last['command']}`)", ""] + front_table(last["summary"])
    lines += ["", "## Every trial", ""] + all_table(last["summary"])
    if peers:
        from edgesmith.sweep import load_sweep, plot_front

        plot = plot_front(last["summary"], load_sweep(RECIPE).space, RESULTS.with_name("sweep_pareto.png"),
                          references=peers)
        lines += ["", f"## Optimum beside the trials (measured after the {last['workers']} worker run, same profile "
                      "settings and evaluation rows)", "", "| peer | cosine | recall@10 | p50 ms | p90 ms | size MB |",
                  "|---|---|---|---|---|---|"]
        for p in peers:
            m = p["measured"]
            lines.append(f"| {p['label']} | {m['cosine']:.4f} | {m['recall@10']:.4f} | {m['latency_p50']:.2f} | "
                         f"{m['latency_p90']:.2f} | {m['size'] / 1e6:.1f} |")
        if plot is not None:
            lines += ["", "![Pareto front with Optimum's points](bench/results/sweep_pareto.png)",
                      "", "_Plot: `bench/results/sweep_pareto.png` (blue: the front; orange diamonds: Optimum)._"]
    if len(runs) > 1:
        fronts = [sorted(json.dumps(r["params"], sort_keys=True) for r in run["summary"]["front"]) for run in runs]
        same = all(f == fronts[0] for f in fronts)
        lines += ["", f"Same front (variants) in every run: {'yes' if same else 'no (latencies differ run to run)'}."]
    doc = {"command": results.command_line("sweep_minilm.py", None), "created": results.now(), "machine": rec,
           "runs": [{k: v for k, v in r.items() if k != "folder"} for r in runs], "peers": peers,
           "markdown": "\n".join(lines)}
    _, md = results.write(RESULTS, doc, lambda d: d["markdown"])
    print(md.read_text())


if __name__ == "__main__":
    main()
