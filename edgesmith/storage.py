"""Atomic writes and content hashes: nothing half-written is ever left where a finished file is expected."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesmith.errors import NoSpace, no_space, no_space_cause
from edgesmith.faults import point

HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{temp_owner()}-{path.name}-", suffix=".tmp", dir=path.parent)
    except PermissionError as exc:
        raise PermissionError(exc.errno, exc.strerror, str(path.parent)) from exc
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would hide the file from the user's group (a shared cache)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_no_space(exc, path)
        raise


def write_json_atomic(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def umask() -> int:
    """This process's umask (read without changing it where Linux says it; else set and put back)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def host_tag() -> str:
    """Eight hex digits naming this machine in temp names, so that a process sharing a folder over
    a network file system never takes another machine's live temp folder for a dead one's."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_owner() -> str:
    """``<pid>@<host tag>``: who owns a ``.tmp-``/``.old-`` entry (see :func:`remove_stale_temps`)."""
    return f"{os.getpid()}@{host_tag()}"


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    On any failure the temporary folder is removed and ``final`` is untouched. A process killed
    inside the block leaves only a ``.tmp-`` folder, which :func:`remove_stale_temps` clears.
    With ``replace=False`` an existing ``final`` wins, also one that another process renames into
    place while this one writes (the loser's folder is discarded).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{temp_owner()}-{final.name}-", dir=final.parent))
    except PermissionError as exc:  # name the folder the user can fix, not the temp name inside it
        raise PermissionError(exc.errno, exc.strerror, str(final.parent)) from exc
    os.chmod(tmp, 0o777 & ~umask())  # as a plain mkdir would make it, not mkdtemp's 0700
    try:
        point(f"write:{final.name}")
        yield tmp
        point(f"commit:{final.name}")
        if final.exists():
            if not replace:
                shutil.rmtree(tmp)
                return
            old = final.with_name(f".old-{temp_owner()}-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if replace or exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.exists():
                    raise
                shutil.rmtree(tmp)  # another process renamed its folder in first
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_no_space(exc, final)
        raise


def _raise_if_no_space(exc: BaseException, path: Path) -> None:
    """A full disk (or quota) under a write becomes the one-line :class:`~edgesmith.errors.NoSpace`."""
    if not isinstance(exc, NoSpace) and isinstance(exc, Exception) and no_space_cause(exc) is not None:
        raise no_space(path, exc) from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_gone(owner: str) -> bool:
    """True when ``owner`` (``<pid>@<host tag>``, see :func:`temp_owner`) is a process of this machine
    that no longer runs; False for a live one, another machine's, or an owner that does not parse."""
    pid, _, host = owner.partition("@")
    if host != host_tag() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def remove_stale_temps(folder: str | Path) -> int:
    """Remove ``.tmp-<pid>@<host>-*`` folders whose process is gone (killed runs); return how many.

    Only this machine's: a process on another machine (a folder shared over NFS) cannot be asked
    whether it still runs, so its temps stay (the step cache clears them under the step's lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, here = 0, host_tag()
    for entry in folder.iterdir():
        if entry.name.startswith((".tmp-", ".old-")):
            pid, _, host = entry.name.split("-")[1].partition("@")
            if host and host != here:
                continue
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def folder_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def link_or_copy_tree(src: str | Path, dst: str | Path) -> None:
    """Materialise ``src`` at ``dst`` with hard links where the file system allows, copies elsewhere."""
    src, dst = Path(src), Path(dst)

    def _link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=_link, dirs_exist_ok=True)
