"""Generation profiles measured in a process of their own, as each runtime's own users run it.

Why a process: a setting one runtime needs is another's poison. ``OMP_WAIT_POLICY=PASSIVE`` keeps
PyTorch's OpenMP threads from spinning against ONNX Runtime's in one process, and makes llama.cpp
(whose ggml threads meet at an OpenMP barrier after every op) 3.5x slower: SmolLM2 Q4_0 decoded
43-45 tokens/s with it and 155-165 without, in the same session class. ONNX Runtime's spinning
threads starve a second session in the same process. And a profile's peak memory should be the
runtime's, not the tool's: measured inside edgesmith's process, the 98 MB SmolLM2 GGUF reported
4,114 MB peak RSS (everything a recipe had loaded before it); in a worker it is llama.cpp's.

So :func:`run_worker` starts ``python -m edgesmith.profiling.worker`` with the environment the user
started edgesmith with (edgesmith sets no process-wide threading variable), sends it one JSON spec
on stdin (the artifact's path, the runtime and its options, the prompts' token ids, the lengths and
rounds), and reads JSON lines back: one per finished round (for the progress bar), then the raw
samples or the error. The worker imports only the runtime it profiles (no torch for llama.cpp), resets
its peak-RSS mark just before loading, and measures on the same loop ``generate`` runs
(:func:`edgesmith.runtimes.generation.decode_loop`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith import errors
from edgesmith.errors import EdgesmithError, first_line
from edgesmith.faults import point
from edgesmith.profiling.agent import peak_host_memory_mb as vmhwm_mb

log = logging.getLogger(__name__)

WORKER_MODULE = "edgesmith.profiling.worker"


def worker_env() -> dict[str, str]:
    """The worker's environment: this process's (the user's), so each runtime gets its native
    threading defaults or what the user chose; edgesmith adds nothing process-wide."""
    return dict(os.environ)


def run_worker(spec: dict[str, Any], *, on_round: Callable[[], None] | None = None) -> dict[str, Any]:
    """Measure ``spec`` (see :func:`measure`) in a fresh worker process; the raw samples it returns.
    An error the worker raised on purpose comes back as the same error class (same exit code)."""
    cmd = [sys.executable, "-m", WORKER_MODULE]
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=worker_env())
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            result, error = None, None
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a library printed to stdout; the protocol's lines are JSON objects
                if not isinstance(message, dict):
                    continue
                if "round" in message and on_round is not None:
                    on_round()
                elif "result" in message:
                    result = message["result"]
                elif "error" in message:
                    error = message["error"]
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if error is not None:
            cls = getattr(errors, str(error.get("class")), None)
            if not (isinstance(cls, type) and issubclass(cls, EdgesmithError)):
                cls = EdgesmithError
            raise cls(error.get("message") or "the profiling worker failed")
        if code < 0 and result is None:  # killed (the OOM killer, a user's kill -9): nothing was measured or written
            raise EdgesmithError(f"the profiling worker for {spec.get('name')} ({spec.get('runtime')}) was killed by "
                                 f"signal {-code} before it finished; nothing was written; run the command again")
        if code != 0 or result is None:
            stderr.seek(0)
            tail = [ln for ln in stderr.read().splitlines() if ln.strip()][-12:]
            raise RuntimeError(f"the profiling worker for {spec.get('name')} ({spec.get('runtime')}) exited with "
                               f"{code} and no result" + (":\n" + "\n".join(tail) if tail else ""))
    return result


def artifact_location(artifact, runtime: str, scratch: Path) -> Path:
    """Where the worker loads ``artifact`` from: the file the runtime runs as it is (a GGUF for
    llama.cpp: :meth:`~edgesmith.runtimes.base.Runtime.decoder_location`), the artifact's folder
    otherwise; a model that lives only in memory is saved into ``scratch`` first."""
    from edgesmith.runtimes.base import get_runtime

    location = get_runtime(runtime).decoder_location(artifact)
    if location is not None:
        return location
    folder = getattr(artifact, "folder", None)
    if folder is not None and Path(folder, "edgesmith.json").exists():
        return Path(folder)
    target = scratch / "model"
    artifact.save(target)
    return target


# ---------------------------------------------------------------------------------------------
# Inside the worker
# ---------------------------------------------------------------------------------------------


_CLEAR_REFS = "/proc/self/clear_refs"


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark (VmHWM) to its current RSS (Linux); False where not possible."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss(was_reset: bool) -> tuple[float | None, str]:
    """(peak RSS in MiB, how it was read)."""
    if was_reset:
        hwm = vmhwm_mb()
        if hwm is not None:
            return hwm, "VmHWM reset before loading (Linux /proc/self/clear_refs)"
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1), \
            "getrusage ru_maxrss (the process's lifetime peak)"
    except (AttributeError, OSError):  # pragma: no cover - no resource module (Windows)
        pass
    try:  # pragma: no cover - Windows
        import psutil

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)
        return round((peak or info.rss) / 2**20, 1), "psutil " + ("peak_wset" if peak else "rss at the end")
    except ImportError:  # pragma: no cover
        return None, "unavailable"


def _open_session(spec: dict[str, Any]):
    """The session on what :func:`artifact_location` gave, through the runtime's own loader (the
    llama.cpp side imports no torch)."""
    from edgesmith.runtimes.base import get_runtime

    runtime = get_runtime(spec["runtime"])
    return runtime.load_decoder_at(Path(spec["path"]), threads=spec.get("threads"), **dict(spec.get("options") or {}))


def _open_measured(spec: dict[str, Any]):
    """The session, with this process's peak-RSS mark reset just before loading: (session, whether
    the mark was reset, seconds to load)."""
    was_reset = reset_peak_rss()
    t0 = time.perf_counter()
    session = _open_session(spec)
    return session, was_reset, time.perf_counter() - t0


def _session_facts(session) -> dict[str, Any]:
    """What the session ran on and with (JSON-ready), read before it closes."""
    options = {k: (v if isinstance(v, str | int | float | bool) or v is None else str(v))
               for k, v in dict(session.options or {}).items()}
    return {"providers": list(session.providers), "options": options}


def _process_facts(was_reset: bool, load_s: float) -> dict[str, Any]:
    """Load time, and the worker's peak RSS once the session is closed."""
    rss_mb, rss_source = peak_rss(was_reset)
    return {"load_s": load_s, "peak_rss_mb": rss_mb, "pid": os.getpid(),
            "rss_source": rss_source + ", in the profiling worker (the runtime's process, not edgesmith's)"}


def _prompts(spec: dict[str, Any], vocab_size: int) -> dict[int, np.ndarray]:
    if spec.get("prompts") is not None:
        return {int(n): np.asarray(rows, dtype=np.int64) for n, rows in spec["prompts"].items()}
    rng = np.random.default_rng(int(spec.get("seed", 0)))  # no tokenizer: random ids within the vocabulary
    return {int(n): rng.integers(0, vocab_size, size=(int(spec["batch"]), int(n)), dtype=np.int64)
            for n in spec["lengths"]}


def _round(session, prompts: dict[int, np.ndarray], decode_at: int, new_tokens: int
           ) -> tuple[dict[int, float], list[float]]:
    """One round: the TTFT of every prompt length, and the decode latencies after ``decode_at``, in
    the runtime's own loop where it has one (ORT GenAI's generator), else edgesmith's."""
    from edgesmith.runtimes.generation import decode_static_batch, pad_id_of

    ttft: dict[int, float] = {}
    decode: list[float] = []
    pad = pad_id_of(session)
    for n, ids in prompts.items():
        steps = new_tokens if n == decode_at else 1
        run = decode_static_batch(session, ids.tolist(), steps, pad)
        session.reset()
        ttft[n] = run.ttft_ms
        if n == decode_at:  # ignore_eos forces the length; generation_profile checks the count
            decode = run.latencies_ms
    return ttft, decode


def measure(spec: dict[str, Any], on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Load the artifact on its runtime and time ``warmup`` + ``rounds`` rounds of the prompts.

    ``spec``: name, runtime, path, options, threads, lengths (the first is the one decode follows),
    new_tokens, warmup, rounds, batch, and prompts {length: ids} (or seed for random ids); or, for
    static batches of mixed-length prompts, ``batches`` (see :func:`_measure_batches`)."""
    if spec.get("batches"):
        return _measure_batches(spec, on_round)
    lengths = [int(n) for n in spec["lengths"]]
    new_tokens, warmup, rounds = int(spec["new_tokens"]), int(spec["warmup"]), int(spec["rounds"])
    session, was_reset, load_s = _open_measured(spec)
    try:
        from edgesmith.runtimes.decoder import check_context

        check_context(lengths, new_tokens, session.max_positions, spec["name"])
        prompts = _prompts(spec, session.vocab_size)
        prompts = {n: prompts[n] for n in lengths}
        for _ in range(warmup):
            _round(session, prompts, lengths[0], new_tokens)
        ttft: dict[str, list[float]] = {str(n): [] for n in lengths}
        decode_rounds: list[list[float]] = []
        for i in range(rounds):
            times, decode = _round(session, prompts, lengths[0], new_tokens)
            for n, ms in times.items():
                ttft[str(n)].append(ms)
            decode_rounds.append(decode)
            if on_round is not None:
                on_round(i)
            point(f"profile-worker:round:{i}")
        facts = _session_facts(session)
    finally:
        session.close()
    return {"ttft_ms": ttft, "decode_ms": decode_rounds, **facts, **_process_facts(was_reset, load_s)}


def _batch_rows(spec: dict[str, Any], vocab_size: int) -> dict[int, list[list[int]]]:
    """{batch size: its rows' token ids}: the spec's, or random ids of the spec's row lengths."""
    if spec.get("rows") is not None:
        return {int(b): [[int(t) for t in row] for row in rows] for b, rows in spec["rows"].items()}
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    return {int(b): [rng.integers(0, vocab_size, size=int(n)).tolist() for n in lengths]
            for b, lengths in spec["row_lengths"].items()}


def _measure_batches(spec: dict[str, Any], on_round: Callable[[int], None] | None) -> dict[str, Any]:
    """Static batches of mixed-length prompts, one session for every batch size: room for the
    largest batch is made first (:meth:`~edgesmith.runtimes.decoder.DecoderSession.reserve`), then
    ``warmup`` untimed and ``rounds`` timed rounds, each round running every batch size, starting
    at another size each round (rotating, so a slow spell of a loaded machine is not one size's).

    ``spec``: name, runtime, path, options, threads, batches, rows {batch: token ids per row} (or
    row_lengths and seed), new_tokens, warmup, rounds, pad_id (None: the session's)."""
    from edgesmith.runtimes.decoder import DecoderSession
    from edgesmith.runtimes.generation import decode_static_batch, pad_id_of

    batches = [int(b) for b in spec["batches"]]
    new_tokens, warmup, rounds = int(spec["new_tokens"]), int(spec["warmup"]), int(spec["rounds"])
    session, was_reset, load_s = _open_measured(spec)
    try:
        rows = _batch_rows(spec, session.vocab_size)
        longest = max(len(r) for b in batches for r in rows[b])
        if session.max_positions and longest + new_tokens - 1 > session.max_positions:
            raise errors.BadInput(f"{spec['name']}: the batch's longest prompt ({longest} tokens) and {new_tokens} new "
                                  f"tokens exceed the model's context of {session.max_positions} positions; lower "
                                  "--prompt-tokens (the center of the mixed lengths) or --new-tokens")
        session.reserve(max(batches), longest + new_tokens - 1)
        pad = spec.get("pad_id")
        pad = pad_id_of(session) if pad is None else int(pad)
        for _ in range(warmup):
            for b in batches:
                decode_static_batch(session, rows[b], new_tokens, pad)
        ttft: dict[str, list[float]] = {str(b): [] for b in batches}
        decode: dict[str, list[list[float]]] = {str(b): [] for b in batches}
        for i in range(rounds):
            for b in batches[i % len(batches):] + batches[:i % len(batches)]:
                run = decode_static_batch(session, rows[b], new_tokens, pad)
                session.reset()
                ttft[str(b)].append(run.ttft_ms)
                decode[str(b)].append(run.latencies_ms)
                if on_round is not None:
                    on_round(i)
            point(f"profile-worker:round:{i}")
        facts = _session_facts(session)
        loop = type(session).BATCHING
        if type(session).decode_rows is not DecoderSession.decode_rows and loop == DecoderSession.BATCHING:
            loop = f"{type(session).__name__}'s own batched loop"  # decode_rows overridden, BATCHING not said
    finally:
        session.close()
    return {"loop": loop, "batches": {str(b): {"ttft_ms": ttft[str(b)], "decode_ms": decode[str(b)],
                                 "row_prompt_tokens": [len(r) for r in rows[b]]} for b in batches},
            **facts, **_process_facts(was_reset, load_s)}


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    try:
        result = measure(spec, on_round=lambda i: _emit({"round": i}))
    except EdgesmithError as exc:  # anything else: its traceback on stderr, which the parent quotes
        _emit({"error": {"class": type(exc).__name__, "message": first_line(exc, 1000)}})
        return exc.exit_code
    _emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
