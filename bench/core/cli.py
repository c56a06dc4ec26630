"""The arguments every benchmark takes the same way: threads, rounds, block, warm-up, output."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.core.results import RESULTS


def add_timing_args(p: argparse.ArgumentParser, *, rounds: int, threads: int | None = 2, block: int | None = None,
                    warmup: int | None = None) -> argparse.ArgumentParser:
    """``--threads --rounds`` (and ``--block --warmup`` when the benchmark times blocks) with its defaults."""
    p.add_argument("--threads", type=int, default=threads, help=f"threads of every contender (default {threads})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"rotating rounds (default {rounds})")
    if block is not None:
        p.add_argument("--block", type=int, default=block, help=f"timed runs per contender per round (default {block})")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs before each block (default {warmup})")
    return p


def add_output_args(p: argparse.ArgumentParser, stem: str, *, render_only: bool = True) -> argparse.ArgumentParser:
    """``--out`` (bench/results/STEM.md; its .json beside it) and ``--render-only``."""
    p.add_argument("--out", type=Path, default=RESULTS / f"{stem}.md",
                   help=f"the Markdown table; the raw JSON goes beside it (default bench/results/{stem}.md)")
    if render_only:
        p.add_argument("--render-only", action="store_true", help="rebuild --out from its JSON; measure nothing")
    return p


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """One usage line (exit 2) when a count is below 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
