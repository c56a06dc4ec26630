"""The connection to a device the user's own ``ssh`` reaches, and its one-line errors.

edgesmith drives the system's OpenSSH client (so the user's keys, agent, ``~/.ssh/config``,
ProxyJump all work), always with ``BatchMode=yes`` (never a prompt), ``StrictHostKeyChecking=yes``
(a host key is never accepted on the user's behalf) and a connection timeout, and shares one
connection between its commands (ControlMaster/ControlPersist). Every argument reaching the
remote shell is quoted.

:class:`RemoteDevice` runs commands, keeps the device's cache folder (copies that are complete or
absent, never half done) and runs the single-file agent (:mod:`edgesmith.profiling.agent`, sent over
stdin). What to copy and run for a profile is :mod:`edgesmith.profiling.remote`'s business.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from edgesmith.errors import BadInput

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
