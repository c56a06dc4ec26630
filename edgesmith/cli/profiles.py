"""``edgesmith profile`` and ``edgesmith compare``.

A decoder (task text-generation) is profiled as generation: ``--prompt-tokens``, ``--new-tokens``
and ``--rounds``; every other artifact as one forward pass at ``--batch`` x ``--seq``. A flag of the
other kind is refused (exit 2), never ignored.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgesmith.cli.common import JSON_OUT, console, err_console, print_json
from edgesmith.cli.root import app


@app.command("profile")
def profile_command(
    artifact: str = typer.Argument(..., help="Model folder, .onnx or .gguf file, 'minilm' or 'smollm2'."),
    runtime: str | None = typer.Option(None, "--runtime", help="torch, onnxruntime, tensorrt, llamacpp (a "
                                       ".gguf file as it is) or ortgenai (an ORT GenAI folder in its own generation "
                                       "loop) (default: the artifact's own)."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider / device: cpu, cuda, tensorrt."),
    device: str | None = typer.Option(None, "--device", help="torch device: cpu, cuda or cuda:N (same as --provider "
                                      "for --runtime torch)."),
    dtype: str | None = typer.Option(None, "--dtype", help="torch: fp32, fp16 or bf16."),
    compile_: bool = typer.Option(False, "--compile", help="torch: run through torch.compile."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="torch on CUDA: replay CUDA graphs."),
    provider_option: list[str] = typer.Option([], "--provider-option", help="ONNX Runtime provider option "
                                              "KEY=VALUE (repeatable), e.g. trt_fp16_enable=True."),
    batch_text: str = typer.Option("1", "--batch", help="Batch size; decoders: a list (1,2,4,8), mixed prompts."),
    seq: int = typer.Option(128, "--seq", help="Sequence length (inputs are real sentences padded to it)."),
    warmup: int | None = typer.Option(None, "--warmup", help="Untimed warm-up iterations (default 5); for a "
                                      "decoder, untimed rounds (default 1)."),
    prompt_tokens: str | None = typer.Option(None, "--prompt-tokens", help="Decoders: prompt lengths timed for "
                                             "the time to first token, comma-separated (default 128,512); decode "
                                             "follows the first."),
    new_tokens: int | None = typer.Option(None, "--new-tokens", help="Decoders: tokens generated greedily, EOS "
                                          "ignored (default 128)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Decoders: timed rounds (default 3)."),
    iterations: int = typer.Option(50, "--iterations", help="Timed iterations (at most)."),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Stop timing after this many seconds."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    label: str | None = typer.Option(None, "--label", help="Name of this profile in comparisons."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the profile JSON here."),
    target: str | None = typer.Option(None, "--target", help="A target name (edgesmith targets) or "
                                      "ssh://user@host:port: profile on that device over ssh."),
    host: str | None = typer.Option(None, "--host", help="Where the target is: an ~/.ssh/config alias, user@host, "
                                    "user@host:port, or 'local'."),
    ssh_config: Path | None = typer.Option(None, "--ssh-config", help="An ssh config file (ssh -F)."),
    targets_dir: list[Path] = typer.Option([], "--targets-dir", help="Extra folder of target YAML files."),
    estimate: bool = typer.Option(False, "--estimate", help="No measurement: a roofline estimate from the "
                                  "target's published peaks (labelled as an estimate)."),
    per_op: bool = typer.Option(False, "--per-op", help="Also record per-op times (ONNX Runtime's profiler)."),
    precision: str | None = typer.Option(None, "--precision", help="TensorRT build precision: fp32, fp16, int8."),
    timeout: float | None = typer.Option(None, "--timeout", help="Longest a device profile may take, seconds."),
    as_json: bool = JSON_OUT,
) -> None:
    """Measure latency of an artifact on a runtime, here or on a device over ssh; write a versioned JSON profile.

    A decoder (text-generation) is profiled as generation: time to first token per prompt length,
    prefill and decode tokens/s, raw per-token latencies, peak RSS, load time."""
    from edgesmith.artifacts import load
    from edgesmith.profiling.generation import is_decoder
    from edgesmith.runtimes.base import get_runtime

    # read as the runtime reads it (llama.cpp: the GGUF file as it is, never dequantized into a torch model)
    art = get_runtime(runtime).load_artifact(artifact) if runtime is not None else load(artifact)
    batch, batches = _batch_sizes(art, batch_text)  # a list of sizes: a decoder's batched profiles
    if is_decoder(art):
        remote = batches is None and runtime is not None and get_runtime(runtime).remote_generation  # llama.cpp
        _refuse_forward_flags(art, remote, (
            ("--seq", seq != 128), ("--iterations", iterations != 50), ("--time-budget", time_budget is not None),
            ("--target", target is not None and not remote), ("--host", host is not None and not remote),
            ("--ssh-config", ssh_config is not None and not remote), ("--estimate", estimate), ("--per-op", per_op),
            ("--precision", precision is not None), ("--timeout", timeout is not None and not remote),
            ("--device", device is not None), ("--dtype", dtype is not None), ("--compile", compile_),
            ("--cuda-graphs", cuda_graphs), ("--provider-option", bool(provider_option))))
        remote_prof = _remote_generation(art, target=target, host=host, ssh_config=ssh_config,
                                         targets_dir=targets_dir, prompt_tokens=prompt_tokens,
                                         new_tokens=new_tokens, rounds=rounds, warmup=warmup, threads=threads,
                                         timeout=timeout, label=label, batch=batch) \
            if remote and (target, host, ssh_config, timeout) != (None, None, None, None) else None
        _generation_profile(art, runtime=runtime, provider=provider, batch=batches or batch, warmup=warmup,
                            prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, threads=threads,
                            label=label, output=output, as_json=as_json, prof=remote_prof)
        return
    _refuse_generation_flags(art, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds)
    warmup = 5 if warmup is None else warmup
    provider, extra = _gpu_options(art, runtime, provider, device, dtype, compile_, cuda_graphs, provider_option)
    _refuse_remote_gpu_flags(extra, target)
    prof = _profile_for(art, target=target, host=host, ssh_config=ssh_config, targets_dir=targets_dir,
                        estimate=estimate, runtime=runtime, provider=provider, batch=batch, seq=seq, warmup=warmup,
                        iterations=iterations, time_budget=time_budget, threads=threads, label=label,
                        per_op=per_op, precision=precision, timeout=timeout, progress=err_console.is_terminal
                        and not as_json, **extra)
    _print_forward_profile(prof, batch=batch, seq=seq, output=output, as_json=as_json)


def _batch_sizes(art, batch_text: str) -> tuple[int, list[int] | None]:
    """--batch: the first size, and the sizes when it is a list (a decoder's batched profiles)."""
    from edgesmith.errors import BadInput
    from edgesmith.profiling.batched import is_batch_list, parse_batches
    from edgesmith.profiling.generation import is_decoder

    batches, batched = parse_batches(batch_text), is_batch_list(batch_text)
    if batched and not is_decoder(art):
        raise BadInput(f"--batch {batch_text}: a list of batch sizes applies to decoders (text-generation); "
                       f"{art.name} is a {art.task} model: give one --batch")
    return batches[0], (batches if batched else None)


def _refuse_remote_gpu_flags(extra: dict, target: str | None) -> None:
    if extra and target is not None:
        from edgesmith.errors import BadInput

        raise BadInput("--device, --dtype, --compile, --cuda-graphs and --provider-option apply to local profiles; "
                       "leave out --target")


def _print_forward_profile(prof, *, batch: int, seq: int, output: Path | None, as_json: bool) -> None:
    """Write the one-forward-pass profile and print it (JSON, or lines: an estimate says so; early
    exit adds its layers)."""
    if output is not None:
        prof.save(output)
    if as_json:
        typer.echo(prof.model_dump_json(indent=2))
        return
    s = prof.stats
    if prof.is_estimate and prof.estimate is not None:
        e = prof.estimate
        console.print(f"[bold magenta]ESTIMATE[/] [bold]{prof.label}[/] on {prof.target}: {s.p50:.3f} ms "
                      f"({e.bound}-bound: {e.macs / 1e9:.3f} GMAC at {e.peak_ops_per_s / 1e12:g} T{e.precision}-ops/s "
                      f"= {e.compute_ms:.3f} ms, {e.weight_bytes / 1e6:.1f} MB weights at "
                      f"{e.memory_bandwidth_bytes_per_s / 1e9:g} GB/s = {e.memory_ms:.3f} ms); a lower bound, "
                      "not a measurement")
        if output is not None:
            console.print(f"profile: {output}")
        return
    where = f" on {prof.target}" + (f" ({prof.environment.host})" if prof.environment.host else "")
    console.print(f"[bold]{prof.label}[/]  runtime {prof.runtime.name} on {', '.join(prof.runtime.providers)}"
                  f"{where}  batch {batch} seq {seq}")
    console.print(f"p50 {s.p50:.2f} ms  p90 {s.p90:.2f} ms  p99 {s.p99:.2f} ms  mean {s.mean:.2f} ± {s.std:.2f} ms  "
                  f"(n={s.n})  throughput {prof.throughput:.1f}/s")
    if prof.early_exit is not None:
        ex = prof.early_exit
        expected = f"{ex.expected_ms:.2f} ms" if ex.expected_ms is not None else "-"
        console.print(f"early exit: {ex.mean_layers or 0:.2f} of {ex.total_layers} layers on average, exits "
                      f"{ex.histogram}; expected from the calibration histogram {expected} vs measured mean "
                      f"{s.mean:.2f} ms")
    if output is not None:
        console.print(f"profile: {output}")


def _refuse_generation_flags(art, **flags) -> None:
    """One line naming the decoder flags given for a one-forward-pass profile (never ignored)."""
    used = ["--" + name.replace("_", "-") for name, value in flags.items() if value is not None]
    if used:
        from edgesmith.errors import BadInput

        raise BadInput(f"{', '.join(used)} appl{'y' if len(used) > 1 else 'ies'} to decoders "
                       f"(text-generation); {art.name} is a {art.task} model: give --batch and --seq")


def _refuse_forward_flags(art, remote: bool, flags) -> None:
    """One line naming the one-forward-pass flags given for a decoder (never ignored)."""
    used = [flag for flag, given in flags if given]
    if used:
        from edgesmith.errors import BadInput

        raise BadInput(f"{', '.join(used)} appl{'y' if len(used) > 1 else 'ies'} to one-forward-pass profiles; "
                       f"{art.name} is a decoder: give --prompt-tokens, --new-tokens and --rounds")


def _generation_profile(art, *, runtime: str | None, provider: str, batch: int | list[int], warmup: int | None,
                        prompt_tokens: str | None, new_tokens: int | None, rounds: int | None, threads: int | None,
                        label: str | None, output: Path | None, as_json: bool, prof=None) -> None:
    """Profile a decoder's generation (unless ``prof`` was measured on a device), write the
    profile, print TTFT per prompt length and decode speed. A list of batch sizes: one profile each."""
    import numpy as np

    from edgesmith.profiling import profile

    if isinstance(batch, list):
        return _batched_profiles(art, runtime=runtime, provider=provider, batches=batch, warmup=warmup,
                                 prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, threads=threads,
                                 label=label, output=output, as_json=as_json)

    if prof is None:
        prof = profile(art, runtime, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds,
                       warmup=warmup, provider=provider, batch=batch, threads=threads, label=label,
                       progress=err_console.is_terminal and not as_json)
    if output is not None:
        prof.save(output)
    if as_json:
        typer.echo(prof.model_dump_json(indent=2))
        return
    gen, s = prof.generation, prof.stats
    assert gen is not None
    threads_used = prof.environment.threads if prof.environment.threads is not None else "default"
    console.print(f"[bold]{escape(prof.label)}[/]  runtime {prof.runtime.name} on {', '.join(prof.runtime.providers)}"
                  f"  threads {threads_used}  batch {gen.batch}  {gen.rounds} rounds after {prof.warmup} warm-up")
    for n in gen.prompt_tokens:
        ttft, tps = gen.ttft_of(n), gen.prefill_tokens_per_s[str(n)]
        console.print(f"TTFT @{n} tokens: median {np.median(ttft):.1f} ms (min {min(ttft):.1f}, max {max(ttft):.1f})  "
                      f"prefill {np.median(tps):.0f} tokens/s")
    rounds_text = ", ".join(f"{v:.1f}" for v in gen.decode_tokens_per_s)
    console.print(f"decode after {gen.decode_prompt_tokens} prompt tokens, {gen.new_tokens} new tokens (greedy, EOS "
                  f"ignored): {prof.throughput:.1f} tokens/s (rounds: {rounds_text}); per token p50 {s.p50:.2f} ms  "
                  f"p90 {s.p90:.2f} ms  p99 {s.p99:.2f} ms (n={s.n})")
    rss = "-" if gen.peak_rss_mb is None else f"{gen.peak_rss_mb:.0f} MB"
    console.print(f"load {gen.load_s:.2f} s  peak RSS {rss} ({gen.rss_source})")
    if output is not None:
        console.print(f"profile: {output}")


def _batched_profiles(art, *, runtime: str | None, provider: str, batches: list[int], warmup: int | None,
                      prompt_tokens: str | None, new_tokens: int | None, rounds: int | None, threads: int | None,
                      label: str | None, output: Path | None, as_json: bool) -> None:
    """One generation profile per batch size (static batches of mixed-length prompts): written to
    OUTPUT-bN.json each, printed as one line per batch size, aggregate decode against batch 1."""
    import numpy as np
    from rich.table import Table

    from edgesmith.profiling import profile

    profiles = profile(art, runtime, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds,
                       warmup=warmup, provider=provider, batch=batches, threads=threads, label=label,
                       progress=err_console.is_terminal and not as_json)
    paths = [batch_output(output, p.shapes.batch) for p in profiles] if output is not None else []
    for prof, path in zip(profiles, paths):
        prof.save(path)
    if as_json:
        typer.echo("[" + ",\n".join(p.model_dump_json(indent=2) for p in profiles) + "]")
        return
    first = profiles[0]
    gen = first.generation
    assert gen is not None and gen.batched is not None
    threads_used = first.environment.threads if first.environment.threads is not None else "default"
    table = Table(title=f"{escape(first.label.rsplit(' batch ', 1)[0])}: runtime {first.runtime.name}, threads "
                        f"{threads_used}, prompts {gen.decode_prompt_tokens} ±{gen.batched.spread:.0%} tokens, "
                        f"{gen.new_tokens} new tokens, {gen.rounds} round{'s' if gen.rounds != 1 else ''} (medians)")
    for header in ("batch", "prompt tokens", "aggregate decode tok/s", f"vs batch {first.shapes.batch}",
                   "TTFT ms (each request)", "ms per output token", "peak RSS MB"):
        table.add_column(header, justify="left" if header == "prompt tokens" else "right")
    for prof in profiles:
        g = prof.generation
        assert g is not None and g.batched is not None
        lengths = g.batched.row_prompt_tokens
        table.add_row(str(prof.shapes.batch), f"{min(lengths)}-{max(lengths)}" if len(lengths) > 1 else str(lengths[0]),
                      f"{prof.throughput:.1f}", f"{prof.throughput / first.throughput:.2f}x",
                      f"{np.median(g.ttft_of(g.decode_prompt_tokens)):.1f}",
                      f"{np.median(g.batched.time_per_output_token_ms):.2f}",
                      "-" if g.peak_rss_mb is None else f"{g.peak_rss_mb:.0f}")
    console.print(table)
    console.print(f"ran in {escape(gen.batched.loop)}")
    for path in paths:
        console.print(f"profile: {path}")


def batch_output(output: Path, batch: int) -> Path:
    """Where batch size ``batch``'s profile goes when the user asked for OUTPUT: OUTPUT-bN.json."""
    return output.with_name(f"{output.stem}-b{batch}{output.suffix or '.json'}")


def _remote_generation(art, *, target: str | None, host: str | None, ssh_config: Path | None,
                       targets_dir: list[Path], prompt_tokens: str | None, new_tokens: int | None,
                       rounds: int | None, warmup: int | None, threads: int | None, timeout: float | None,
                       label: str | None, batch: int):
    """A GGUF decoder's generation profile on a device over ssh (llama-cpp-python or llama-bench there)."""
    from edgesmith.errors import BadInput
    from edgesmith.profiling.generation import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_TOKENS, DEFAULT_ROUNDS, DEFAULT_WARMUP
    from edgesmith.profiling.remote import profile_remote_generation
    from edgesmith.targets import get_target

    if target is None:
        raise BadInput("--host, --ssh-config and --timeout need --target NAME (list them with `edgesmith targets`)")
    if batch != 1:
        raise BadInput(f"a generation profile on a device runs one sequence at a time; give --batch 1 (got {batch})")
    tgt = get_target(target, host=host, extra_dirs=targets_dir)
    if tgt.is_local:
        return None
    return profile_remote_generation(
        art, tgt, prompt_tokens=prompt_tokens or DEFAULT_PROMPT_TOKENS, new_tokens=new_tokens or DEFAULT_NEW_TOKENS,
        rounds=rounds or DEFAULT_ROUNDS, warmup=DEFAULT_WARMUP if warmup is None else warmup, threads=threads,
        ssh_config=ssh_config, timeout_s=timeout, label=label)


def _gpu_options(art, runtime: str | None, provider: str, device: str | None, dtype: str | None, compile_: bool,
                 cuda_graphs: bool, provider_option: list[str]) -> tuple[str, dict]:
    """The provider and the runtime options the GPU flags stand for; flags that do not fit the
    runtime are refused (exit 2), never ignored."""
    from edgesmith.errors import BadInput
    from edgesmith.runtimes.base import default_runtime_for

    name = runtime or default_runtime_for(art)
    extra: dict = {}
    torch_flags = [f for f, v in (("--dtype", dtype), ("--compile", compile_), ("--cuda-graphs", cuda_graphs),
                                  ("--device", device)) if v]
    if name != "torch" and torch_flags:
        raise BadInput(f"{', '.join(torch_flags)} appl{'y' if len(torch_flags) > 1 else 'ies'} to --runtime torch, "
                       f"not {name}")
    if name == "torch":
        if device is not None:
            provider = device
        extra = {k: v for k, v in (("dtype", dtype), ("compile", compile_ or None),
                                   ("cuda_graphs", cuda_graphs or None)) if v is not None}
    if provider_option:
        if name != "onnxruntime":
            raise BadInput(f"--provider-option applies to --runtime onnxruntime, not {name}")
        from edgesmith.runtimes.onnxruntime import parse_provider_options

        extra["provider_options"] = parse_provider_options(provider_option)
    return provider, extra


def _profile_for(art, *, target: str | None, host: str | None, ssh_config: Path | None, targets_dir: list[Path],
                 estimate: bool, runtime: str | None, provider: str, batch: int, seq: int, warmup: int,
                 iterations: int, time_budget: float | None, threads: int | None, label: str | None, per_op: bool,
                 precision: str | None, timeout: float | None, progress: bool, **runtime_options):
    """Local, remote (over ssh) or estimated, depending on the target and flags."""
    from edgesmith.errors import BadInput
    from edgesmith.profiling import profile

    if target is None and (host is not None or estimate or ssh_config is not None):
        raise BadInput("--host, --ssh-config and --estimate need --target NAME (list them with `edgesmith targets`)")
    if target is None:
        return profile(art, runtime, batch=batch, seq=seq, warmup=warmup, iterations=iterations,
                       time_budget_s=time_budget, threads=threads, provider=provider, label=label,
                       per_op=per_op, progress=progress, **runtime_options)
    from edgesmith.targets import get_target

    tgt = get_target(target, host=host, extra_dirs=targets_dir)
    if estimate:
        from edgesmith.profiling.roofline import estimate as roofline

        return roofline(art, tgt, batch=batch, seq=seq, precision=precision, label=label)
    if tgt.is_local:
        return profile(art, runtime or None, batch=batch, seq=seq, warmup=warmup, iterations=iterations,
                       time_budget_s=time_budget, threads=threads if threads is not None else tgt.threads,
                       provider=tgt.provider if provider == "cpu" else provider, target=tgt.name, label=label,
                       per_op=per_op, progress=progress)
    from edgesmith.profiling.remote import profile_remote

    return profile_remote(art, tgt, ssh_config=ssh_config, batch=batch, seq=seq, warmup=warmup,
                          iterations=iterations, time_budget_s=time_budget, threads=threads, runtime=runtime,
                          provider=None if provider == "cpu" and runtime is None else provider,
                          precision=precision, per_op=per_op, timeout_s=timeout, label=label)


@app.command("compare")
def compare_command(
    profiles: list[Path] = typer.Argument(..., help="Profile JSON files, or a sweep's pareto.json (its front's "
                                          "profiles); the first is the baseline unless --baseline."),
    baseline: str = typer.Option("0", "--baseline", help="Index, label or artifact name of the baseline."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a quality-vs-latency PNG here (needs quality)."),
    metric: str = typer.Option("cosine", "--metric", help="Quality metric for --plot."),
    as_json: bool = JSON_OUT,
) -> None:
    """Profiles side by side: speedups with bootstrap 95 % intervals; noise is called noise."""
    from edgesmith.profiling import compare
    from edgesmith.sweep import is_pareto_file, profiles_of_front

    profiles = [p for path in profiles for p in (profiles_of_front(path) if is_pareto_file(path) else [path])]
    base: int | str = int(baseline) if baseline.isdigit() else baseline
    comparison = compare(profiles, baseline=base)
    if plot is not None:
        from edgesmith.reports.plots import plot_quality_latency

        plot_quality_latency(comparison, plot, metric=metric)
    if as_json:
        print_json(comparison.model_dump(mode="json"))
        return
    console.print(comparison.table("generation comparison" if comparison.is_generation else "latency comparison",
                                   width=console.width))
    for line in comparison.early_exit_lines():
        console.print(f"early exit, {escape(line)}")
    for row in comparison.rows:
        if row.op_deltas:
            console.print(comparison.op_delta_table(row))
    if plot is not None:
        console.print(f"plot: {plot}")
