"""Rendering a profile comparison (:class:`edgesmith.profiling.compare.Comparison`): the console
table (rich), its per-op deltas, and the Markdown table of report.md.

``report.md`` (and the HTML report) show every column. The console table folds the columns that
say the same on every row into its title and leaves a few to the JSON and Markdown; when even
that grid is wider than the terminal (a decoder comparison has 14 columns: in 80 columns it was a
grid of ellipses), it prints one block per artifact instead: a row per measure (value, speedup
against the baseline with its interval, verdict), the artifact's label on the block's first line.
The comparison is read through its fields only (rows, baseline, confidence, prompt lengths,
quality metrics), so this module imports nothing of :mod:`edgesmith.profiling`.
"""

from __future__ import annotations

from typing import Any

VERDICT_HEADER = "verdict"
#: columns the compact table folds into its title when every row has the same value
COMPACT_DROPPABLE = ("target", "artifact", "runtime", "provider", "shapes")
#: columns the compact table leaves to the JSON and Markdown outputs
COMPACT_HIDDEN = ("artifact", "runtime", "cosine_min", "ms/token p50")
#: verdicts' colours in the console
STYLES = {"faster": "green", "slower": "red", "baseline": "bold", "within noise": "yellow",
          "different shapes": "dim", "estimate": "magenta"}


# ---------------------------------------------------------------------------------------------
# Cells: one list per row, every column (Markdown, HTML, and the console grid's source)
# ---------------------------------------------------------------------------------------------


def headers(comparison: Any) -> list[str]:
    """Every column's header, in order."""
    if comparison.is_generation:
        ttft = [h for n in comparison.prompt_lengths() for h in (f"TTFT@{n} ms", f"TTFT@{n} speedup")]
        return (["label", "target", "artifact", "runtime", "provider", "shapes", "decode tok/s", "ms/token p50",
                 f"decode speedup [{comparison.confidence:.0%} CI]", VERDICT_HEADER] + ttft
                + comparison.quality_metrics() + ["peak RSS MB", "size MB"])
    return (["label", "target", "artifact", "runtime", "provider", "shapes", "p50 ms", "p90 ms",
             f"speedup [{comparison.confidence:.0%} CI]", VERDICT_HEADER] + comparison.quality_metrics() + ["size MB"])


def _label(row: Any) -> str:
    return f"{row.label} (estimate)" if row.kind == "estimate" else row.label


def _provider(row: Any) -> str:
    return "roofline estimate" if row.kind == "estimate" else row.provider.removesuffix("ExecutionProvider")


def cells(comparison: Any, row: Any, *, words: bool = True) -> list[str]:
    """One row's cells; ``words``: TTFT verdicts spelled out (Markdown) rather than left to colour."""
    quality = [_quality_text(row.quality.get(m)) for m in comparison.quality_metrics()]
    head = [_label(row), row.target, row.artifact, row.runtime, _provider(row)]
    if row.generation is not None:
        gen = row.generation
        ttft = []
        for n in comparison.prompt_lengths():
            ttft += [_ms_text(gen.ttft_ms.get(n)), _ratio_text(gen.ttft.get(n), words=words)]
        return (head + [f"{row.shapes}+{gen.new_tokens}", f"{gen.decode_tokens_per_s:.1f}", f"{row.p50:.2f}",
                        _speedup_text(row), row.verdict] + ttft + quality
                + ["-" if gen.peak_rss_mb is None else f"{gen.peak_rss_mb:.0f}", f"{row.size_mb:.1f}"])
    return (head + [str(row.shapes), f"{row.p50:.2f}", f"{row.p90:.2f}", _speedup_text(row), row.verdict]
            + quality + [f"{row.size_mb:.1f}"])


def numeric(comparison: Any) -> set[str]:
    """Right-aligned columns."""
    ttft = {f"TTFT@{n} ms" for n in comparison.prompt_lengths()}
    return {"p50 ms", "p90 ms", "size MB", "decode tok/s", "ms/token p50", "peak RSS MB", *ttft,
            *comparison.quality_metrics()}


def compact(comparison: Any) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers and cells without the columns that say the same on every row (named in a note instead)."""
    all_headers, rows = headers(comparison), [cells(comparison, row, words=False) for row in comparison.rows]
    keep, notes = [], []
    for i, header in enumerate(all_headers):
        values = {c[i] for c in rows}
        if header in COMPACT_DROPPABLE and len(values) == 1 and len(rows) > 1:
            notes.append(f"{header} {next(iter(values))}")
        elif header not in COMPACT_HIDDEN:
            keep.append(i)
    return [all_headers[i] for i in keep], [[c[i] for i in keep] for c in rows], notes


# ---------------------------------------------------------------------------------------------
# The console
# ---------------------------------------------------------------------------------------------


def table(comparison: Any, title: str | None = "latency comparison", *, compact_columns: bool = True,
          width: int | None = None):
    """A rich Table of the rows (verdicts coloured); ``compact_columns`` folds columns equal on
    every row into the title. With ``width`` (the terminal's columns), a grid wider than that
    becomes :func:`blocks`: one block of rows per artifact, which reads at 80 columns."""
    grid = _grid(comparison, title, compact_columns=compact_columns)
    if width is not None and _width_of(grid, width) > width:
        return blocks(comparison, title)
    return grid


def _width_of(renderable, width: int) -> int:
    """The columns ``renderable`` needs to print without wrapping or cutting a cell."""
    from rich.console import Console

    return Console(width=max(width, 1000)).measure(renderable).maximum


def _title(comparison: Any, title: str | None) -> tuple[list[str], list[list[str]], str | None]:
    shown, rows, notes = compact(comparison)
    return shown, rows, (f"{title} ({', '.join(notes)})" if title and notes else title)


def _grid(comparison: Any, title: str | None, *, compact_columns: bool):
    from rich.markup import escape
    from rich.table import Table

    if compact_columns:
        shown, rows_cells, title = _title(comparison, title)
    else:
        shown = headers(comparison)
        rows_cells = [cells(comparison, row, words=False) for row in comparison.rows]
    grid = Table(title=title)
    right = numeric(comparison)
    wide = comparison.is_generation
    for header in shown:
        # generation tables are wide: long headers on two lines, intervals never broken
        grid.add_column(header.replace(" ", "\n", 1) if wide and len(header) > 8 else header,
                        justify="right" if header in right else "left", no_wrap=wide and "speedup" in header)
    verdict_column = shown.index(VERDICT_HEADER)
    previous = None
    for row, row_cells in zip(comparison.rows, rows_cells):
        out = [escape(c) for c in row_cells]
        out[verdict_column] = f"[{STYLES[row.verdict]}]{out[verdict_column]}[/]"
        for n, ratio in (row.generation.ttft.items() if row.generation is not None else ()):
            if f"TTFT@{n} speedup" in shown:
                at = shown.index(f"TTFT@{n} speedup")
                out[at] = f"[{STYLES[ratio.verdict]}]{out[at]}[/]"
        grid.add_row(*out, end_section=False)
        if previous is not None and previous != row.target:
            grid.rows[-2].end_section = True
        previous = row.target
    return grid


def _measures(comparison: Any, row: Any) -> list[tuple[str, str, str, str]]:
    """A block's rows: (measure, value, speedup against the baseline, verdict)."""
    quality = [(m, _quality_text(row.quality.get(m)), "", "") for m in comparison.quality_metrics()]
    if row.generation is None:
        return ([("p50 ms", f"{row.p50:.2f}", _speedup_text(row), row.verdict), ("p90 ms", f"{row.p90:.2f}", "", "")]
                + quality + [("size MB", f"{row.size_mb:.1f}", "", "")])
    gen = row.generation
    out = [("decode tok/s", f"{gen.decode_tokens_per_s:.1f}", _speedup_text(row), row.verdict),
           ("ms/token p50", f"{row.p50:.2f}", "", "")]
    for n in comparison.prompt_lengths():
        ratio = gen.ttft.get(n)
        out.append((f"TTFT@{n} ms", _ms_text(gen.ttft_ms.get(n)), _ratio_text(ratio, words=False),
                    ratio.verdict if ratio is not None and ratio.verdict != "different shapes" else ""))
    rss = "-" if gen.peak_rss_mb is None else f"{gen.peak_rss_mb:.0f}"
    return out + quality + [("peak RSS MB", rss, "", ""), ("size MB", f"{row.size_mb:.1f}", "", "")]


def blocks(comparison: Any, title: str | None = "latency comparison"):
    """The comparison as one block per artifact (a rich Table of four narrow columns): the label
    line (with what differs between rows: target, runtime, provider, shapes), then a row per
    measure. Every cell fits 80 columns; a long label folds onto a second line."""
    from rich.markup import escape
    from rich.table import Table

    _, _, title = _title(comparison, title)
    all_headers = headers(comparison)
    rows_cells = [cells(comparison, row, words=False) for row in comparison.rows]
    # what tells the rows apart besides their labels (what is the same everywhere is in the title)
    described = [h for h in ("target", "runtime", "provider", "shapes")
                 if len({c[all_headers.index(h)] for c in rows_cells}) > 1]
    out = Table(title=title)
    out.add_column("artifact / measure", overflow="fold")
    out.add_column("value", justify="right", no_wrap=True)
    out.add_column(f"vs baseline [{comparison.confidence:.0%} CI]", no_wrap=True)
    out.add_column(VERDICT_HEADER, no_wrap=True)
    for row, full in zip(comparison.rows, rows_cells):
        about = ", ".join(full[all_headers.index(h)] for h in described)
        out.add_row(f"[bold]{escape(_label(row))}[/]" + (f" ({escape(about)})" if about else ""), "", "", "")
        for measure, value, ratio, verdict in _measures(comparison, row):
            out.add_row(f"  {escape(measure)}", escape(value), escape(ratio),
                        f"[{STYLES[verdict]}]{escape(verdict)}[/]" if verdict else "")
        out.rows[-1].end_section = True
    return out


def op_delta_table(comparison: Any, row: Any):
    """A rich Table of one row's per-op deltas against the baseline (largest changes first)."""
    from rich.markup import escape
    from rich.table import Table

    base = comparison.rows[comparison.baseline]
    out = Table(title=f"per-op: {escape(row.label)} vs {escape(base.label)} (ms per run)")
    for header in ("op", "level", "baseline ms", "ms", "delta ms"):
        out.add_column(header, justify="left" if header in ("op", "level") else "right")
    for d in row.op_deltas or []:
        colour = "green" if d.delta_ms < 0 else "red" if d.delta_ms > 0 else ""
        delta = f"{d.delta_ms:+.3f}"
        out.add_row(escape(d.key), d.level, f"{d.baseline_ms:.3f}", f"{d.ms:.3f}",
                    f"[{colour}]{delta}[/]" if colour else delta)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown (report.md): every column
# ---------------------------------------------------------------------------------------------


def markdown(comparison: Any) -> str:
    """A Markdown table for report.md, every column, and a sentence per early-exit row."""
    shown = headers(comparison)
    right = numeric(comparison) - set(comparison.quality_metrics())
    lines = ["| " + " | ".join(shown) + " |",
             "|" + "|".join("---:" if h in right else "---" for h in shown) + "|"]
    for row in comparison.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(comparison, row)) + " |")
    exits = comparison.early_exit_lines()
    if exits:
        lines += [""] + [f"- Early exit, {line}" for line in exits]
    return "\n".join(lines) + "\n"


def _speedup_text(row: Any) -> str:
    if row.verdict == "baseline":
        return "1.00x"
    if row.speedup is None:
        return "-"
    if row.ci_low is None or row.ci_high is None:
        return f"{row.speedup:.2f}x"
    return f"{row.speedup:.2f}x [{row.ci_low:.2f}-{row.ci_high:.2f}]"


def _ratio_text(ratio: Any, *, words: bool = True) -> str:
    """A TTFT cell: the speedup, its interval and (``words``) the verdict."""
    if ratio is None or ratio.verdict == "different shapes":
        return "-"
    if ratio.verdict == "baseline":
        return "1.00x"
    if ratio.speedup is None:
        return "-"
    interval = "" if ratio.ci_low is None or ratio.ci_high is None else f" [{ratio.ci_low:.2f}-{ratio.ci_high:.2f}]"
    return f"{ratio.speedup:.2f}x{interval}" + (f" {ratio.verdict}" if words else "")


def _ms_text(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _quality_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
