"""The content-addressed step cache.

A step's key is the SHA-256 of its input's content hash, the pass name, its resolved config and the
versions of the libraries that shape its output. ``steps/<key>/`` holds the step's artifact and
``steps/<key>.seal.json`` the SHA-256 of every file in it; the seal is written last, so an entry
counts as finished only once it is sealed, and one whose files no longer match their seal (a
flipped byte, a truncated file, an edited ``edgesmith.json``, a hard-linked copy in a run folder
edited in place) is removed and computed again, never used.

Two processes on one cache: each step runs under ``steps/<key>.lock`` (an exclusive ``flock``),
so a second process asking for a step the first is computing waits for it and then reuses it, and
nobody reads an entry while it is written or removed. The lock file is removed by its holder; one
left by a killed process holds no lock (the kernel drops a dead process's locks) and is reused and
removed by the next run. Entries are renamed into place, never replaced, so even where locks do not
reach (an NFS mount with ``nolock``, or ``local_lock=flock|all``: each machine then sees only its own
locks) a step is at worst computed twice and stored once, and an unsealed entry is never read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.errors import no_space, no_space_cause
from edgesmith.faults import point
from edgesmith.storage import (
    read_json,
    remove_stale_temps,
    sha256_file,
    sha256_json,
    temp_owner,
    umask,
    write_json_atomic,
)

log = logging.getLogger(__name__)

#: distributions whose version changes what a pass produces
KEY_PACKAGES = ("edgesmith", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                "torch-pruning")


def default_cache_dir() -> Path:
    env = os.environ.get("EDGESMITH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgesmith"


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class StepCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.steps = self.root / "steps"
        self.steps.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(self.steps)
        _remove_free_locks(self.steps)
        if removed:
            log.info("removed %d unfinished cache entr%s left by an interrupted run", removed, "y" if removed == 1 else "ies")
        self._versions = package_versions()

    def key(self, input_hash: str, pass_name: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        return sha256_json({"input": input_hash, "pass": pass_name, "config": config,
                            "versions": self._versions, "extra": extra or {}})

    def path(self, key: str) -> Path:
        return self.steps / key

    def seal_path(self, key: str) -> Path:
        return self.steps / f"{key}.seal.json"

    def lock_path(self, key: str) -> Path:
        return self.steps / f"{key}.lock"

    def has(self, key: str) -> bool:
        """True when the entry is finished (sealed); its files are checked by :meth:`verify`."""
        return self.seal_path(key).exists() and (self.path(key) / "edgesmith.json").exists()

    def scratch(self, key: str) -> Path:
        """A scratch folder for computing ``key`` (removed by the caller; by the next holder of the
        key's lock after a kill)."""
        return self.steps / f".tmp-{temp_owner()}-scratch-{key}"

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold ``key``'s lock: the one process that may compute, store, check or remove the entry.

        On entry the debris of a killed writer of this key (its temp and scratch folders, on any
        machine) and an unsealed entry are removed: nobody else can be writing them now."""
        with exclusive_lock(self.lock_path(key), on_wait):
            self._clear_debris(key)
            yield

    def _clear_debris(self, key: str) -> None:
        for entry in self.steps.iterdir():
            name = entry.name
            if name.startswith((".tmp-", ".old-")) and key in name:
                _remove(entry)
        if self.path(key).exists() and not self.seal_path(key).exists():
            log.info("removing the unfinished cache entry %s (its writer was stopped before sealing it)", key[:12])
            _remove(self.path(key))

    # -- reading and writing (call under the key's lock) -------------------------------------
    def verify(self, key: str) -> str | None:
        """None when the entry's files match its seal; else what differs, in a few words."""
        seal = read_json(self.seal_path(key))
        folder = self.path(key)
        recorded = seal.get("files") if isinstance(seal, dict) else None
        if not isinstance(recorded, dict):
            return f"its seal {self.seal_path(key)} is unreadable"
        present = _file_list(folder)
        for rel in sorted(set(recorded) | set(present)):
            if rel not in present:
                return f"{rel} is missing"
            if rel not in recorded:
                return f"{rel} was added"
            try:
                if sha256_file(folder / rel) != recorded[rel]:
                    return f"{rel} changed"
            except OSError as exc:
                return f"{rel} cannot be read ({exc.strerror or exc})"
        return None

    def usable(self, key: str, label: str = "") -> bool:
        """True when the entry is sealed and its files match the seal. An entry that fails its seal is
        removed, with a warning, and False returned: the caller computes it again, never uses it."""
        if not self.path(key).exists() and not self.seal_path(key).exists():
            return False
        problem = self.verify(key) if self.has(key) else "it was never sealed"
        if problem is None:
            return True
        log.warning("cache entry %s%s does not match its recorded hashes (%s); computing it again",
                    key[:12], f" ({label})" if label else "", problem)
        self.remove(key)
        return False

    def store(self, key: str, artifact) -> None:
        """Write ``artifact`` as the entry of ``key``: into a temp folder, renamed into place (an
        entry already there wins), then sealed."""
        stage = self.steps / f".tmp-{temp_owner()}-stage-{key}"
        try:
            stage.mkdir(parents=True, exist_ok=True)
            try:
                artifact.save(stage / "entry")
                _share_modes(stage / "entry")
                point(f"commit:{key}")
                try:
                    os.rename(stage / "entry", self.path(key))
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            point(f"seal:{key}")
            files = {rel: sha256_file(self.path(key) / rel) for rel in _file_list(self.path(key))}
            write_json_atomic(self.seal_path(key), {"key": key, "files": files})
        except Exception as exc:
            if no_space_cause(exc) is not None:  # name the cache, not a temp folder inside it
                raise no_space(self.steps, exc) from exc
            raise

    def remove(self, key: str) -> None:
        """Remove the entry (seal first: an entry without its seal is unfinished to every reader)."""
        self.seal_path(key).unlink(missing_ok=True)
        if self.path(key).exists():
            _remove(self.path(key))


def _share_modes(folder: Path) -> None:
    """Give every file and folder of an entry the modes the user's umask gives a new one: some writers
    (transformers' safetensors files, mkdtemp) make them private, which hides a shared cache's entries
    from the rest of its group."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _file_list(folder: Path) -> list[str]:
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() or f.is_symlink())


def _remove(path: Path) -> None:
    """Remove a file or folder: a folder is renamed aside first, so nobody sees it half-deleted."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".old-{temp_owner()}-{path.name}")
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_free_locks(folder: Path) -> None:
    """Remove the lock files nobody holds (left by killed processes, for steps no run has needed since)."""
    for lock in folder.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a live process computes that step
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created when missing), removed again by its holder.

    The holder unlinks the file before it lets go, so a waiter that then gets the lock checks that
    the name still leads to the file it locked, and starts again if not; a lock file left by a
    killed process is simply taken over (the kernel released its lock)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the holder removed it while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{temp_owner()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)
