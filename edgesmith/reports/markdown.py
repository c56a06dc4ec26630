"""The Markdown report of a run folder (``report.md``): what a person reads after ``edgesmith run``."""

from __future__ import annotations

import logging
from pathlib import Path

from edgesmith.errors import BadInput
from edgesmith.reports.plots import plot_quality_latency
from edgesmith.storage import write_text_atomic

log = logging.getLogger(__name__)


def write_run_report(run_dir: Path, name: str, model: str, manifest: dict, comparison, metrics: dict[str, dict[str, float]],
                     profiles: list | None = None) -> Path:
    """``report.md`` of a run folder: gates, steps, quality against the source, latency and the
    quality-vs-latency plot; returns its path."""
    lines = [f"# edgesmith run: {name}", "", f"Created {manifest['created']} from model `{model}`.", ""]
    gates = manifest.get("gates", {})
    if gates.get("rules"):
        verdict = "passed" if gates.get("passed") else "**FAILED**"
        lines += [f"Quality gates on `{gates['final_artifact']}`: {verdict} "
                  f"({', '.join(f'{k} drop ≤ {v}' for k, v in gates['rules'].items())}).", ""]
        for failure in gates.get("failures", []):
            lines.append(f"- {failure['metric']}: {failure['value']:.4f} vs {failure['reference']:.4f} "
                         f"(drop {failure['drop']:.4f} > {failure['max_drop']})")
        lines.append("")
    lines.append(f"Deployable: **{'yes' if manifest.get('deployable') else 'no'}**")
    lines.append("")
    for warning in manifest.get("warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    lines += ["## Steps", "", "| step | pass | cached | seconds | output hash |", "|---|---|---|---|---|"]
    for s in manifest["steps"]:
        lines.append(f"| {s['id']} | {s['pass']} | {'yes' if s['cached'] else 'no'} | {s['seconds']:.1f} | "
                     f"`{s['output_hash'][:12]}` |")
    if metrics:
        names = sorted({k for m in metrics.values() for k in m})
        lines += ["", "## Quality against the source model", "", "| artifact | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for art_id, m in metrics.items():
            lines.append(f"| {art_id} | " + " | ".join(f"{m[n]:.4f}" if n in m else "" for n in names) + " |")
    if comparison is not None:
        lines += ["", "## Latency", "", comparison.markdown()]
        try:
            plot_quality_latency(profiles, run_dir / "quality-vs-latency.png", metric="cosine")
            lines += ["", "![quality vs latency](quality-vs-latency.png)"]
        except BadInput as exc:
            log.info("no plot: %s", exc)
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
