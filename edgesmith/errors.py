"""The errors edgesmith raises on purpose, each with the exit code the CLI maps it to.

0 done, 1 internal fault, 2 bad input or usage, 3 a quality check failed (a gate, or the validation of an export).
"""

from __future__ import annotations

import re

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
