"""``edgesmith targets`` (the device targets known here) and ``edgesmith report`` (one HTML page)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.common import JSON_OUT, console, print_json
from edgesmith.cli.root import app


@app.command("targets")
def targets_command(
    targets_dir: list[Path] = typer.Option([], "--targets-dir", help="Extra folder of target YAML files."),
    as_json: bool = JSON_OUT,
) -> None:
    """List device targets (shipped, ~/.config/edgesmith/targets/, and --targets-dir)."""
    from rich.table import Table

    from edgesmith.targets import load_targets, user_targets_dir

    targets = load_targets(targets_dir)
    if as_json:
        print_json({name: t.model_dump(mode="json") for name, t in targets.items()})
        return
    table = Table(title="device targets")
    for header in ("name", "runtime/provider", "also", "threads", "precisions", "shapes", "reach", "peak (dense)"):
        table.add_column(header, no_wrap=header == "name")
    for t in targets.values():
        peak = "-"
        if t.peak:
            parts = [f"fp32 {t.peak.fp32_tflops:g}T"]
            if t.peak.fp16_tflops:
                parts.append(f"fp16 {t.peak.fp16_tflops:g}T")
            if t.peak.int8_tops:
                parts.append(f"int8 {t.peak.int8_tops:g}T")
            parts.append(f"{t.peak.memory_bandwidth_gbs:g} GB/s")
            peak = ", ".join(parts)
        also = ", ".join(f"{a.runtime}/{a.provider}" for a in t.runtimes()[1:]) or "-"
        table.add_row(t.name, f"{t.runtime}/{t.provider}", also, str(t.threads or "default"), ",".join(t.precisions),
                      " ".join(f"{s.batch}x{s.seq}" for s in t.shapes), t.host or "ssh (--host)", peak)
    console.print(table)
    console.print(f"add your own: a YAML file in {user_targets_dir()} or --targets-dir")


@app.command("report")
def report_command(
    sources: list[Path] = typer.Argument(..., help="Run folders and/or profile JSON files."),
    html: Path = typer.Option(..., "--html", help="Write the self-contained HTML report here."),
    baseline: str = typer.Option("0", "--baseline", help="Index, label or artifact name of the baseline."),
    metric: str | None = typer.Option(None, "--metric", help="Quality metric of the Pareto plot (default: cosine)."),
    title: str | None = typer.Option(None, "--title", help="Title of the page."),
) -> None:
    """One HTML page: comparison table, quality-vs-latency Pareto plot, latency distributions, lineage."""
    from edgesmith.reports.html import write_html

    base: int | str = int(baseline) if baseline.isdigit() else baseline
    path = write_html(sources, html, title=title, baseline=base, metric=metric)
    console.print(f"report: {path}")
