"""The ``edgesmith`` command: imports every command module onto the app (:mod:`edgesmith.cli.root`),
and maps errors to exit codes.

Exit codes: 0 done, 1 internal fault, 2 bad input or usage, 3 a quality check failed.
A bad input prints one line naming what is wrong and how to fix it; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from edgesmith.cli.root import app, err_console
from edgesmith.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EdgesmithError,
    NoSpace,
    file_system_error,
    first_line,
    no_space,
    no_space_cause,
)


def _register_commands() -> None:
    from edgesmith.cli import (  # noqa: F401
        devices,
        distill,
        doctor,
        early_exit,
        evaluate,
        generate,
        models,
        passes,
        profiles,
        run,
        speculate,
        sweep,
    )


def _is_a(exc: BaseException, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(exc).__mro__)


def _no_space(exc: BaseException) -> EdgesmithError:
    """The one line of a full disk met by a writer that did not say what it wrote: the failing file
    when the OSError names it, else the places edgesmith writes to."""
    cause = no_space_cause(exc)
    if cause is not None and cause.filename:
        return no_space(None, exc)
    from edgesmith.cache import default_cache_dir

    return no_space(f"the cache ({default_cache_dir()}) or the output folder", exc)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    # No process-wide threading variable is set here: each runtime runs with its own defaults (or
    # what the user set). OMP_WAIT_POLICY=PASSIVE, set here until issue 23, made llama.cpp 3.5x
    # slower in every command; profiles now run each runtime in a worker process of its own
    # (edgesmith.profiling.worker).
    _register_commands()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = app(args=args, prog_name="edgesmith", standalone_mode=False)
    except EdgesmithError as exc:
        if not isinstance(exc, NoSpace) and no_space_cause(exc) is not None:
            exc = _no_space(exc)  # a full disk under any message: say that, not the step's hint
        if debug:
            err_console.print_exception()
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # an internal fault: say so, keep the traceback for --debug
        if _is_a(exc, "UsageError"):  # typer carries its own copy of click: match by class name
            exc.show()  # type: ignore[attr-defined]
            sys.exit(EXIT_BAD_INPUT)
        if _is_a(exc, "Abort"):
            err_console.print("aborted")
            sys.exit(EXIT_INTERNAL)
        # a full disk, a file in the way of a folder, no permission: the user's to fix, whichever writer met it
        mapped = _no_space(exc) if no_space_cause(exc) is not None else file_system_error(exc)
        if mapped is not None:
            if debug:
                err_console.print_exception()
            err_console.print(f"[red]error:[/] {escape(str(mapped))}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_BAD_INPUT)
        if debug:
            err_console.print_exception()
        err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)
