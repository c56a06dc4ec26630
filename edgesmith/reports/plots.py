"""Plots for reports: quality against latency, with the Pareto front (matplotlib, Agg backend)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import BadInput
from edgesmith.profiling import Comparison, Profile, compare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    label: str
    latency_ms: float
    quality: float


def points_of(source: Comparison | Sequence[Profile], metric: str) -> list[Point]:
    """(label, p50, quality[metric]) of every row or profile that has the metric."""
    rows = source.rows if isinstance(source, Comparison) else compare(list(source)).rows if source else []
    points = [Point(r.label, r.p50, float(r.quality[metric])) for r in rows if metric in r.quality]
    skipped = [r.label for r in rows if metric not in r.quality]
    if skipped:
        log.info("no '%s' quality for %s: left out of the plot", metric, ", ".join(skipped))
    return points


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both axes (lower latency, higher quality), by latency."""
    front: list[Point] = []
    best = float("-inf")
    for point in sorted(points, key=lambda p: (p.latency_ms, -p.quality)):
        if point.quality > best:
            front.append(point)
            best = point.quality
    return front


def plot_quality_latency(source: Comparison | Sequence[Profile], path: str | Path, metric: str = "cosine", *,
                         size: tuple[int, int] = (800, 600), dpi: int = 100, title: str | None = None) -> Path:
    """Scatter quality (y) against p50 latency (x), label each point, draw the Pareto front, save a
    PNG of exactly ``size`` pixels (width, height) to ``path`` (atomically)."""
    points = points_of(source, metric)
    if not points:
        raise BadInput(f"no profile has the quality metric '{metric}'; evaluate the models first "
                       "or plot a metric the profiles carry")
    if size[0] < 50 or size[1] < 50 or dpi < 1:
        raise BadInput(f"plot size {size[0]}x{size[1]} px at {dpi} dpi is too small")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    front = pareto_front(points)
    on_front = set(front)
    ax.scatter([p.latency_ms for p in points], [p.quality for p in points],
               c=["tab:blue" if p in on_front else "tab:gray" for p in points], zorder=3)
    ax.plot([p.latency_ms for p in front], [p.quality for p in front], drawstyle="steps-post",
            color="tab:blue", alpha=0.6, label="Pareto front", zorder=2)
    for p in points:
        ax.annotate(p.label, (p.latency_ms, p.quality), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs latency")
    ax.margins(x=0.12, y=0.08)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return save_png(fig, Path(path), dpi)


def save_png(fig, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
