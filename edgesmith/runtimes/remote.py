"""Profile on a device the user's own ``ssh`` reaches: a Raspberry Pi, a Jetson, a server.

edgesmith drives the system's OpenSSH client (so the user's keys, agent, ``~/.ssh/config``,
ProxyJump all work), always with ``BatchMode=yes`` (never a prompt), ``StrictHostKeyChecking=yes``
(a host key is never accepted on the user's behalf) and a connection timeout, and shares one
connection between its commands (ControlMaster/ControlPersist).

On the device, nothing of edgesmith is installed: the artifact's model files are copied into a
cache folder keyed by the artifact's content hash (skipped when present; streamed as tar into a
temp folder that is renamed into place only when complete, so no half-copied artifact is ever
left), and the single-file agent (:mod:`edgesmith.runtimes.agent`, standard library plus the
device's runtime) is sent over stdin (``ssh host python3 - ARGS < agent.py``). It prints a JSON
result that becomes a :class:`~edgesmith.profiling.Profile` in the same schema as a local one,
whose environment is the device's fingerprint. Every argument reaching the remote shell is quoted.

On TensorRT targets (Jetson), the engine is built on the device with ``trtexec`` (engines are
device-specific), cached there by key, and copied back into the local cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput
from edgesmith.export.tensorrt_typing import (
    Typing,
    needs_conversion,
    trtexec_precision_flags,
    typing_for_version,
)

log = logging.getLogger(__name__)
#: mktemp's template suffix (six random characters)
MKTEMP_SUFFIX = "X" * 6

AGENT_PATH = Path(__file__).with_name("agent.py")
SSH = "ssh"
CONTROL_PERSIST_S = 120
#: ssh's own exit status for a connection or authentication failure
SSH_FAILED = 255
#: seconds added to a remote deadline before the local side kills the connection
KILL_GRACE_S = 10.0


# ---------------------------------------------------------------------------------------------
# Errors: one line each, exit 2
# ---------------------------------------------------------------------------------------------

_HOST_KEY = ("Host key verification failed", "host key is known", "REMOTE HOST IDENTIFICATION HAS CHANGED",
             "No matching host key")
_AUTH = ("Permission denied", "Too many authentication failures", "Authentication failed")
_UNREACHABLE = ("Could not resolve hostname", "Connection refused", "No route to host", "Network is unreachable",
                "Connection timed out", "Operation timed out", "timed out during banner exchange",
                "kex_exchange_identification", "Connection closed by", "Connection reset by")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    return lines[-1][:300] if lines else ""


def ssh_error(destination: str, rc: int, stderr: str) -> BadInput:
    """The one-line error for a failed ssh command (``rc`` its exit status, ``stderr`` its messages)."""
    if "No space left on device" in stderr:
        return BadInput(f"{destination}: the device's disk is full (No space left on device); "
                        "free space there or set cache_dir in the target to a bigger disk")
    if rc == SSH_FAILED or any(s in stderr for s in (*_HOST_KEY, *_AUTH)):
        if any(s in stderr for s in _HOST_KEY):
            return BadInput(f"{destination}: the device's host key is not known or has changed "
                            f"({_last_line(stderr)}); edgesmith never accepts host keys: check the key and add it "
                            "to known_hosts yourself (connect once with `ssh HOST`, or ssh-keyscan)")
        if any(s in stderr for s in _AUTH):
            return BadInput(f"{destination}: authentication refused ({_last_line(stderr)}); ssh runs with "
                            "BatchMode (no password prompts): load your key in ssh-agent or set IdentityFile "
                            "for this host in ~/.ssh/config (or the --ssh-config file)")
        if any(s in stderr for s in _UNREACHABLE) or rc == SSH_FAILED:
            return BadInput(f"{destination}: host unreachable ({_last_line(stderr) or 'ssh exit 255'}); "
                            "check the address, port and that the device is on and runs sshd")
    if rc == 127 and ("not found" in stderr or "No such file" in stderr):
        return BadInput(f"{destination}: a command is missing on the device ({_last_line(stderr)}); install "
                        "Python 3 there or set `python:` in the target to its absolute path")
    return BadInput(f"{destination}: remote command failed (exit {rc}): {_last_line(stderr) or 'no message'}")


def agent_error(destination: str, result: dict) -> BadInput:
    kind, message = result.get("kind", "failed"), result.get("message", "")
    fixes = {
        "runtime-missing": "the device's runtime is missing",
        "provider-missing": "the execution provider is missing on the device",
        "disk-full": "the device's disk is full",
        "timeout": "the run exceeded its timeout",
        "bad-model": "the device's runtime cannot load the model",
        "bad-input": "bad input to the device agent",
    }
    return BadInput(f"{destination}: {fixes.get(kind, 'profiling failed on the device')}: {message}")


# ---------------------------------------------------------------------------------------------
# The ssh connection
# ---------------------------------------------------------------------------------------------


@dataclass
class RemoteDevice:
    """A device reached by the system's ``ssh``; commands share one master connection."""

    destination: str
    ssh_config: str | None = None
    ssh_options: Sequence[str] = ()
    connect_timeout_s: int = 10
    python: str = "python3"
    cache_dir: str = ".cache/edgesmith-device"
    control: bool = True
    control_persist_s: int = CONTROL_PERSIST_S
    #: what the last operations did (for logs and tests): "copied" / "cached" per remote path
    actions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_target(cls, target, ssh_config: str | Path | None = None) -> RemoteDevice:
        if not target.host or target.is_local:
            raise BadInput(f"target {target.name} has no SSH destination; give --host HOST "
                           "(an ~/.ssh/config alias, user@host or user@host:port)")
        config = str(ssh_config) if ssh_config else target.ssh_config
        if config and not Path(config).expanduser().is_file():
            raise BadInput(f"ssh config file {config} not found; give an existing file to --ssh-config")
        return cls(destination=target.host, ssh_config=str(Path(config).expanduser()) if config else None,
                   ssh_options=list(target.ssh_options), connect_timeout_s=target.connect_timeout_s,
                   python=target.python, cache_dir=target.cache_dir)

    # -- argv -------------------------------------------------------------------------------
    def control_path(self) -> str:
        """A socket per (destination, config file and its content, options): a different key or
        known_hosts file never rides on another configuration's connection."""
        digest = hashlib.sha256(self.destination.encode())
        for option in self.ssh_options:
            digest.update(b"\0" + option.encode())
        if self.ssh_config:
            digest.update(b"\0" + self.ssh_config.encode())
            with contextlib.suppress(OSError):
                digest.update(Path(self.ssh_config).read_bytes())
        folder = Path(tempfile.gettempdir()) / f"edgesmith-ssh-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return str(folder / digest.hexdigest()[:20])

    def base_argv(self) -> list[str]:
        # ssh takes the first value it reads for an option: ours come first and cannot be overridden
        argv = [SSH]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        argv += ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                 "-o", f"ConnectTimeout={int(self.connect_timeout_s)}"]
        for option in self.ssh_options:
            argv += ["-o", option]
        return argv

    def argv(self, remote_command: str) -> list[str]:
        argv = self.base_argv()
        if self.control:
            argv += ["-o", f"ControlPath={self.control_path()}", "-o", "ControlMaster=no"]
        # sshd starts commands in the passwd home; a relative cache_dir means the login's $HOME
        return argv + ["--", self.destination, f'cd "$HOME" 2>/dev/null; {remote_command}']

    # -- connection -------------------------------------------------------------------------
    def _master_alive(self) -> bool:
        argv = self.base_argv() + ["-o", f"ControlPath={self.control_path()}", "-O", "check", "--", self.destination]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def connect(self) -> None:
        """Open (or reuse) the master connection; a refused or unreachable host fails here, clearly."""
        if not self.control or self._master_alive():
            return
        argv = (self.base_argv() + ["-o", "ControlMaster=yes", "-o", f"ControlPath={self.control_path()}",
                                    "-o", f"ControlPersist={int(self.control_persist_s)}", "-f", "-N",
                                    "--", self.destination])
        # stderr goes to a file: the backgrounded master keeps it open, a pipe would never reach EOF
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=self.connect_timeout_s + 30, check=False)
            except subprocess.TimeoutExpired as exc:
                raise BadInput(f"{self.destination}: host unreachable (no SSH session within "
                               f"{self.connect_timeout_s + 30} s)") from exc
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise ssh_error(self.destination, proc.returncode, stderr)

    def close(self) -> None:
        """Stop the shared connection (it would otherwise persist ``control_persist_s`` seconds)."""
        if not self.control:
            return
        argv = self.base_argv() + ["-o", f"ControlPath={self.control_path()}", "-O", "exit", "--", self.destination]
        subprocess.run(argv, capture_output=True, timeout=30, check=False)

    def run(self, remote_command: str, *, stdin: bytes | Callable[[IO[bytes]], None] | None = None,
            timeout: float = 60.0, what: str = "remote command") -> subprocess.CompletedProcess:
        """Run a (quoted) shell command on the device; ``stdin`` is bytes or a writer of the stream.

        A failure of ssh itself raises a one-line :class:`BadInput`; the command's own exit status
        is returned for the caller to judge. Past ``timeout`` the connection is killed.
        """
        argv = self.argv(remote_command)
        log.debug("ssh: %s", shlex.join(argv))
        with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err)
            killed = threading.Event()

            def _kill() -> None:
                killed.set()
                proc.kill()

            timer = threading.Timer(timeout, _kill)
            timer.start()
            try:
                with contextlib.suppress(BrokenPipeError):
                    if callable(stdin):
                        stdin(proc.stdin)
                    elif stdin is not None:
                        proc.stdin.write(stdin)
                with contextlib.suppress(BrokenPipeError, OSError):
                    proc.stdin.close()
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                timer.cancel()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read().decode(errors="replace")
        if killed.is_set():
            raise BadInput(f"{self.destination}: {what} timed out after {timeout:.0f} s and was stopped; "
                           "raise the target's timeout_s (or --timeout) or profile fewer iterations")
        if rc == SSH_FAILED or (rc != 0 and any(s in stderr for s in (*_HOST_KEY, *_AUTH))):
            raise ssh_error(self.destination, rc, stderr)
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    # -- the device cache -------------------------------------------------------------------
    def remote_path(self, *parts: str) -> str:
        return "/".join([self.cache_dir.rstrip("/"), *parts])

    def present(self, paths: Sequence[str], timeout: float = 60.0) -> dict[str, bool]:
        # marked lines: a login script that prints something cannot be mistaken for an answer
        script = "; ".join(f"if [ -e {shlex.quote(p)} ]; then echo edgesmith-present:1; "
                           f"else echo edgesmith-present:0; fi" for p in paths)
        proc = self.run(script, timeout=timeout, what="checking the device cache")
        if proc.returncode != 0:
            raise ssh_error(self.destination, proc.returncode, proc.stderr)
        flags = [ln.split(":", 1)[1] for ln in proc.stdout.decode(errors="replace").split()
                 if ln.startswith("edgesmith-present:")]
        if len(flags) != len(paths):
            raise BadInput(f"{self.destination}: unexpected answer from the device shell: {proc.stdout[:200]!r}")
        return {p: f == "1" for p, f in zip(paths, flags)}

    def put_folder(self, files: dict[str, Path], final: str, *, timeout: float = 600.0) -> bool:
        """Copy ``files`` (name → local path) into the device folder ``final`` unless it exists.

        The files are streamed as tar into ``.partial-*`` beside ``final`` and renamed into place
        only when complete; a failed or killed copy removes the partial folder (the remote shell's
        trap), so ``final`` is either absent or complete. Returns True when it copied.
        """
        if self.present([final], timeout=timeout)[final]:
            self.actions[final] = "cached"
            return False
        parent = final.rsplit("/", 1)[0] if "/" in final else "."
        qparent, qfinal = shlex.quote(parent), shlex.quote(final)
        script = (f"set -e; mkdir -p {qparent}; "
                  f"find {qparent} -maxdepth 1 -name '.partial-*' -mmin +120 -exec rm -rf {{}} + 2>/dev/null || true; "
                  f"if [ -e {qfinal} ]; then cat >/dev/null; exit 0; fi; "
                  f"tmp=$(mktemp -d {qparent}/.partial-{MKTEMP_SUFFIX}); trap 'rm -rf \"$tmp\"' EXIT HUP INT TERM PIPE; "
                  f"tar -xf - -C \"$tmp\"; if [ -e {qfinal} ]; then exit 0; fi; mv \"$tmp\" {qfinal}")

        def _write(stream: IO[bytes]) -> None:
            with tarfile.open(fileobj=stream, mode="w|") as tar:
                for name, path in files.items():
                    tar.add(str(path), arcname=name, recursive=False)

        proc = self.run(script, stdin=_write, timeout=timeout, what=f"copying to {final}")
        if proc.returncode != 0:
            self._remove_partials(parent)
            raise ssh_error(self.destination, proc.returncode, proc.stderr)
        self.actions[final] = "copied"
        return True

    def _remove_partials(self, parent: str) -> None:
        """Best effort, after a failed copy: the remote trap normally did it already."""
        with contextlib.suppress(BadInput, subprocess.SubprocessError, OSError):
            self.run(f"rm -rf {shlex.quote(parent)}/.partial-*", timeout=30, what="cleaning up")

    def fetch_file(self, remote: str, local: Path, *, timeout: float = 600.0) -> Path:
        """Copy one device file into ``local`` (a temp file renamed into place)."""
        proc = self.run(f"cat {shlex.quote(remote)}", timeout=timeout, what=f"fetching {remote}")
        if proc.returncode != 0:
            raise ssh_error(self.destination, proc.returncode, proc.stderr)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(proc.stdout)
        os.replace(tmp, local)
        return local

    # -- the agent ----------------------------------------------------------------------------
    def agent(self, args: Sequence[str], *, timeout: float) -> dict:
        """Run the agent (sent over stdin) with ``args``; return its JSON result or raise one line."""
        deadline = max(1.0, timeout)
        command = " ".join([shlex.quote(self.python), "-", "--deadline", shlex.quote(f"{deadline:.1f}"),
                            *(shlex.quote(str(a)) for a in args)])
        proc = self.run(command, stdin=AGENT_PATH.read_bytes(), timeout=deadline + KILL_GRACE_S,
                        what="the profiling agent")
        result = _parse_agent_output(proc.stdout.decode(errors="replace"))
        if result is None:
            if proc.returncode != 0:
                raise ssh_error(self.destination, proc.returncode, proc.stderr.strip() or "the agent printed nothing")
            raise BadInput(f"{self.destination}: the device agent printed no result ({_last_line(proc.stderr)})")
        if not result.get("ok"):
            raise agent_error(self.destination, result)
        return result


def _parse_agent_output(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


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


# ---------------------------------------------------------------------------------------------
# trtexec (TensorRT on Jetson): command lines against trtexec's documented flags
# ---------------------------------------------------------------------------------------------


def _shape_spec(input_names: Sequence[str], batch: int, seq: int) -> str:
    return ",".join(f"{name}:{batch}x{seq}" for name in input_names)


ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_build_argv(trtexec: str, onnx_path: str, engine_path: str, *, input_names: Sequence[str],
                       batch: int | None = None, seq: int | None = None, precision: str = "fp16",
                       workspace_mib: int = 1024, timing_cache: str | None = None,
                       profiles: Sequence[dict[str, ShapeTriple]] | None = None,
                       optimization_level: int | None = None, typing: Typing = "weak") -> list[str]:
    """``trtexec`` build of an engine from an ONNX graph (engines are device-specific).

    Shapes: ``profiles`` (one dict per optimization profile: input name -> (min, opt, max) shapes;
    trtexec takes one ``--minShapes/--optShapes/--maxShapes`` triple per profile, in order), or a
    single static ``batch`` x ``seq`` profile for every input. Precision flags: see
    :func:`edgesmith.export.tensorrt_typing.trtexec_precision_flags` (TensorRT 10's; a strongly typed
    trtexec, TensorRT 11, gets none and the graph must carry the precision; no fp8: FP8 needs
    Hopper-class GPUs, where the Python builder is available, and trtexec builds serve Jetsons). ``--memPoolSize=workspace:N`` is in MiB,
    ``--builderOptimizationLevel`` 0-5, ``--skipInference``: build only.
    """
    precision_flags = trtexec_precision_flags(precision, typing)  # refuses an unknown precision first
    if not profiles:
        if batch is None or seq is None or batch < 1 or seq < 1:
            raise BadInput(f"batch and seq must be at least 1 (got batch={batch}, seq={seq})")
        static = (batch, seq)
        profiles = [{name: (static, static, static) for name in input_names}]
    argv = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    for profile in profiles:
        missing = [n for n in input_names if n not in profile]
        if missing:
            raise BadInput(f"trtexec profile has no shapes for input(s) {', '.join(missing)}")
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            argv.append(f"{flag}=" + ",".join(f"{n}:{_dims(profile[n][i])}" for n in input_names))
    argv += [f"--memPoolSize=workspace:{int(workspace_mib)}", "--skipInference"]
    argv += precision_flags
    if optimization_level is not None:
        if not 0 <= int(optimization_level) <= 5:
            raise BadInput(f"builder optimization level must be 0-5 (got {optimization_level})")
        argv.append(f"--builderOptimizationLevel={int(optimization_level)}")
    if timing_cache:
        argv.append(f"--timingCacheFile={timing_cache}")
    return argv


def trtexec_run_argv(trtexec: str, engine_path: str, *, input_names: Sequence[str], batch: int, seq: int,
                     inputs_dir: str | None, warmup_ms: int, iterations: int, duration_s: float,
                     times_path: str, profile_path: str | None = None) -> list[str]:
    """``trtexec`` timing of a built engine: every iteration's latency to ``--exportTimes``, and
    per-layer times (in a separate run, so profiling never skews the timings) to ``--exportProfile``."""
    argv = [trtexec, f"--loadEngine={engine_path}", f"--shapes={_shape_spec(input_names, batch, seq)}",
            f"--warmUp={int(warmup_ms)}", f"--iterations={int(iterations)}", f"--duration={duration_s:g}",
            f"--exportTimes={times_path}"]
    if inputs_dir:
        argv.append("--loadInputs=" + ",".join(f"{n}:{inputs_dir}/{n}.bin" for n in input_names))
    if profile_path:
        argv += [f"--exportProfile={profile_path}", "--separateProfileRun"]
    return argv


def engine_key(artifact_hash: str, precision: str, batch: int, seq: int, device: dict) -> str:
    """An engine is specific to the graph, precision, shapes, GPU and TensorRT version (and L4T)."""
    ident = json.dumps([artifact_hash, precision, batch, seq, (device.get("gpu") or {}).get("name"),
                        device.get("l4t_release"), device.get("libraries", {}).get("tensorrt"),
                        device.get("cpu_model")], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


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
                   device: RemoteDevice | None = None):
    """Profile ``artifact`` (an ONNX model) on the device ``target`` reaches over SSH.

    Returns a Profile whose environment is the device's fingerprint; ``runtime.options["remote"]``
    records the destination, the device cache folder and whether the artifact was copied or found.
    """
    from edgesmith.profiling import (OpTime, Profile, RuntimeInfo, Shapes, Stats, _check_arguments, artifact_info,
                                     build_feeds, summarize)
    from edgesmith.environment import Environment

    _check_arguments(batch, seq, warmup, iterations, time_budget_s)
    if not isinstance(artifact, OnnxModel):
        raise BadInput(f"remote profiling runs ONNX models; this is a {artifact.kind} model: export it first "
                       "(edgesmith export MODEL --to onnx)")
    runtime = runtime or target.runtime
    provider = provider or target.provider
    threads = threads if threads is not None else target.threads
    timeout_s = float(timeout_s or target.timeout_s)
    started = time.monotonic()
    device = device or RemoteDevice.from_target(target, ssh_config)

    def left() -> float:
        remaining = timeout_s - (time.monotonic() - started)
        if remaining <= 0:
            raise BadInput(f"{device.destination}: profiling timed out after {timeout_s:.0f} s and was stopped; "
                           "raise the target's timeout_s (or --timeout)")
        return remaining

    try:
        device.connect()
        check = ["fingerprint", "--require", "trtexec" if runtime == "tensorrt" else "onnxruntime",
                 "--provider", provider]
        if runtime == "tensorrt":
            check += ["--trtexec", target.trtexec or "trtexec"]
        fingerprint = device.agent(check, timeout=min(60.0, left()))["environment"]
        if runtime == "tensorrt":
            precision = precision or _precision_of(artifact)
            artifact = strongly_typed_source(artifact, precision, (fingerprint.get("libraries") or {}).get("tensorrt"))
        info = artifact_info(artifact)
        art_dir = device.remote_path("artifacts", info.hash[:32])
        copied = device.put_folder(model_files(artifact), art_dir, timeout=left())
        feeds = build_feeds(artifact.tokenizer, artifact.input_names, batch=batch, seq=seq, texts=texts)
        data, inputs_key = feeds_bytes(feeds)
        with tempfile.TemporaryDirectory(prefix="edgesmith-inputs-") as tmp:
            (Path(tmp) / "inputs.npz").write_bytes(data)
            inputs_dir = device.remote_path("inputs", inputs_key)
            device.put_folder({"inputs.npz": Path(tmp) / "inputs.npz"}, inputs_dir, timeout=left())
        if runtime == "tensorrt":
            result = _run_trtexec(device, target, artifact, info.hash, fingerprint, art_dir, inputs_dir,
                                  batch=batch, seq=seq, warmup=warmup, iterations=iterations,
                                  time_budget_s=time_budget_s, precision=precision or _precision_of(artifact),
                                  per_op=per_op, left=left)
        else:
            args = ["ort", "--model", f"{art_dir}/{artifact.path.name}", "--inputs", f"{inputs_dir}/inputs.npz",
                    "--provider", provider, "--warmup", str(warmup), "--iterations", str(iterations),
                    "--per-op-runs", str(per_op_runs if per_op else 0)]
            if threads:
                args += ["--threads", str(threads)]
            if time_budget_s is not None:
                args += ["--time-budget", str(time_budget_s)]
            result = device.agent(args, timeout=left())
    finally:
        if not keep_connection:
            device.close()
    latencies = [float(x) for x in result["latencies_ms"]]
    stats = Stats(**summarize(latencies))
    env = Environment.model_validate({**result["environment"], "threads": threads})
    options: dict[str, Any] = {"provider": provider, "threads": threads,
                               "remote": {"destination": device.destination, "cache_dir": device.cache_dir,
                                          "artifact_copied": copied, "runtime_version": result.get("runtime_version"),
                                          "agent_version": result.get("agent_version")}}
    if "engine_built" in result:
        options["remote"]["engine_built"] = result["engine_built"]
    return Profile(
        label=label or f"{artifact.name} ({runtime} on {target.name})",
        artifact=info,
        runtime=RuntimeInfo(name=runtime, providers=list(result["providers"]), options=options),
        target=target.name,
        environment=env,
        shapes=Shapes(batch=batch, seq=seq),
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        latencies_ms=latencies,
        stats=stats,
        throughput=batch * 1000.0 / stats.p50,
        peak_host_memory_mb=result.get("peak_host_memory_mb"),
        per_op=[OpTime(**op) for op in result["per_op"]] if result.get("per_op") else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def strongly_typed_source(artifact: OnnxModel, precision: str, device_tensorrt: str | None) -> OnnxModel:
    """The graph to copy to a device whose trtexec is strongly typed (TensorRT 11): an fp32 graph
    asked to build in fp16 is converted here first (edgesmith's FP16 conversion), since that
    trtexec has no --fp16; bf16 needs a bf16 graph made beforehand. Otherwise ``artifact`` itself."""
    if typing_for_version(device_tensorrt) != "strong" or not needs_conversion(precision, "strong", artifact.path):
        return artifact
    if precision == "bf16":
        raise BadInput(f"the device has TensorRT {device_tensorrt}, which builds bf16 only from a bf16 graph; "
                       "convert one with NVIDIA Model Optimizer AutoCast first, or profile with --precision fp16")
    from edgesmith.compress.quantization import QuantizePass

    log.info("device TensorRT %s is strongly typed: converting %s to fp16 before copying it", device_tensorrt,
             artifact.name)
    converted = QuantizePass(mode="fp16")(artifact)
    assert isinstance(converted, OnnxModel)
    converted.meta["precision"] = "fp16"
    return converted


def _run_trtexec(device: RemoteDevice, target, artifact: OnnxModel, artifact_hash: str, fingerprint: dict,
                 art_dir: str, inputs_dir: str, *, batch: int, seq: int, warmup: int, iterations: int,
                 time_budget_s: float | None, precision: str, per_op: bool, left: Callable[[], float]) -> dict:
    """Build (if not cached on the device) and time a TensorRT engine with trtexec; copy the engine
    back into the local cache under the same key."""
    from edgesmith.cache import default_cache_dir

    trtexec = target.trtexec or "trtexec"
    key = engine_key(artifact_hash, precision, batch, seq, fingerprint)
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
