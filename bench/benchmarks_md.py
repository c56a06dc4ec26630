"""Rendering: the harness's section of BENCHMARKS.md, and BENCHMARKS.md itself.

BENCHMARKS.md = a header with the machine, the harness's section (from its summary JSON), then
every ``bench/results/*.md`` written by the other benchmarks, in a fixed order, each under its
own heading with the file it came from. Re-rendering never runs a benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: the other benchmarks' result files, in this order (matched on the file stem's prefix); the rest follow by name
RESULT_ORDER = ("softmax_floor", "int8_graph", "recovery", "prune", "quantize", "distill", "sweep", "llm_goal", "llm_peers", "llm_backends", "llm_recovery", "llm_genai", "llm_batched", "llm_gguf", "llm_gguf_quant", "llm_speculative")
GOAL_SPEEDUP_TORCH = 12.0
GOAL_SPEEDUP_OPTIMUM = 1.5
GOAL_SPEEDUP_INTERMEDIATE = 1.25  # issue 19's intermediate mark (batch 1)
GOAL_SPEEDUP_OPTIMUM_B8 = 1.3  # issue 19: batch 8
GOAL_COSINE = 0.99
GOAL_RECALL = 0.99
BUSY_LOAD = 0.75  # 1-minute load average above this at the start: other jobs were running


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_speedup(triple: list[float] | None) -> str:
    if not triple:
        return "-"
    point, low, high = triple
    return f"{point:.2f}x [{low:.2f}-{high:.2f}]"


def qualifies(quality: dict[str, float]) -> bool:
    """≤ 1 % fidelity loss: cosine ≥ 0.99 to PyTorch FP32, or neighbour recall@10 ≥ 0.99."""
    return quality.get("cosine", 0.0) >= GOAL_COSINE or quality.get("recall@10", 0.0) >= GOAL_RECALL


def machine_lines(summary: dict[str, Any]) -> list[str]:
    m = summary["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    isa = m.get("isa") or "ISA not recorded in this run"
    lines = [f"- CPU: {m['cpu_model']} ({isa}), {m['cores']} logical cores; runtimes limited to {m['threads']} threads",
             f"- OS: {m['os']} (kernel {m['kernel']}), Python {m['python']}",
             f"- edgesmith venv: {libs}"]
    opt = m.get("optimum_venv")
    if opt:
        lines.append("- Optimum venv (`bench/.venv-optimum`): " + ", ".join(f"{k} {v}" for k, v in opt.items() if v))
    else:
        lines.append("- Optimum venv: not used in this run")
    return lines


def _row_cells(row: dict[str, Any], batch: str) -> list[str]:
    lat = (row.get("latency") or {}).get(batch)
    status = row["status"] if row["status"] != "ok" else ""
    if row.get("optimum_best_at") and batch in row["optimum_best_at"]:
        status = "Optimum's best"
    q = row.get("quality") or {}
    size = row.get("size_mb")
    return [row["label"], status,
            fmt(lat["p50"]) if lat else "-", fmt(lat["p90"]) if lat else "-",
            fmt(lat["throughput"], 1) if lat else "-",
            fmt(size, 1) if size is not None else "-",
            fmt(q.get("cosine"), 4), fmt(q.get("recall@10"), 3),
            fmt(row.get("produce_seconds"), 1),
            fmt_speedup(lat.get("vs_torch")) if lat else "-",
            fmt_speedup(lat.get("vs_optimum")) if lat else "-"]


HEADERS = ["contender", "status", "p50 ms", "p90 ms", "samples/s", "size MB", "cosine", "recall@10",
           "made in s", "× PyTorch [95% CI]", "× Optimum best [95% CI]"]


def table(summary: dict[str, Any], batch: str) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |",
             "|---|---|" + "---:|" * (len(HEADERS) - 2)]
    for row in summary["rows"]:
        cells = [c.replace("|", "\\|") for c in _row_cells(row, batch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(summary: dict[str, Any]) -> list[str]:
    goal = summary.get("goal") or {}
    if not goal:
        return ["Goal: not evaluated (batch 1 was not measured)."]
    if not goal.get("best"):
        return [(f"Goal (batch 1, seq {summary['settings']['seq']}): **not met** — no edgesmith artifact kept "
                 f"cosine ≥ {GOAL_COSINE} or recall@10 ≥ {GOAL_RECALL}.")]
    torch_s, opt_s = goal.get("vs_torch"), goal.get("vs_optimum")

    def met(flag) -> str:
        return "**met**" if flag else "**not met**"

    parts = [(f"best edgesmith artifact at ≤ 1 % fidelity loss: **{goal['best_label']}** "
              f"(cosine {goal['cosine']:.4f}, recall@10 {goal['recall']:.3f}"
              + (f", {goal['size_mb']:.1f} MB" if goal.get("size_mb") is not None else "") + ")")]
    if opt_s:
        parts += [
            (f"batch 1 vs Optimum's best ({goal['optimum_label']}): {fmt_speedup(opt_s)} — goal ≥ "
             f"{GOAL_SPEEDUP_OPTIMUM:g}x: {met(goal['optimum_met'])}; intermediate mark ≥ "
             f"{GOAL_SPEEDUP_INTERMEDIATE:g}x: {met(goal.get('optimum_intermediate_met'))}")]
        if goal.get("vs_optimum_b8"):
            parts.append(f"batch 8 vs Optimum's best: {fmt_speedup(goal['vs_optimum_b8'])} — goal ≥ "
                         f"{GOAL_SPEEDUP_OPTIMUM_B8:g}x: {met(goal['optimum_b8_met'])}")
        if goal.get("optimum_size_mb") is not None:
            parts.append(f"size {goal['size_mb']:.1f} MB vs Optimum's best {goal['optimum_size_mb']:.1f} MB — "
                         f"no larger: {met(goal['size_met'])}")
    else:
        parts.append("vs Optimum's best: not measured in this run")
    parts += [f"recall@10 {goal['recall']:.3f} — within 1 % of the source (≥ {GOAL_RECALL:g}): "
              f"{met(goal.get('recall_met'))}",
              f"vs PyTorch FP32 eager: {fmt_speedup(torch_s)} (earlier goal ≥ {GOAL_SPEEDUP_TORCH:g}x: "
              f"{met(goal['torch_met'])})"]
    verdict = {True: "met", False: "not met", None: "not fully evaluated (Optimum not measured)"}[goal.get("met")]
    return [f"Goal (batch 1, seq {summary['settings']['seq']}): **{verdict}**.", ""] + [f"- {p}" for p in parts] + [
        "", "Met means the point estimate reaches the mark; the interval says how sure that is."]


def interop_lines(summary: dict[str, Any]) -> list[str]:
    interop = summary.get("interop") or {}
    if interop.get("status") != "ok":
        note = f" — {interop['note']}" if interop.get("note") else ""
        return [(f"Interoperability (edgesmith's ONNX folder in Optimum's `ORTModelForFeatureExtraction`): "
                 f"{interop.get('status', 'not run')}{note}.")]
    return [(f"Interoperability: edgesmith's ONNX FP32 folder loads in Optimum's `ORTModelForFeatureExtraction` "
             f"(Optimum venv) unchanged; on a batch of {interop['shape'][0]} × {interop['shape'][1]} tokens its "
             f"`last_hidden_state` differs from edgesmith's own ONNX Runtime session by at most "
             f"{interop['max_abs_diff']:.2e} (min pooled cosine {interop['min_cosine']:.6f}).")]


def section(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    load = summary["load_average"]
    out = ["## edgesmith vs PyTorch vs Hugging Face Optimum", "",
           f"Command: `{summary['command']}`" + (" (`make bench`)" if summary["command"].endswith("harness.py") else ""),
           ""]
    if summary.get("quick"):
        out += [("> **Quick mode** (`--quick`): a tiny model, few iterations and no Optimum venv. These numbers "
                 "check the harness, not speed."), ""]
    busy = load["start"][0] >= BUSY_LOAD
    measured = (f"Measured {summary['created']} in {summary['wall_seconds'] / 60:.1f} min. Load average "
                f"(1/5/15 min) at start {load['start'][0]:.2f}/{load['start'][1]:.2f}/{load['start'][2]:.2f}, "
                f"at end {load['end'][0]:.2f}/{load['end'][1]:.2f}/{load['end'][2]:.2f}.")
    if busy:
        measured += " **Other jobs were running: these numbers are provisional.**"
    out += [measured, "", (
            f"Model `{s['model']}`; every contender on ONNX Runtime CPU (PyTorch eager for the first row) with "
            f"{s['threads']} threads; inputs are real sentences from the shipped corpus padded to {s['seq']} tokens. "
            f"Contenders are timed in up to {s['rounds']} rounds of {s['block']} runs each (after {s['warmup']} untimed "
            "runs per block; fewer rounds, at least 3, when a batch size's "
            f"{s.get('shape_budget_s', 0):.0f} s timing budget is spent), the order rotated every round"
            + ("; each contender in a worker process of its own (its runtime's own threading and peak memory); "
               if s.get("process_per_contender") else "; ") +
            "p50/p90 over all runs; speedups are medians of per-round ratios with a bootstrap 95 % interval over "
            "rounds. Fidelity: mean cosine of the mean-pooled "
            f"sentence embeddings and neighbour recall@10, against PyTorch FP32, on {s['eval_texts']} held-out "
            "corpus sentences (never used for calibration or training). Size: the weight files on disk. "
            "\"Made in\": the wall time of the producing pipeline (edgesmith's recipe steps from an empty cache; "
            "Optimum's export/optimize/quantize calls)."), ""]
    for batch in s["batches"]:
        ran = (s.get("rounds_run") or {}).get(str(batch))
        rounds = f"{ran} rounds of {s['block']} runs per contender" if ran is not None else ""
        out += [f"### Batch {batch} × {s['seq']} tokens", "", _machine_line(summary), "", table(summary, str(batch)), ""]
        if rounds:
            out += [f"_{rounds}._", ""]
    out += ["### Goal", ""] + goal_lines(summary) + [""]
    out += ["### Interoperability", ""] + interop_lines(summary) + [""]
    out += ["### How each row was made", ""]
    for row in summary["rows"]:
        steps = " → ".join(row.get("steps") or []) or "-"
        note = f" ({row['note']})" if row.get("note") else ""
        out.append(f"- **{row['label']}** [{row['status']}]: {steps}{note}")
    if summary.get("optimum_errors"):
        out += ["", "Optimum steps that failed (reported as they were raised):", ""]
        out += [f"- {k}: `{v}`" for k, v in summary["optimum_errors"].items()]
    return "\n".join(out).rstrip() + "\n"


def _machine_line(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    isa = m.get("isa") or "ISA not recorded in this run"
    return f"_{m['cpu_model']} ({isa}), {m['threads']} threads._"


def _order_key(path: Path) -> tuple[int, str]:
    for i, prefix in enumerate(RESULT_ORDER):
        if path.stem.startswith(prefix):
            return i, path.stem
    return len(RESULT_ORDER), path.stem


def result_files(results_dir: Path) -> list[Path]:
    return sorted(results_dir.glob("*.md"), key=_order_key) if results_dir.is_dir() else []


def _demote(markdown: str) -> str:
    """Headings one level down, so each result file nests under BENCHMARKS.md's own title."""
    return re.sub(r"^(#{1,5}) ", r"#\1 ", markdown, flags=re.MULTILINE)


def results_section(path: Path, repo: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    try:
        where = path.resolve().relative_to(repo.resolve())
    except ValueError:
        where = path
    body = _demote(text)
    if not body.lstrip().startswith("#"):
        body = f"## {path.stem}\n\n{body}"
    has_command = re.search(r"\bcommand\b[^\n]*`[^`\n]+`", text, flags=re.IGNORECASE) is not None
    origin = f"_From `{where}`._" + ("" if has_command else " _(this file records no command; see the script "
                                                            "in `bench/` that writes it)_")
    return f"{body}\n\n{origin}\n"


def benchmarks_md(summary: dict[str, Any] | None, results_dir: Path, repo: Path) -> str:
    intro = ("Every table states the command that produced it. `make bench` reruns the top-level comparison and "
             "rewrites this file (raw profiles: `profiles/bench/`); the sections after it come from "
             "`bench/results/*.md`, written by the other benchmarks in `bench/`. A table measured since the ISA became "
             "part of the machine record (`bench/core/machine.py`) names the CPU model, its ISA and the load average at "
             "the start and end; older tables name the CPU only.")
    out = ["# Benchmarks", "", intro, ""]
    if summary is not None:
        out += ["Machine of the top-level comparison:", ""] + machine_lines(summary) + ["", section(summary)]
    else:
        out += ["_The top-level comparison has not been run yet: `make bench`._", ""]
    for path in result_files(results_dir):
        out += ["", results_section(path, repo)]
    return "\n".join(out).rstrip() + "\n"
