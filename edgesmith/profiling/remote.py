"""Profile on a device the user's own ``ssh`` reaches: a Raspberry Pi, a Jetson, a server.

The connection (system ``ssh``, never a prompt, host keys never accepted on the user's behalf, one
shared connection) is :class:`~edgesmith.profiling.ssh.RemoteDevice`.

On the device, nothing of edgesmith is installed: the artifact's model files are copied into a
cache folder keyed by the artifact's content hash (skipped when present; streamed as tar into a
temp folder that is renamed into place only when complete, so no half-copied artifact is ever
left), and the single-file agent (:mod:`edgesmith.profiling.agent`, standard library plus the
device's runtime) is sent over stdin (``ssh host python3 - ARGS < agent.py``). It prints a JSON
result that becomes a :class:`~edgesmith.profiling.Profile` in the same schema as a local one,
whose environment is the device's fingerprint. Every argument reaching the remote shell is quoted.

On TensorRT targets (Jetson), the engine is built on the device with ``trtexec`` (engines are
device-specific), cached there by key, and copied back into the local cache.

A GGUF decoder on ``--runtime llamacpp`` (:func:`profile_remote_generation`) is profiled as
generation by the agent's ``llamacpp`` command, with the device's llama-cpp-python or its
``llama-bench``; the GGUF file is copied like any model file, and the result is a generation
profile in the same schema as a local one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput
from edgesmith.profiling.environment import Environment
from edgesmith.profiling.measure import artifact_info, build_feeds, check_arguments, measured_profile
from edgesmith.profiling.schema import OpTime, Profile, RuntimeInfo
from edgesmith.profiling.ssh import RemoteDevice, ssh_error
from edgesmith.runtimes.base import get_runtime
from edgesmith.tensorrt.precision import needs_conversion, typing_for_version
from edgesmith.tensorrt.trtexec import device_engine_key, trtexec_build_argv, trtexec_run_argv

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Inputs and model files
# ---------------------------------------------------------------------------------------------


def model_files(model: OnnxModel) -> dict[str, Path]:
    """The files the device needs to run the graph: model.onnx and its external data."""
    files = {f.name: f for f in sorted(model.folder.iterdir())
             if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data"))}
    if model.path.name not in files:
        raise BadInput(f"{model.folder}: no {model.path.name} in the artifact folder")
    return files


def feeds_bytes(feeds: list[dict[str, np.ndarray]]) -> tuple[bytes, str]:
    """Input batches as an ``.npz`` (``"<batch>/<input>"`` arrays) and a content key for the device cache."""
    arrays: dict[str, np.ndarray] = {"__batches__": np.array(len(feeds))}
    digest = hashlib.sha256()
    for b, feed in enumerate(feeds):
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            arrays[f"{b}/{name}"] = arr
            digest.update(f"{b}/{name}:{arr.dtype}:{arr.shape}".encode())
            digest.update(arr.tobytes())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), digest.hexdigest()[:32]


def put_inputs(device: RemoteDevice, feeds: list[dict[str, np.ndarray]], left: Callable[[], float]) -> str:
    """Copy the input batches into the device cache (keyed by their content); returns the device folder."""
    data, inputs_key = feeds_bytes(feeds)
    with tempfile.TemporaryDirectory(prefix="edgesmith-inputs-") as tmp:
        (Path(tmp) / "inputs.npz").write_bytes(data)
        inputs_dir = device.remote_path("inputs", inputs_key)
        device.put_folder({"inputs.npz": Path(tmp) / "inputs.npz"}, inputs_dir, timeout=left())
    return inputs_dir


# ---------------------------------------------------------------------------------------------
# Profiling on the device
# ---------------------------------------------------------------------------------------------


def _precision_of(artifact: Artifact) -> str:
    return str(artifact.meta.get("precision", "fp32"))


def profile_remote(artifact: Artifact, target, *, ssh_config: str | Path | None = None, batch: int = 1,
                   seq: int = 128, warmup: int = 5, iterations: int = 50, time_budget_s: float | None = None,
                   threads: int | None = None, runtime: str | None = None, provider: str | None = None,
                   precision: str | None = None, per_op: bool = False, per_op_runs: int = 10,
                   timeout_s: float | None = None, label: str | None = None,
                   texts: Sequence[str] | None = None, keep_connection: bool = True,
                   device: RemoteDevice | None = None) -> Profile:
    """Profile ``artifact`` (an ONNX model) on the device ``target`` reaches over SSH.

    Returns a Profile whose environment is the device's fingerprint; ``runtime.options["remote"]``
    records the destination, the device cache folder and whether the artifact was copied or found.
    """
    check_arguments(batch, seq, warmup, iterations, time_budget_s)
    if not isinstance(artifact, OnnxModel):
        raise BadInput(f"remote profiling runs ONNX models; this is a {artifact.kind} model: export it first "
                       "(edgesmith export MODEL --to onnx)")
    runtime = runtime or target.runtime
    provider = provider or target.provider
    threads = threads if threads is not None else target.threads
    timeout_s = float(timeout_s or target.timeout_s)
    started = time.monotonic()
    device = device or RemoteDevice.from_target(target, ssh_config)
    left = _time_left(device, timeout_s, started)

    try:
        device.connect()
        fingerprint = _check_device(device, target, runtime, provider, left)
        builds_there = get_runtime(runtime).builds_on_device  # TensorRT: trtexec builds the engine on the device
        if builds_there:
            precision = precision or _precision_of(artifact)
            artifact = strongly_typed_source(artifact, precision, (fingerprint.get("libraries") or {}).get("tensorrt"))
        info = artifact_info(artifact)
        art_dir = device.remote_path("artifacts", info.hash[:32])
        copied = device.put_folder(model_files(artifact), art_dir, timeout=left())
        feeds = build_feeds(artifact.tokenizer, artifact.input_names, batch=batch, seq=seq, texts=texts)
        inputs_dir = put_inputs(device, feeds, left)
        if builds_there:
            result = _run_trtexec(device, target, artifact, info.hash, fingerprint, art_dir, inputs_dir,
                                  batch=batch, seq=seq, warmup=warmup, iterations=iterations,
                                  time_budget_s=time_budget_s, precision=precision or _precision_of(artifact),
                                  per_op=per_op, left=left)
        else:
            args = _ort_agent_args(f"{art_dir}/{artifact.path.name}", f"{inputs_dir}/inputs.npz", provider=provider,
                                   warmup=warmup, iterations=iterations, per_op_runs=per_op_runs if per_op else 0,
                                   threads=threads, time_budget_s=time_budget_s)
            result = device.agent(args, timeout=left())
    finally:
        if not keep_connection:
            device.close()
    return measured_profile(
        label=label or f"{artifact.name} ({runtime} on {target.name})",
        artifact=info,
        runtime=RuntimeInfo(name=runtime, providers=list(result["providers"]),
                            options=_remote_options(device, result, provider=provider, threads=threads,
                                                    copied=copied)),
        target=target.name,
        environment=Environment.model_validate({**result["environment"], "threads": threads}),
        batch=batch,
        seq=seq,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        latencies=[float(x) for x in result["latencies_ms"]],
        peak_host_memory_mb=result.get("peak_host_memory_mb"),
        per_op=[OpTime(**op) for op in result["per_op"]] if result.get("per_op") else None,
    )


def profile_remote_generation(artifact: Artifact, target, *, prompt_tokens: Sequence[int] | str = (128, 512),
                              new_tokens: int = 128, rounds: int = 3, warmup: int = 1, threads: int | None = None,
                              ssh_config: str | Path | None = None, timeout_s: float | None = None,
                              label: str | None = None, tool: str | None = None, llama_bench: str | None = None,
                              texts: Sequence[str] | None = None,
                              keep_connection: bool = True, device: RemoteDevice | None = None) -> Profile:
    """A GGUF decoder's generation profile on the device ``target`` reaches, measured by llama.cpp
    there (``tool``: ``llama-cpp-python`` or ``llama-bench``; default: llama-cpp-python where it
    imports on the device, else llama-bench, found on the device's PATH or at ``llama_bench``). The prompts are cut from the shipped corpus (or
    ``texts``) by the device's llama.cpp tokenizer; llama-bench uses its own random prompts."""
    from edgesmith.profiling.generation import generation_profile, parse_prompt_tokens
    from edgesmith.runtimes.llamacpp import NAME, gguf_path

    path = gguf_path(artifact)
    lengths = parse_prompt_tokens(prompt_tokens)
    if new_tokens < 2 or rounds < 1 or warmup < 0:
        raise BadInput(f"new tokens must be at least 2, rounds at least 1 and warmup 0 or more (got {new_tokens}, "
                       f"{rounds}, {warmup})")
    threads = threads if threads is not None else target.threads
    timeout_s = float(timeout_s or target.timeout_s)
    started = time.monotonic()
    device = device or RemoteDevice.from_target(target, ssh_config)
    left = _time_left(device, timeout_s, started)
    try:
        device.connect()
        bench_args = ["--llama-bench", llama_bench] if llama_bench else []
        device.agent(["fingerprint", "--require", NAME, *bench_args], timeout=min(60.0, left()))
        info = artifact_info(artifact)
        art_dir = device.remote_path("artifacts", info.hash[:32])
        copied = device.put_folder({path.name: path}, art_dir, timeout=left())
        text = _prompt_text(max(lengths), texts)
        with tempfile.TemporaryDirectory(prefix="edgesmith-prompt-") as tmp:
            (Path(tmp) / "prompt.txt").write_text(text, encoding="utf-8")
            prompt_dir = device.remote_path("inputs", hashlib.sha256(text.encode()).hexdigest()[:32])
            device.put_folder({"prompt.txt": Path(tmp) / "prompt.txt"}, prompt_dir, timeout=left())
        args = ["llamacpp", "--model", f"{art_dir}/{path.name}", "--prompt-tokens", ",".join(map(str, lengths)),
                "--new-tokens", str(new_tokens), "--rounds", str(rounds), "--warmup", str(warmup),
                "--prompt-text", f"{prompt_dir}/prompt.txt"]
        if threads:
            args += ["--threads", str(threads)]
        if tool:
            args += ["--tool", tool]
        result = device.agent(args + bench_args, timeout=left())
    finally:
        if not keep_connection:
            device.close()
    used_threads = result.get("threads") or threads
    bench = result["tool"] == "llama-bench"
    options: dict[str, Any] = {
        "threads": used_threads, "tool": result["tool"], "version": result.get("runtime_version"),
        "build": result.get("build"), "decode_depth": result.get("decode_depth"),
        "per_token_latency": result.get("per_token"),
        "remote": {"destination": device.destination, "cache_dir": device.cache_dir, "artifact_copied": copied,
                   "agent_version": result.get("agent_version"),
                   "load_s": "not reported by llama-bench (0 in the profile)" if bench else result.get("load_s")}}
    if bench:
        options["samples_ts"] = result.get("samples_ts")
    prof = generation_profile(
        label=label or f"{artifact.name} ({NAME} on {target.name})", artifact=info,
        runtime=RuntimeInfo(name=NAME, providers=list(result["providers"]), options=options), target=target.name,
        threads=used_threads, batch=1, new_tokens=new_tokens, warmup=warmup,
        ttft_ms={int(n): v for n, v in result["ttft_ms"].items()}, decode_ms=result["decode_ms"],
        load_s=float(result.get("load_s") or 0.0), peak_rss_mb=result.get("peak_host_memory_mb"),
        rss_source="unavailable (llama-bench runs in its own process)" if bench else
        "VmHWM of the device agent's process (its lifetime peak)",
        prompt_source="random ids" if bench else "tokenizer")
    environment = Environment.model_validate({**result["environment"], "threads": used_threads})
    return prof.model_copy(update={"environment": environment})


def _prompt_text(longest: int, texts: Sequence[str] | None) -> str:
    """Corpus sentences joined, long enough for ``longest`` tokens with room to spare (about four
    characters a token in English; the device's tokenizer cuts the prompts from it)."""
    from edgesmith.data import builtin_corpus

    pool = [t for t in (texts if texts is not None else builtin_corpus(limit=max(256, longest))) if t]
    if not pool:
        raise BadInput("no texts to build prompts from; give non-empty texts")
    chosen, size, i = [], 0, 0
    while size < 8 * longest + 2000:
        chosen.append(pool[i % len(pool)])
        size += len(chosen[-1]) + 1
        i += 1
    return " ".join(chosen)


def _time_left(device: RemoteDevice, timeout_s: float, started: float) -> Callable[[], float]:
    """A clock of the seconds left of ``timeout_s`` since ``started``; past it, it raises one line."""

    def left() -> float:
        remaining = timeout_s - (time.monotonic() - started)
        if remaining <= 0:
            raise BadInput(f"{device.destination}: profiling timed out after {timeout_s:.0f} s and was stopped; "
                           "raise the target's timeout_s (or --timeout)")
        return remaining

    return left


def _check_device(device: RemoteDevice, target, runtime: str, provider: str, left: Callable[[], float]) -> dict:
    """The device's fingerprint, from an agent run that fails clearly when the runtime or provider is missing."""
    builds_there = get_runtime(runtime).builds_on_device
    check = ["fingerprint", "--require", "trtexec" if builds_there else "onnxruntime", "--provider", provider]
    if builds_there:
        check += ["--trtexec", target.trtexec or "trtexec"]
    return device.agent(check, timeout=min(60.0, left()))["environment"]


def _ort_agent_args(model: str, inputs: str, *, provider: str, warmup: int, iterations: int, per_op_runs: int,
                    threads: int | None, time_budget_s: float | None) -> list[str]:
    """The agent's arguments to time an ONNX Runtime session on the device (``per_op_runs`` 0: no per-op)."""
    args = ["ort", "--model", model, "--inputs", inputs,
            "--provider", provider, "--warmup", str(warmup), "--iterations", str(iterations),
            "--per-op-runs", str(per_op_runs)]
    if threads:
        args += ["--threads", str(threads)]
    if time_budget_s is not None:
        args += ["--time-budget", str(time_budget_s)]
    return args


def _remote_options(device: RemoteDevice, result: dict, *, provider: str, threads: int | None,
                    copied: bool) -> dict[str, Any]:
    """The runtime options a remote profile records: what was asked, and where and how it ran."""
    options: dict[str, Any] = {"provider": provider, "threads": threads,
                               "remote": {"destination": device.destination, "cache_dir": device.cache_dir,
                                          "artifact_copied": copied, "runtime_version": result.get("runtime_version"),
                                          "agent_version": result.get("agent_version")}}
    if "engine_built" in result:
        options["remote"]["engine_built"] = result["engine_built"]
    return options


def strongly_typed_source(artifact: OnnxModel, precision: str, device_tensorrt: str | None) -> OnnxModel:
    """The graph to copy to a device whose trtexec is strongly typed (TensorRT 11): an fp32 graph
    asked to build in fp16 is converted here first (edgesmith's FP16 conversion), since that
    trtexec has no --fp16; bf16 needs a bf16 graph made beforehand. Otherwise ``artifact`` itself."""
    if typing_for_version(device_tensorrt) != "strong" or not needs_conversion(precision, "strong", artifact.path):
        return artifact
    if precision == "bf16":
        raise BadInput(f"the device has TensorRT {device_tensorrt}, which builds bf16 only from a bf16 graph; "
                       "convert one with NVIDIA Model Optimizer AutoCast first, or profile with --precision fp16")
    from edgesmith.onnx_graph.fp16 import fp16_model

    log.info("device TensorRT %s is strongly typed: converting %s to fp16 before copying it", device_tensorrt,
             artifact.name)
    return fp16_model(artifact)


def _run_trtexec(device: RemoteDevice, target, artifact: OnnxModel, artifact_hash: str, fingerprint: dict,
                 art_dir: str, inputs_dir: str, *, batch: int, seq: int, warmup: int, iterations: int,
                 time_budget_s: float | None, precision: str, per_op: bool, left: Callable[[], float]) -> dict:
    """Build (if not cached on the device) and time a TensorRT engine with trtexec; copy the engine
    back into the local cache under the same key."""
    from edgesmith.cache import default_cache_dir

    trtexec = target.trtexec or "trtexec"
    key = device_engine_key(artifact_hash, precision, batch, seq, fingerprint)
    engine = device.remote_path("engines", key, "model.engine")
    work = device.remote_path("runs", key)
    names = artifact.input_names
    typing = typing_for_version((fingerprint.get("libraries") or {}).get("tensorrt"))
    build = trtexec_build_argv(trtexec, f"{art_dir}/{artifact.path.name}", engine, input_names=names,
                               batch=batch, seq=seq, precision=precision,
                               timing_cache=device.remote_path("engines", "timing.cache"), typing=typing)
    run = trtexec_run_argv(trtexec, engine, input_names=names, batch=batch, seq=seq, inputs_dir=work,
                           warmup_ms=max(200, warmup * 20), iterations=iterations,
                           duration_s=time_budget_s or 0, times_path=f"{work}/times.json",
                           profile_path=f"{work}/profile.json" if per_op else None)
    prep = device.run(f"mkdir -p {shlex.quote(work)}", timeout=min(60.0, left()), what="preparing the device")
    if prep.returncode != 0:
        raise ssh_error(device.destination, prep.returncode, prep.stderr)
    args = ["trtexec", "--engine", engine, "--build-argv", json.dumps(build), "--run-argv", json.dumps(run),
            "--times", f"{work}/times.json", "--inputs", f"{inputs_dir}/inputs.npz", "--raw-inputs", work]
    if per_op:
        args += ["--profile", f"{work}/profile.json"]
    result = device.agent(args, timeout=left())
    local = default_cache_dir() / "engines" / key / "model.engine"
    if not local.exists():
        device.fetch_file(engine, local, timeout=left())
    return result
