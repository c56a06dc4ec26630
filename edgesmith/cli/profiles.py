"""``edgesmith profile`` and ``edgesmith compare``."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.app import app
from edgesmith.cli.common import JSON_OUT, console, err_console, print_json


@app.command("profile")
def profile_command(
    artifact: str = typer.Argument(..., help="Model folder, .onnx file, or 'minilm'."),
    runtime: str | None = typer.Option(None, "--runtime", help="torch or onnxruntime (default: the artifact's own)."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider / device: cpu, cuda, tensorrt."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    seq: int = typer.Option(128, "--seq", help="Sequence length (inputs are real sentences padded to it)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed warm-up iterations."),
    iterations: int = typer.Option(50, "--iterations", help="Timed iterations (at most)."),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Stop timing after this many seconds."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    label: str | None = typer.Option(None, "--label", help="Name of this profile in comparisons."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the profile JSON here."),
    as_json: bool = JSON_OUT,
) -> None:
    """Measure latency of an artifact on a runtime; write a versioned JSON profile."""
    from edgesmith.artifacts import load
    from edgesmith.profiling import profile

    prof = profile(load(artifact), runtime, batch=batch, seq=seq, warmup=warmup, iterations=iterations,
                   time_budget_s=time_budget, threads=threads, provider=provider, label=label,
                   progress=err_console.is_terminal and not as_json)
    if output is not None:
        prof.save(output)
    if as_json:
        typer.echo(prof.model_dump_json(indent=2))
        return
    s = prof.stats
    console.print(f"[bold]{prof.label}[/]  runtime {prof.runtime.name} on {', '.join(prof.runtime.providers)}  "
                  f"batch {batch} seq {seq}")
    console.print(f"p50 {s.p50:.2f} ms  p90 {s.p90:.2f} ms  p99 {s.p99:.2f} ms  mean {s.mean:.2f} ± {s.std:.2f} ms  "
                  f"(n={s.n})  throughput {prof.throughput:.1f}/s")
    if output is not None:
        console.print(f"profile: {output}")


@app.command("compare")
def compare_command(
    profiles: list[Path] = typer.Argument(..., help="Profile JSON files; the first is the baseline unless --baseline."),
    baseline: str = typer.Option("0", "--baseline", help="Index, label or artifact name of the baseline."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a quality-vs-latency PNG here (needs quality)."),
    metric: str = typer.Option("cosine", "--metric", help="Quality metric for --plot."),
    as_json: bool = JSON_OUT,
) -> None:
    """Profiles side by side: speedups with bootstrap 95 % intervals; noise is called noise."""
    from edgesmith.profiling import compare

    base: int | str = int(baseline) if baseline.isdigit() else baseline
    comparison = compare(profiles, baseline=base)
    if plot is not None:
        from edgesmith.plots import plot_quality_latency

        plot_quality_latency(comparison, plot, metric=metric)
    if as_json:
        print_json(comparison.model_dump(mode="json"))
        return
    console.print(comparison.table())
    if plot is not None:
        console.print(f"plot: {plot}")
