"""The results of a sweep: its Pareto front, ``pareto.json``, the front's plot and ``report.md``."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput
from edgesmith.storage import write_json_atomic, write_text_atomic
from edgesmith.sweep.folder import PARETO_FILE
from edgesmith.sweep.objectives import LATENCY_METRICS, Objective
from edgesmith.sweep.space import SearchSpace, Sweep
from edgesmith.sweep.variants import describe_params

log = logging.getLogger(__name__)


def format_metric(metric: str, value: float) -> str:
    if metric == "size":
        return f"{value / 1e6:.2f} MB"
    if metric in LATENCY_METRICS:
        return f"{value:.2f} ms"
    if metric == "throughput":
        return f"{value:.1f}/s"
    return f"{value:.4f}"


def _trial_record(t, folder: Path) -> dict[str, Any]:
    return {"trial": t.number, "state": t.state.name, "label": t.user_attrs.get("label", f"t{t.number:04d}"),
            "params": t.user_attrs.get("params", {}), "values": list(t.values) if t.values else None,
            "measured": t.user_attrs.get("measured", {}), "run_dir": t.user_attrs.get("run_dir"),
            "artifact": t.user_attrs.get("artifact"), "profile": t.user_attrs.get("profile"),
            "failure": t.user_attrs.get("failure"), "failure_kind": t.user_attrs.get("failure_kind")}


def _feasible(record: dict[str, Any], space: SearchSpace) -> bool:
    measured = record["measured"]
    return all(c.metric in measured and c.holds(measured[c.metric]) for c in space.constraints)


def front_of(study, space: SearchSpace) -> list[Any]:
    """Optuna's Pareto front (``best_trials``: feasible, non-dominated completed trials), each
    checked again against our own constraints, by trial number."""
    trials = [t for t in study.best_trials if all(c.metric in t.user_attrs.get("measured", {}) and
                                                   c.holds(t.user_attrs["measured"][c.metric])
                                                   for c in space.constraints)]
    return sorted(trials, key=lambda t: t.number)


def summarize_study(study, sweep: Sweep, folder: Path) -> dict[str, Any]:
    """What ``pareto.json`` holds: the front (duplicates of one variant folded), every trial, counts."""
    space = sweep.space
    records = [_trial_record(t, folder) for t in study.get_trials(deepcopy=False)]
    front, seen = [], {}
    for t in front_of(study, space):
        record = _trial_record(t, folder)
        key = json.dumps(record["params"], sort_keys=True)
        if key in seen:
            seen[key]["duplicates"].append(t.number)
            continue
        record["duplicates"] = []
        seen[key] = record
        front.append(record)
    complete = [r for r in records if r["state"] == "COMPLETE"]
    return {
        "schema": 1,
        "sweep": sweep.recipe.name,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in space.objectives],
        "constraints": [c.text for c in space.constraints],
        "counts": {"complete": len(complete), "feasible": sum(_feasible(r, space) for r in complete),
                   "failed": sum(r["state"] == "FAIL" and r["failure_kind"] != "interrupted" for r in records),
                   "interrupted": sum(r["failure_kind"] == "interrupted" for r in records),
                   "running": sum(r["state"] == "RUNNING" for r in records)},
        "front": front,
        "profiles": [r["profile"] for r in front if r["profile"]],
        "trials": records,
    }


def write_pareto(folder: Path, sweep: Sweep, study) -> dict[str, Any]:
    summary = summarize_study(study, sweep, folder)
    write_json_atomic(folder / PARETO_FILE, summary)
    return summary


def profiles_of_front(path: str | Path) -> list[Path]:
    """The profile files a ``pareto.json`` lists (for ``edgesmith compare``), resolved beside it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: cannot read it as a sweep's pareto.json ({exc})") from exc
    if not isinstance(data, dict) or "front" not in data:
        raise BadInput(f"{path}: not a sweep's pareto.json (no 'front')")
    files = [path.parent / p for p in data.get("profiles", [])]
    if not files:
        raise BadInput(f"{path}: the front has no profiles (the sweep ran with profile: null); nothing to compare")
    return files


def is_pareto_file(path: str | Path) -> bool:
    path = Path(path)
    if path.name == PARETO_FILE:
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "front" in data and "objectives" in data


def _plot_axes(space: SearchSpace) -> tuple[Objective, Objective] | None:
    if len(space.objectives) < 2:
        return None
    minimise = [o for o in space.objectives if o.direction == "minimize"]
    maximise = [o for o in space.objectives if o.direction == "maximize"]
    if minimise and maximise:
        return minimise[0], maximise[0]
    return space.objectives[0], space.objectives[1]


def plot_front(summary: dict[str, Any], space: SearchSpace, path: Path,
               references: list[dict[str, Any]] | None = None) -> Path | None:
    """Every completed trial on the first two objectives (a cost on x, a quality on y when there
    are both), the front in blue, constraint violators as red crosses; ``references`` (each
    ``{"label": ..., "measured": {metric: value}}``, e.g. a peer toolkit's artifacts measured the
    same way) as labelled orange diamonds beside them."""
    axes = _plot_axes(space)
    complete = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    if axes is None or not complete:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from edgesmith.reports.plots import save_png

    x_obj, y_obj = axes
    scale = {"size": 1e-6}
    def xy(r):
        return (r["measured"][x_obj.metric] * scale.get(x_obj.metric, 1.0),
                r["measured"][y_obj.metric] * scale.get(y_obj.metric, 1.0))

    front_ids = {r["trial"] for r in summary["front"]}
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for r in complete:
        x, y = xy(r)
        if r["trial"] in front_ids:
            ax.scatter([x], [y], color="tab:blue", zorder=3)
            ax.annotate(f"t{r['trial']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        elif not _feasible(r, space):
            ax.scatter([x], [y], color="tab:red", marker="x", zorder=2)
        else:
            ax.scatter([x], [y], color="tab:gray", alpha=0.6, zorder=2)
    for ref in references or []:
        if x_obj.metric in ref["measured"] and y_obj.metric in ref["measured"]:
            x, y = xy(ref)
            ax.scatter([x], [y], color="tab:orange", marker="D", zorder=4)
            ax.annotate(ref["label"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8,
                        color="tab:orange")
    points = sorted(xy(r) for r in summary["front"])
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", alpha=0.5,
                drawstyle="steps-post" if x_obj.direction != y_obj.direction else "default", label="Pareto front")
        ax.legend(loc="best")
    unit = {"size": " (MB)", **{m: " (ms)" for m in LATENCY_METRICS}}
    ax.set_xlabel(f"{x_obj.metric}{unit.get(x_obj.metric, '')} — {x_obj.direction[:3]}")
    ax.set_ylabel(f"{y_obj.metric}{unit.get(y_obj.metric, '')} — {y_obj.direction[:3]}")
    ax.set_title(f"sweep {summary['sweep']}: {len(complete)} trials, {len(summary['front'])} on the front")
    ax.grid(True, alpha=0.3)
    return save_png(fig, path, 100)


def _params_text(params: dict[str, Any]) -> str:
    return describe_params(params) or "(the recipe as written)"


def markdown_report(summary: dict[str, Any], space: SearchSpace, *, plot: str | None, html: str | None) -> str:
    metrics = [o.metric for o in space.objectives]
    extra = [m for m in ("cosine", "recall@10", "latency_p50", "latency_p90", "size")
             if m not in metrics and any(m in r["measured"] for r in summary["front"])]
    columns = metrics + extra
    c = summary["counts"]
    lines = [f"# Sweep {summary['sweep']}", "",
             "Objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in space.objectives) + ".  ",
             "Constraints: " + (", ".join(f"`{t}`" for t in summary["constraints"]) or "none") + ".  ",
             f"Trials: {c['complete']} completed ({c['feasible']} within the constraints), {c['failed']} failed"
             + (f", {c['interrupted']} interrupted and run again" if c["interrupted"] else "") + ".", ""]
    if plot:
        lines += [f"![Pareto front]({plot})", ""]
    lines += ["## Pareto front", "", "| trial | variant | " + " | ".join(columns) + " | run folder |",
              "|---|---|" + "---|" * len(columns) + "---|"]
    for r in summary["front"]:
        dup = f" (= {', '.join(f't{d}' for d in r['duplicates'])})" if r["duplicates"] else ""
        cells = [format_metric(m, r["measured"][m]) if m in r["measured"] else "" for m in columns]
        lines.append(f"| t{r['trial']}{dup} | {_params_text(r['params'])} | " + " | ".join(cells) + f" | {r['run_dir']} |")
    if not summary["front"]:
        lines.append("| (no completed trial within the constraints) | | " + "| " * len(columns) + "|")
    lines += ["", "## All trials", "", "| trial | state | variant | " + " | ".join(columns) + " | note |",
              "|---|---|---|" + "---|" * len(columns) + "---|"]
    front_ids = {r["trial"] for r in summary["front"]}
    for r in summary["trials"]:
        cells = [format_metric(m, r["measured"][m]) if m in r["measured"] else "" for m in columns]
        if r["state"] == "FAIL":
            note = f"{r['failure_kind']}: {r['failure']}"
        elif r["state"] == "COMPLETE":
            note = "front" if r["trial"] in front_ids else ("violates a constraint" if not _feasible(r, space) else "")
        else:
            note = r["state"].lower()
        note = note.replace("|", "\\|")
        lines.append(f"| t{r['trial']} | {r['state'].lower()} | {_params_text(r['params'])} | "
                     + " | ".join(cells) + f" | {note} |")
    if html:
        lines += ["", (f"Profiles of the front, side by side: [{html}]({html}); "
                       f"`edgesmith compare {PARETO_FILE}` prints the same comparison.")]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, sweep: Sweep, summary: dict[str, Any]) -> Path:
    """``report.md`` (front table, all trials, plot) and ``report.html`` (the front's profiles, via
    :func:`edgesmith.reports.html.write_html`) when the front has profiles."""
    plot = None
    try:
        if plot_front(summary, sweep.space, folder / "pareto.png") is not None:
            plot = "pareto.png"
    except Exception as exc:
        log.warning("no Pareto plot: %s", exc)
    html = None
    front_runs = [folder / r["run_dir"] for r in summary["front"] if r["profile"] and r["run_dir"]]
    if front_runs:
        try:
            from edgesmith.reports.html import write_html

            write_html(front_runs, folder / "report.html", title=f"edgesmith sweep {summary['sweep']}: the Pareto front")
            html = "report.html"
        except (BadInput, OSError) as exc:
            log.warning("no HTML report: %s", exc)
    path = folder / "report.md"
    write_text_atomic(path, markdown_report(summary, sweep.space, plot=plot, html=html))
    return path
