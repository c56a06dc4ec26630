"""One self-contained HTML page people want to read: profiles compared, plotted, and traced to their lineage.

``write_html(sources, path)`` takes run folders (``manifest.json`` + ``profiles/*.json``) and/or
profile files and writes a single HTML file with everything inline (plots as inline SVG, no
scripts, no external resources): the comparison table grouped by target, per-op deltas where both
profiles have per-op times, a quality-vs-latency plot with its Pareto front, the latency
distribution of every measured profile, each device's fingerprint, and each artifact's lineage
from the run's manifest. Estimates are labelled as estimates everywhere.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput
from edgesmith.profiling import Comparison, Profile, compare
from edgesmith.storage import write_text_atomic

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1f24;
background:#fff;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:2px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.3rem .6rem}
th{background:#f0f3f6;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.group td{background:#e7eefc;font-weight:600}
.faster{color:#1a7f37;font-weight:600}.slower{color:#cf222e;font-weight:600}.noise{color:#9a6700}
.estimate{color:#8250df;font-style:italic}.muted{color:#57606a}
.plot{margin:1rem 0;border:1px solid #d0d7de;display:inline-block}
code{background:#f0f3f6;padding:0 .2rem;border-radius:3px}details{margin:.4rem 0}
"""


@dataclass
class ReportInput:
    profiles: list[Profile] = field(default_factory=list)
    manifests: list[tuple[Path, dict]] = field(default_factory=list)


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{folder}/manifest.json: cannot read it ({exc}); give a run folder written by `edgesmith run`") from exc


def _run_profiles(folder: Path, manifest: dict) -> list[Path]:
    listed = [folder / p["file"] for p in manifest.get("profiles", []) if isinstance(p, dict) and p.get("file")]
    found = sorted((folder / "profiles").glob("*.json")) if (folder / "profiles").is_dir() else []
    ordered = [p for p in listed if p.exists()] + [p for p in found if p not in listed]
    return ordered


def collect(sources: Sequence[str | Path]) -> ReportInput:
    """Profiles and manifests from run folders and profile files, in the order given."""
    if not sources:
        raise BadInput("nothing to report: give a run folder or profile JSON files")
    data = ReportInput()
    for source in map(Path, sources):
        if source.is_dir():
            if not (source / "manifest.json").exists():
                raise BadInput(f"{source}: not a run folder (no manifest.json); give a run folder or profile files")
            manifest = _read_manifest(source)
            data.manifests.append((source, manifest))
            data.profiles += [Profile.load(p) for p in _run_profiles(source, manifest)]
        else:
            data.profiles.append(Profile.load(source))
    if not data.profiles and not data.manifests:
        raise BadInput("no profiles found in " + ", ".join(map(str, sources)))
    return data


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib → inline SVG)
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(fig, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def pareto_svg(comparison: Comparison, metric: str) -> str | None:
    from edgesmith.reports.plots import pareto_front, points_of

    points = points_of(comparison, metric)
    if not points:
        return None
    estimates = {r.label for r in comparison.rows if r.kind == "estimate"}
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    front = pareto_front(points)
    on_front = set(front)
    for p in points:
        ax.scatter([p.latency_ms], [p.quality], zorder=3, marker="D" if p.label in estimates else "o",
                   facecolors="none" if p.label in estimates else ("tab:blue" if p in on_front else "tab:gray"),
                   edgecolors="tab:purple" if p.label in estimates else "none")
        ax.annotate(p.label + (" (estimate)" if p.label in estimates else ""), (p.latency_ms, p.quality),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.plot([p.latency_ms for p in front], [p.quality for p in front], drawstyle="steps-post", color="tab:blue",
            alpha=0.6, label="Pareto front")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency")
    ax.margins(x=0.15, y=0.1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _svg(fig, "pareto")


def distribution_svg(profiles: Sequence[Profile]) -> str | None:
    measured = [p for p in profiles if not p.is_estimate and p.latencies_ms]
    if not measured:
        return None
    fig = _figure(8, max(2.5, 0.55 * len(measured) + 1.2))
    ax = fig.add_subplot()
    ax.boxplot([p.latencies_ms for p in measured], orientation="horizontal", showfliers=True,
               flierprops={"markersize": 3, "alpha": 0.5})
    ax.set_yticks(range(1, len(measured) + 1), [f"{p.label} [{p.target}]" for p in measured], fontsize=8)
    ax.set_xlabel("latency per run (ms), every timed iteration")
    ax.set_title("latency distributions")
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, "distribution")


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _verdict_class(verdict: str) -> str:
    return {"faster": "faster", "slower": "slower", "within noise": "noise", "estimate": "estimate"}.get(verdict, "")


def comparison_html(comparison: Comparison) -> str:
    from edgesmith.reports.comparison import cells as row_cells
    from edgesmith.reports.comparison import headers as header_row

    headers = header_row(comparison)
    cells_by_row = [row_cells(comparison, r) for r in comparison.rows]
    numeric = {"p50 ms", "p90 ms", "size MB", *comparison.quality_metrics()}
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    previous = None
    for row, cells in zip(comparison.rows, cells_by_row):
        if row.target != previous:
            out.append(f'<tr class="group"><td colspan="{len(headers)}">target: {_e(row.target)}</td></tr>')
            previous = row.target
        tds = []
        for header, cell in zip(headers, cells):
            cls = "num" if header in numeric else _verdict_class(cell) if header == "verdict" else ""
            if row.kind == "estimate" and header == "label":
                cls = "estimate"
            tds.append(f'<td class="{cls}">{_e(cell)}</td>' if cls else f"<td>{_e(cell)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    out.append(f'<p class="muted">Speedup = median(baseline) / median(row), with a {comparison.confidence:.0%} '
               "bootstrap interval; a verdict is only given when the interval excludes 1. Rows marked "
               "<span class=\"estimate\">estimate</span> are roofline estimates from published peaks, never measurements."
               "</p>")
    exits = comparison.early_exit_lines()
    if exits:
        out.append("<ul>" + "".join(f"<li>Early exit, {_e(line)}</li>" for line in exits) + "</ul>")
    return "\n".join(out)


def op_deltas_html(comparison: Comparison) -> str:
    base = comparison.rows[comparison.baseline]
    parts = []
    for row in comparison.rows:
        if not row.op_deltas:
            continue
        rows = "".join(
            f"<tr><td>{_e(d.key)}</td><td>{_e(d.level)}</td><td class=\"num\">{d.baseline_ms:.3f}</td>"
            f"<td class=\"num\">{d.ms:.3f}</td><td class=\"num {'faster' if d.delta_ms < 0 else 'slower'}\">"
            f"{d.delta_ms:+.3f}</td></tr>" for d in row.op_deltas)
        parts.append(f"<h3>{_e(row.label)} vs {_e(base.label)}</h3><table><thead><tr><th>op</th><th>level</th>"
                     f"<th>baseline ms</th><th>ms</th><th>delta ms</th></tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(parts)


def environment_html(profiles: Sequence[Profile]) -> str:
    seen: dict[str, Profile] = {}
    for p in profiles:
        seen.setdefault(f"{p.target}|{p.environment.host}|{p.environment.cpu_model}", p)
    rows = []
    for p in seen.values():
        env = p.environment
        libs = ", ".join(f"{k} {v}" for k, v in env.libraries.items() if v)
        jetson = "; ".join(x for x in (env.l4t_release, env.power_mode, env.clocks) if x)
        rows.append("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in (
            p.target + (" (estimate)" if p.is_estimate else ""), env.host or "-", env.cpu_model,
            env.cores if env.cores is not None else "-", f"{env.memory_mb:.0f}" if env.memory_mb else "-",
            env.gpu.name if env.gpu else "-", env.uname or f"{env.os} {env.kernel}".strip(), libs or "-",
            jetson or "-")) + "</tr>")
    return ("<table><thead><tr><th>target</th><th>host</th><th>CPU</th><th>cores</th><th>memory MB</th><th>GPU</th>"
            "<th>system</th><th>libraries</th><th>Jetson L4T / power mode / clocks</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def lineage_html(data: ReportInput) -> str:
    if not data.manifests:
        hashes = ", ".join(sorted({f"{p.artifact.name} ({p.artifact.hash[:12]})" for p in data.profiles}))
        return f'<p class="muted">No run folder given: lineage is recorded in run folders. Artifacts: {_e(hashes)}.</p>'
    by_hash = {p.artifact.hash: p for p in data.profiles}
    parts = []
    for folder, manifest in data.manifests:
        source = manifest.get("source", {})
        parts.append(f"<h3>run {_e(folder.name)}</h3><p>source <code>{_e(source.get('model', '?'))}</code> "
                     f"({_e(source.get('kind', '?'))}, hash <code>{_e(str(source.get('content_hash', ''))[:12])}</code>)"
                     f"{', created ' + _e(manifest['created']) if manifest.get('created') else ''}; deployable: "
                     f"<b>{'yes' if manifest.get('deployable') else 'no'}</b></p>")
        rows = []
        for step in manifest.get("steps", []):
            profiled = by_hash.get(step.get("output_hash", ""))
            config = json.dumps(step.get("config", {}), sort_keys=True)
            rows.append("<tr>" + "".join([
                f"<td>{_e(step.get('id'))}</td>", f"<td>{_e(step.get('pass'))}</td>",
                f"<td><details><summary>config</summary><code>{_e(config)}</code></details></td>",
                f"<td><code>{_e(str(step.get('input_hash', ''))[:12])}</code> → "
                f"<code>{_e(str(step.get('output_hash', ''))[:12])}</code></td>",
                f"<td>{'cached' if step.get('cached') else _e(step.get('seconds', '-'))}</td>",
                f"<td>{_e(profiled.label) if profiled else '-'}</td>"]) + "</tr>")
        parts.append("<table><thead><tr><th>step</th><th>pass</th><th>config</th><th>input → output hash</th>"
                     "<th>seconds</th><th>profiled as</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
        metrics = manifest.get("metrics") or {}
        if metrics:
            names = sorted({k for m in metrics.values() for k in m})
            body = "".join(f"<tr><td>{_e(a)}</td>" + "".join(
                f'<td class="num">{m[n]:.4f}</td>' if n in m else "<td>-</td>" for n in names) + "</tr>"
                for a, m in metrics.items())
            parts.append("<table><thead><tr><th>artifact</th>" + "".join(f"<th>{_e(n)}</th>" for n in names)
                         + "</tr></thead><tbody>" + body + "</tbody></table>")
    return "\n".join(parts)


def _metric(comparison: Comparison, metric: str | None) -> str | None:
    metrics = comparison.quality_metrics()
    if metric:
        return metric
    return "cosine" if "cosine" in metrics else (metrics[0] if metrics else None)


def render(data: ReportInput, *, title: str = "edgesmith report", baseline: int | str = 0,
           metric: str | None = None) -> str:
    """The report as one HTML string (no external resources, no scripts)."""
    sections = [f"<h1>{_e(title)}</h1><p class=\"muted\">generated "
                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by edgesmith</p>"]
    if data.profiles:
        comparison = compare(data.profiles, baseline=baseline)
        ordered = [p for p in data.profiles]
        sections.append("<h2>Comparison</h2>" + comparison_html(comparison))
        deltas = op_deltas_html(comparison)
        if deltas:
            sections.append("<h2>Per-op deltas</h2>" + deltas)
        chosen = _metric(comparison, metric)
        pareto = pareto_svg(comparison, chosen) if chosen else None
        sections.append("<h2>Quality vs latency</h2>" + (
            f'<div class="plot" id="pareto">{pareto}</div>' if pareto else
            '<p class="muted">No profile carries a quality metric: evaluate the models (edgesmith run) '
            "to plot quality against latency.</p>"))
        dist = distribution_svg(ordered)
        sections.append("<h2>Latency distributions</h2>" + (
            f'<div class="plot" id="distribution">{dist}</div>' if dist else
            '<p class="muted">Only estimates: nothing was measured.</p>'))
        sections.append("<h2>Where it ran</h2>" + environment_html(ordered))
    sections.append("<h2>Lineage</h2>" + lineage_html(data))
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def write_html(sources: Sequence[str | Path], path: str | Path, *, title: str | None = None,
               baseline: int | str = 0, metric: str | None = None) -> Path:
    """Write the report for ``sources`` (run folders and/or profile files) to ``path`` atomically."""
    data = collect(sources)
    if title is None:
        names = [f.name for f, _ in data.manifests] or [p.label for p in data.profiles[:3]]
        title = "edgesmith report: " + ", ".join(names)
    text = render(data, title=title, baseline=baseline, metric=metric)
    if re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text):
        raise RuntimeError("the report would load an external resource; it must be self-contained")
    path = Path(path)
    write_text_atomic(path, text)
    return path
