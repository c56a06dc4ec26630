"""The errors edgesmith raises on purpose, each with the exit code the CLI maps it to.

0 done, 1 internal fault, 2 bad input or usage, 3 a quality check failed (a gate, or the validation of an export).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class EdgesmithError(Exception):
    """A fault with a message meant for the user (one line: what is wrong, how to fix it)."""

    exit_code = EXIT_INTERNAL


class BadInput(EdgesmithError):
    """The user's input (a recipe, a file, an option, a device) is wrong."""

    exit_code = EXIT_BAD_INPUT


class NoSpace(BadInput):
    """A write failed because the disk (or the user's quota) is full: the user's to fix, exit 2."""


class ValidationFailed(EdgesmithError):
    """An exported or transformed model disagrees with its source beyond the tolerance.

    A failed quality check like a gate: exit 3, and the artifact is never written."""

    exit_code = EXIT_GATE_FAILED


class GateFailed(EdgesmithError):
    """A quality gate did not hold; nothing is promoted as deployable."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, failures: list[dict] | None = None):
        super().__init__(message)
        self.failures = failures or []


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (ANSI colours removed), or its type's name when the
    message is empty: safe on every exception, for one-line error messages."""
    text = _ANSI.sub("", str(exc)).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:limit]


#: errno values of a full disk or an exhausted quota
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: how Rust's std::io::Error shows an errno inside another library's message
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def no_space_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself, its causes and contexts, or an entry of a
    ``shutil.copytree`` error list), or None when the disk is not what failed."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return current
        rust = _RUST_OS_ERROR.search(str(current))  # safetensors and tokenizers (Rust) say "(os error 28)"
        if rust and int(rust.group(1)) in NO_SPACE_ERRNOS:
            return OSError(int(rust.group(1)), first_line(current))
        if isinstance(current, OSError) and current.args and isinstance(current.args[0], list):
            for entry in current.args[0]:  # shutil.Error: [(src, dst, "why"), ...]
                why = str(entry[-1]) if isinstance(entry, tuple) and entry else str(entry)
                for code in NO_SPACE_ERRNOS:
                    if f"[Errno {code}]" in why:
                        dst = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else None
                        return OSError(code, why, dst)
        todo.extend([current.__cause__, current.__context__])
    return None


def no_space(path: str | Path | None, exc: BaseException | None = None) -> NoSpace:
    """The one-line error of a full disk while writing ``path`` (the failing file when ``path`` is None)."""
    cause = no_space_cause(exc) if exc is not None else None
    where = path if path is not None else (cause.filename if cause is not None and cause.filename else None)
    what = "quota exceeded" if cause is not None and cause.errno == errno.EDQUOT else "no space left on device"
    return NoSpace(f"{what} writing {where or 'the cache or output folder'}; free space or point "
                   "EDGESMITH_CACHE / -o elsewhere")


def is_safetensors_error(exc: BaseException) -> bool:
    """True for safetensors' own error, matched by name (no import needed): the Rust library raises
    every damaged-file case (header too small or too large, invalid header length or JSON, bad
    offsets, unknown dtype) as one ``SafetensorError``."""
    return any(cls.__name__ == "SafetensorError" for cls in type(exc).__mro__)


def bad_safetensors(path: str | Path, exc: BaseException) -> BadInput:
    return BadInput(f"{path}: not a valid safetensors file ({first_line(exc, 160)}); re-save the model")


def dangling_link(path: str | Path) -> BadInput | None:
    """The error for ``path`` when it is a symbolic link that leads nowhere (a loop, or a missing
    target), else None: such a path "does not exist", and saying only that would mislead."""
    path = Path(path)
    try:
        if not path.is_symlink():
            return None
        path.stat()
    except OSError as exc:
        return BadInput(f"{path}: a symbolic link that leads nowhere ({exc.strerror or first_line(exc)}); "
                        "point it at the real file or replace it")
    return None


def file_system_error(exc: BaseException) -> BadInput | None:
    """A file-system refusal on a path the user gave (a file where a folder is needed or the
    reverse, no permission) as one line naming the path; None for anything else."""
    if not isinstance(exc, OSError) or not exc.filename:
        return None
    path = exc.filename
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        blocker = Path(path)
        while not blocker.is_file() and blocker.parent != blocker:  # the file that stands where a folder must be
            blocker = blocker.parent
        where = blocker if blocker.is_file() else path
        return BadInput(f"{where}: a file is in the way where a folder is needed; move it or choose another path")
    if isinstance(exc, IsADirectoryError):
        return BadInput(f"{path}: is a folder where a file is needed; give a file path")
    if isinstance(exc, PermissionError):
        return BadInput(f"{path}: permission denied; make it writable (or readable) or choose another path")
    return None
