"""edgesmith's device-side profiling agent: one file, Python standard library plus the device's runtime.

It is sent over an SSH connection and run as ``python3 - ARGS < agent.py``; it must never import
edgesmith (the device does not have it). It prints exactly one JSON document on stdout:

- ``{"ok": true, ...}``: the result (a device fingerprint, latencies, per-op times);
- ``{"ok": false, "kind": KIND, "message": TEXT}``: a failure the caller turns into one clear line.
  KIND is one of ``runtime-missing``, ``provider-missing``, ``disk-full``, ``timeout``, ``bad-model``,
  ``bad-input``, ``failed``.

Commands:

- ``fingerprint``: what the device is (uname, CPU model and cores, memory, Python, runtime versions,
  and on Jetson the L4T release, ``nvpmodel -q`` and ``jetson_clocks --show`` where they exist);
- ``ort``: time an ONNX model with ONNX Runtime on inputs from an ``.npz`` file, optionally per-op
  times from ONNX Runtime's profiler in a separate session (the profiler's overhead never reaches
  the timed loop);
- ``trtexec``: build a TensorRT engine with ``trtexec`` if the cached one is missing (into a temp
  name, renamed when complete), then time it with ``trtexec --exportTimes`` (and per-layer times
  with ``--exportProfile``).
- ``llamacpp``: a GGUF decoder's generation profile (time to first token per prompt length, then
  decode latencies), with llama-cpp-python when ``import llama_cpp`` works on the device (a greedy
  loop like edgesmith's own: prompts of exactly N tokens cut from the texts sent along, every
  token's latency raw), else with llama.cpp's ``llama-bench`` (``-o json``: one prefill test per
  prompt length, one decode test of ``new_tokens - 1`` tokens at the depth of the first prompt;
  llama-bench reports whole runs, so each decode token's latency is its run's mean).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

AGENT_VERSION = 1
MIN_SAMPLES = 5
KINDS = ("runtime-missing", "provider-missing", "disk-full", "timeout", "bad-model", "bad-input", "failed")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
EXIT_FAILED = 3


class AgentError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind if kind in KINDS else "failed"
        self.message = message


def emit(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def fail(kind: str, message: str) -> None:
    emit({"ok": False, "kind": kind, "message": message, "agent_version": AGENT_VERSION})
    sys.stdout.flush()
    os._exit(EXIT_FAILED)


def _on_deadline(signum, frame) -> None:
    fail("timeout", "the run on the device exceeded its deadline and was stopped")


def arm_deadline(seconds: float | None) -> None:
    """Stop this process by itself after ``seconds``: a killed connection must not leave it running."""
    if seconds and seconds > 0:
        signal.signal(signal.SIGALRM, _on_deadline)
        signal.setitimer(signal.ITIMER_REAL, float(seconds))
    # a closed connection: stop instead of running on unseen
    signal.signal(signal.SIGHUP, lambda *_: os._exit(EXIT_FAILED))


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _command(argv: list[str], timeout: float = 10.0) -> str | None:
    """Output of a device command that may not exist (``None`` when absent or failing)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or "") + (out.stderr if out.returncode else "")
    return text.strip() or None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def os_name() -> str:
    """The distribution's pretty name (Linux), else ``platform``'s system and release."""
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{platform.system()} {platform.release()}".strip()


#: the instruction-set extensions that decide which kernels ONNX Runtime, PyTorch and llama.cpp run
#: (x86: SSE to AVX-512 and AMX; Arm: NEON dot products, SVE, int8 matrix multiply), in this order
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16")


def isa_flags(cpuinfo: str | None = None) -> list:
    """The extensions of :data:`ISA_FLAGS` this CPU reports (``flags`` on x86, ``Features`` on Arm)."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            return [f for f in ISA_FLAGS if f in have]
    return []


def isa_summary(flags: list) -> str:
    """A short name for the widest vector ISA: "AVX-512 (VNNI, BF16) + AMX", "AVX2", "NEON (dot)"..."""
    have = set(flags)
    if "avx512f" in have:
        extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx512_fp16", "FP16"))
                  if flag in have]
        return "AVX-512" + (f" ({', '.join(extras)})" if extras else "") + (" + AMX" if "amx_tile" in have else "")
    if "avx2" in have:
        return "AVX2" + (" + AVX-VNNI" if "avx_vnni" in have else "")
    if "avx" in have:
        return "AVX"
    if "asimd" in have:
        extras = [name for flag, name in (("asimddp", "dot"), ("i8mm", "i8mm"), ("sve", "SVE")) if flag in have]
        return "NEON" + (f" ({', '.join(extras)})" if extras else "")
    return "unknown ISA"


def memory_mb() -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


#: distributions a device's fingerprint records; of these, ``onnxruntime`` even when absent
DEVICE_LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt", "llama-cpp-python")


def library_versions(dists: tuple = DEVICE_LIBRARIES, always: tuple = ("onnxruntime",)) -> dict:
    """{distribution: version} of those installed; those in ``always`` are recorded as None when absent
    (so a reader sees "not installed", not "not asked")."""
    from importlib import metadata

    versions: dict = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist in always:
                versions[dist] = None
    return versions


def _version_in(text: str | None) -> str | None:
    return next((w for w in (text or "").split() if "." in w and w.replace(".", "").isdigit()), None)


def nvidia_driver() -> str | None:
    """The NVIDIA driver version, from the kernel module or nvidia-smi; None when neither answers."""
    return (_version_in(_read("/proc/driver/nvidia/version"))
            or _version_in(_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])))


def gpu_info() -> dict | None:
    out = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if not out or "," not in out:
        return None
    lines = [ln for ln in out.splitlines() if ln.count(",") >= 2]
    if not lines:
        return None
    name, driver, mem = (p.strip() for p in lines[0].split(",")[:3])
    try:
        memory = float(mem)
    except ValueError:
        memory = None
    return {"name": name, "count": len(lines), "driver": driver, "cuda": None, "memory_mb": memory}


def machine(threads: int | None = None) -> dict:
    """The machine itself: CPU model, ISA, cores, OS, kernel, memory, Python, and on Jetson the L4T
    release, ``nvpmodel -q`` and ``jetson_clocks --show``; ``threads`` is what the runtime used."""
    uname = platform.uname()
    l4t = _read("/etc/nv_tegra_release")
    return {
        "cpu_model": cpu_model(),
        "isa_flags": isa_flags(),
        "cores": os.cpu_count(),
        "threads": threads,
        "os": os_name(),
        "kernel": uname.release,
        "machine": uname.machine,
        "python": platform.python_version(),
        "memory_mb": memory_mb(),
        "l4t_release": l4t.strip().splitlines()[0] if l4t and l4t.strip() else None,
        "power_mode": _command(["nvpmodel", "-q"]),
        "clocks": _command(["jetson_clocks", "--show"]),
    }


def fingerprint(threads: int | None = None) -> dict:
    """The device as a profile records it: :func:`machine`, its runtimes' versions, its GPU, its name."""
    uname = platform.uname()
    return {
        **machine(threads),
        "libraries": library_versions(),
        "gpu": gpu_info(),
        "uname": " ".join(p for p in (uname.system, uname.node, uname.release, uname.version, uname.machine) if p),
        "host": uname.node,
    }


def peak_host_memory_mb() -> float | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------


def per_op_from_trace(events: list, runs: int) -> list[dict]:
    """Mean time per run of each graph node from ONNX Runtime's profiler trace (Chrome trace JSON).

    Node events are named ``<node>_kernel_time`` with the op type in ``args.op_name`` and the
    duration in microseconds; ``runs`` is how many runs the trace covers. Sorted slowest first.
    """
    totals: dict[str, dict] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("cat") != "Node":
            continue
        name = str(event.get("name", ""))
        if not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        args = event.get("args") or {}
        entry = totals.setdefault(node, {"name": node, "op_type": str(args.get("op_name", "?")),
                                         "provider": str(args.get("provider", "")), "us": 0.0, "calls": 0})
        entry["us"] += float(event.get("dur", 0))
        entry["calls"] += 1
    runs = max(1, runs)
    ops = [{"name": e["name"], "op_type": e["op_type"], "provider": e["provider"] or None,
            "ms": e["us"] / 1000.0 / runs, "calls": e["calls"] // runs or 1} for e in totals.values()]
    return sorted(ops, key=lambda o: -o["ms"])


def _import_ort():
    try:
        import numpy  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise AgentError("runtime-missing", f"{sys.executable} cannot import onnxruntime/numpy ({exc}); "
                                            "install it on the device: python3 -m pip install onnxruntime") from exc
    return onnxruntime


def _session(ort, model: str, provider: str, threads: int | None, profiling_prefix: str | None = None):
    wanted = PROVIDERS.get(provider)
    if wanted is None:
        raise AgentError("bad-input", f"unknown provider '{provider}'; use one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if wanted not in available:
        raise AgentError("provider-missing", f"ONNX Runtime {ort.__version__} on the device has no {wanted} "
                                             f"(it has {', '.join(available)})")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profiling_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profiling_prefix
    chain = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(model, sess_options=so, providers=chain)
    except Exception as exc:  # ORT's own exception types
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise AgentError("bad-model", f"ONNX Runtime cannot load {model}: {text}") from exc
    if session.get_providers()[0] != wanted:
        raise AgentError("provider-missing", f"ONNX Runtime fell back to {session.get_providers()[0]} although "
                                             f"{wanted} was asked for")
    return session


def _load_feeds(path: str, input_names: list[str]) -> list[dict]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    count = int(arrays.pop("__batches__", np.array(1)))
    feeds = []
    for b in range(count):
        feed = {}
        for name in input_names:
            key = f"{b}/{name}"
            if key not in arrays:
                raise AgentError("bad-input", f"the inputs file has no '{name}' for batch {b}")
            feed[name] = arrays[key]
        feeds.append(feed)
    return feeds


def time_loop(run, feeds: list, warmup: int, iterations: int, time_budget_s: float | None) -> list[float]:
    for i in range(warmup):
        run(feeds[i % len(feeds)])
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < iterations:
        feed = feeds[len(latencies) % len(feeds)]
        t0 = time.perf_counter()
        run(feed)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        if (time_budget_s is not None and len(latencies) >= MIN_SAMPLES
                and time.perf_counter() - started >= time_budget_s):
            break
    return latencies


def command_ort(args) -> dict:
    ort = _import_ort()
    session = _session(ort, args.model, args.provider, args.threads)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    feeds = _load_feeds(args.inputs, inputs)
    latencies = time_loop(lambda f: session.run(outputs, f), feeds, args.warmup, args.iterations, args.time_budget)
    providers = list(session.get_providers())
    session = None  # release it before the profiler session loads the model again
    per_op = None
    if args.per_op_runs > 0:
        per_op = _ort_per_op(ort, args, feeds)
    return {"ok": True, "runtime": "onnxruntime", "runtime_version": ort.__version__, "providers": providers,
            "latencies_ms": latencies, "per_op": per_op, "peak_host_memory_mb": peak_host_memory_mb(),
            "environment": fingerprint(args.threads)}


def _ort_per_op(ort, args, feeds: list) -> list[dict]:
    folder = tempfile.mkdtemp(prefix="edgesmith-ortprof-")
    try:
        session = _session(ort, args.model, args.provider, args.threads, os.path.join(folder, "trace"))
        outputs = [o.name for o in session.get_outputs()]
        session.run(outputs, feeds[0])  # first run: allocations, not representative
        trace_path = session.end_profiling()
        os.unlink(trace_path)
        session = _session(ort, args.model, args.provider, args.threads, os.path.join(folder, "trace"))
        for i in range(args.per_op_runs):
            session.run(outputs, feeds[i % len(feeds)])
        trace_path = session.end_profiling()
        with open(trace_path, encoding="utf-8") as fh:
            events = json.load(fh)
        return per_op_from_trace(events, args.per_op_runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# TensorRT through trtexec
# ---------------------------------------------------------------------------------------------


def _run_trtexec(argv: list[str], what: str) -> None:
    if shutil.which(argv[0]) is None:
        raise AgentError("runtime-missing", f"trtexec not found at '{argv[0]}' on the device; install TensorRT "
                                            "(JetPack ships it at /usr/src/tensorrt/bin/trtexec)")
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = [ln for ln in (out.stdout + out.stderr).splitlines() if "error" in ln.lower()] or \
               (out.stdout + out.stderr).splitlines()[-3:]
        text = " / ".join(tail[-3:])[:400]
        if "No space left" in text:
            raise AgentError("disk-full", f"no space left on the device while trtexec {what}")
        raise AgentError("failed", f"trtexec {what} failed (exit {out.returncode}): {text}")


def _write_raw_inputs(npz: str, folder: str) -> None:
    """trtexec's ``--loadInputs`` reads raw binary tensors: one ``<input>.bin`` per input of batch 0."""
    import numpy as np

    with np.load(npz, allow_pickle=False) as data:
        for key in data.files:
            if key.startswith("0/"):
                name = key[2:]
                data[key].astype(data[key].dtype).tofile(os.path.join(folder, f"{name}.bin"))


def command_trtexec(args) -> dict:
    build = json.loads(args.build_argv)
    run = json.loads(args.run_argv)
    if not os.path.exists(args.engine):
        os.makedirs(os.path.dirname(args.engine), exist_ok=True)
        partial = args.engine + f".partial-{os.getpid()}"
        build = [partial if a == args.engine else a.replace(args.engine, partial) for a in build]
        try:
            _run_trtexec(build, "building the engine")
            os.replace(partial, args.engine)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        built = True
    else:
        built = False
    if args.raw_inputs:
        _write_raw_inputs(args.inputs, args.raw_inputs)
    _run_trtexec(run, "timing the engine")
    with open(args.times, encoding="utf-8") as fh:
        times = json.load(fh)
    latencies = [float(t["latencyMs"]) for t in times if isinstance(t, dict) and "latencyMs" in t]
    per_op = None
    if args.profile and os.path.exists(args.profile):
        with open(args.profile, encoding="utf-8") as fh:
            layers = json.load(fh)
        per_op = [{"name": str(layer["name"]), "op_type": "layer", "provider": "TensorRT",
                   "ms": float(layer.get("averageMs", 0.0)), "calls": 1}
                  for layer in layers if isinstance(layer, dict) and "name" in layer]
        per_op.sort(key=lambda o: -o["ms"])
    version = _command([run[0], "--help"], timeout=30) or ""
    trt_version = next((w.strip("[]v") for ln in version.splitlines()[:3] for w in ln.split()
                        if w.strip("[]v").replace(".", "").replace("#", "").isdigit() and "." in w), None)
    return {"ok": True, "runtime": "tensorrt", "runtime_version": trt_version, "providers": ["TensorRT"],
            "latencies_ms": latencies, "per_op": per_op, "engine_built": built,
            "peak_host_memory_mb": None, "environment": fingerprint(None)}


# ---------------------------------------------------------------------------------------------
# llama.cpp: llama-cpp-python or llama-bench
# ---------------------------------------------------------------------------------------------

LLAMACPP_MISSING = ("neither llama-cpp-python (python3 -c 'import llama_cpp') nor llama-bench is on the device; "
                    "pip install llama-cpp-python there, or put llama.cpp's llama-bench on its PATH")


def _llama_cpp_module():
    try:
        import llama_cpp
    except (ImportError, OSError):
        return None
    return llama_cpp


def llamacpp_tool(llama_bench: str) -> str:
    """``llama-cpp-python`` when it imports here, else ``llama-bench`` when on PATH; else runtime-missing."""
    if _llama_cpp_module() is not None:
        return "llama-cpp-python"
    if shutil.which(llama_bench):
        return "llama-bench"
    raise AgentError("runtime-missing", LLAMACPP_MISSING)


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's ``-o json`` document: a list of tests, each with ``n_prompt``, ``n_gen``,
    ``n_depth`` (newer builds), ``samples_ns`` / ``samples_ts`` (one per repetition), ``avg_ts``,
    ``stddev_ts``, and the build (``build_commit``, ``build_number``, ``backends``, ``cpu_info``)."""
    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        tests = None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise AgentError("failed", "llama-bench printed no JSON test list (is it a llama-bench with -o json?)")
    for test in tests:
        if not isinstance(test.get("samples_ns"), list) or not test["samples_ns"]:
            raise AgentError("failed", "llama-bench's JSON has a test without samples_ns; use a newer llama-bench")
    return tests


def _run_llama_bench(argv: list[str]) -> list[dict]:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
        tail = " / ".join(lines[-2:])[:400]
        if "failed to load model" in tail or "error loading model" in tail:
            raise AgentError("bad-model", f"llama-bench cannot load the GGUF: {tail}")
        raise AgentError("failed", f"llama-bench failed (exit {out.returncode}): {tail}")
    return parse_llama_bench(out.stdout)


def llama_bench_profile(args, lengths: list[int]) -> dict:
    """Prefill of each prompt length, then decode of ``new_tokens - 1`` tokens after the first,
    ``rounds`` repetitions each (llama-bench's own warm-up run first unless ``warmup`` is 0)."""
    base = [args.llama_bench, "-m", args.model, "-r", str(args.rounds), "-o", "json"]
    if args.threads:
        base += ["-t", str(args.threads)]
    if args.warmup == 0:
        base += ["--no-warmup"]
    prefill = _run_llama_bench(base + ["-p", ",".join(map(str, lengths)), "-n", "0"])
    steps = args.new_tokens - 1
    depth = lengths[0]
    try:
        decode = _run_llama_bench(base + ["-p", "0", "-n", str(steps), "-d", str(depth)])
    except AgentError as exc:  # a llama-bench older than -d/--n-depth: decode after an empty context
        if any(word in exc.message for word in ("invalid parameter", "-d", "depth", "unknown argument")):
            decode = _run_llama_bench(base + ["-p", "0", "-n", str(steps)])
            depth = 0
        else:
            raise
    ttft = {}
    for n in lengths:
        test = next((t for t in prefill if t.get("n_prompt") == n and not t.get("n_gen")), None)
        if test is None:
            raise AgentError("failed", f"llama-bench's JSON has no prefill test of {n} tokens")
        ttft[str(n)] = [ns / 1e6 for ns in test["samples_ns"]]
    gen = next((t for t in decode if t.get("n_gen") == steps and not t.get("n_prompt")), None)
    if gen is None:
        raise AgentError("failed", f"llama-bench's JSON has no decode test of {steps} tokens")
    decode_ms = [[ns / 1e6 / steps] * steps for ns in gen["samples_ns"]]
    build = {k: gen.get(k) for k in ("build_commit", "build_number", "backends", "cpu_info", "model_type",
                                        "n_threads", "n_batch", "n_ubatch", "flash_attn", "type_k", "type_v")}
    return {"tool": "llama-bench", "ttft_ms": ttft, "decode_ms": decode_ms, "decode_depth": int(gen.get("n_depth",
            depth) or 0), "per_token": "run mean (llama-bench reports whole runs)",
            "samples_ts": {"decode": gen.get("samples_ts"), **{f"prefill {t.get('n_prompt')}": t.get("samples_ts")
                                                               for t in prefill}},
            "runtime_version": f"llama.cpp b{build.get('build_number')} ({build.get('build_commit')})",
            "build": build, "load_s": None, "peak_host_memory_mb": None, "threads": build.get("n_threads")}


def _prompt_rows(llm, text: str, lengths: list[int]) -> dict:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(ids) < max(lengths) + 8:
        raise AgentError("bad-input", f"the prompt text has {len(ids)} tokens; {max(lengths)} are needed")
    return {n: ids[:n] for n in lengths}


def llama_cpp_python_profile(args, lengths: list[int]) -> dict:
    """Time the greedy loop in llama-cpp-python: per round, every prompt length prefilled (TTFT =
    prefill + argmax), and ``new_tokens - 1`` decode steps after the first length."""
    import numpy as np

    llama_cpp = _llama_cpp_module()
    if not args.prompt_text:
        raise AgentError("bad-input", "llama-cpp-python profiles need --prompt-text (the text prompts are cut from)")
    with open(args.prompt_text, encoding="utf-8") as fh:
        text = fh.read()
    n_ctx = max(max(lengths), lengths[0] + args.new_tokens - 1)
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    except ValueError as exc:
        raise AgentError("bad-model", f"llama.cpp cannot load the GGUF ({exc})") from None
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()
    prompts = _prompt_rows(llm, text, lengths)

    def last_argmax() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(vocab,))))

    def one_round() -> tuple[dict, list]:
        ttft, decode = {}, []
        for n in lengths:
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompts[n])
            token = last_argmax()
            ttft[str(n)] = (time.perf_counter() - t) * 1000.0
            if n == lengths[0]:
                for _ in range(args.new_tokens - 1):
                    t = time.perf_counter()
                    llm.eval([token])
                    token = last_argmax()
                    decode.append((time.perf_counter() - t) * 1000.0)
        return ttft, decode

    for _ in range(args.warmup):
        one_round()
    ttft_ms: dict = {str(n): [] for n in lengths}
    decode_ms = []
    for _ in range(args.rounds):
        ttft, decode = one_round()
        for n, ms in ttft.items():
            ttft_ms[n].append(ms)
        decode_ms.append(decode)
    from importlib import metadata

    threads = llm.context_params.n_threads
    return {"tool": "llama-cpp-python", "ttft_ms": ttft_ms, "decode_ms": decode_ms, "decode_depth": lengths[0],
            "per_token": "measured", "runtime_version": metadata.version("llama-cpp-python"),
            "build": {"system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                      "n_ctx": n_ctx, "n_batch": llm.n_batch},
            "load_s": load_s, "peak_host_memory_mb": peak_host_memory_mb(), "threads": threads}


def command_llamacpp(args) -> dict:
    try:
        lengths = [int(n) for n in args.prompt_tokens.split(",") if n.strip()]
    except ValueError:
        raise AgentError("bad-input", f"prompt tokens '{args.prompt_tokens}': give comma-separated counts") from None
    if not lengths or min(lengths) < 1 or args.new_tokens < 2 or args.rounds < 1:
        raise AgentError("bad-input", "give prompt lengths >= 1, new tokens >= 2 and rounds >= 1")
    if not os.path.exists(args.model):
        raise AgentError("bad-model", f"{args.model} is not on the device")
    tool = args.tool or llamacpp_tool(args.llama_bench)
    if tool == "llama-cpp-python":
        if _llama_cpp_module() is None:
            raise AgentError("runtime-missing", "llama-cpp-python does not import on the device (pip install "
                                                "llama-cpp-python)")
        result = llama_cpp_python_profile(args, lengths)
    else:
        if not shutil.which(args.llama_bench):
            raise AgentError("runtime-missing", f"llama-bench not found at '{args.llama_bench}' on the device")
        result = llama_bench_profile(args, lengths)
    return {"ok": True, "runtime": "llamacpp", "providers": ["llama.cpp-cpu"], **result,
            "environment": fingerprint(result.get("threads") or args.threads)}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def require(args) -> None:
    """Refuse early, before anything is copied, when the runtime asked for is not on the device."""
    if args.require == "onnxruntime":
        ort = _import_ort()
        wanted = PROVIDERS.get(args.provider)
        if wanted is None:
            raise AgentError("bad-input", f"unknown provider '{args.provider}'; use one of {', '.join(PROVIDERS)}")
        if wanted not in ort.get_available_providers():
            raise AgentError("provider-missing", f"ONNX Runtime {ort.__version__} on the device has no {wanted} "
                                                 f"(it has {', '.join(ort.get_available_providers())})")
    elif args.require == "llamacpp":
        llamacpp_tool(args.llama_bench)
    elif args.require == "trtexec" and shutil.which(args.trtexec) is None:
        raise AgentError("runtime-missing", f"trtexec not found at '{args.trtexec}' on the device; install TensorRT "
                                            "(JetPack ships it at /usr/src/tensorrt/bin/trtexec)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesmith-agent")
    p.add_argument("--deadline", type=float, default=None, help="stop by itself after this many seconds")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fingerprint")
    f.add_argument("--require", choices=["onnxruntime", "trtexec", "llamacpp"], default=None,
                   help="fail (runtime-missing) unless this runtime is usable on the device")
    f.add_argument("--provider", default="cpu")
    f.add_argument("--trtexec", default="trtexec")
    f.add_argument("--llama-bench", default="llama-bench")
    o = sub.add_parser("ort")
    o.add_argument("--model", required=True)
    o.add_argument("--inputs", required=True)
    o.add_argument("--provider", default="cpu")
    o.add_argument("--threads", type=int, default=None)
    o.add_argument("--warmup", type=int, default=5)
    o.add_argument("--iterations", type=int, default=50)
    o.add_argument("--time-budget", type=float, default=None)
    o.add_argument("--per-op-runs", type=int, default=0)
    g = sub.add_parser("llamacpp")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt-tokens", required=True, help="comma-separated prompt lengths; decode follows the first")
    g.add_argument("--new-tokens", type=int, required=True)
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--prompt-text", default=None, help="text the prompts are cut from (llama-cpp-python)")
    g.add_argument("--tool", choices=["llama-cpp-python", "llama-bench"], default=None,
                   help="default: llama-cpp-python where it imports, else llama-bench")
    g.add_argument("--llama-bench", default="llama-bench")
    t = sub.add_parser("trtexec")
    t.add_argument("--engine", required=True)
    t.add_argument("--build-argv", required=True)
    t.add_argument("--run-argv", required=True)
    t.add_argument("--times", required=True)
    t.add_argument("--profile", default=None)
    t.add_argument("--inputs", default=None)
    t.add_argument("--raw-inputs", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    arm_deadline(args.deadline)
    try:
        if args.command == "fingerprint":
            require(args)
            result = {"ok": True, "environment": fingerprint(None)}
        elif args.command == "ort":
            result = command_ort(args)
        elif args.command == "llamacpp":
            result = command_llamacpp(args)
        else:
            result = command_trtexec(args)
    except AgentError as exc:
        fail(exc.kind, exc.message)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            fail("disk-full", f"no space left on the device ({exc})")
        fail("failed", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # report every fault as one JSON line, never a bare traceback
        fail("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    result["agent_version"] = AGENT_VERSION
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
