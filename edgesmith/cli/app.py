"""The ``edgesmith`` command: typer app, global options, and the mapping of errors to exit codes.

Exit codes: 0 done, 1 internal fault, 2 bad input or usage, 3 a quality check failed.
A bad input prints one line naming what is wrong and how to fix it; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.logging import RichHandler

from edgesmith.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EdgesmithError

app = typer.Typer(
    name="edgesmith",
    help="Make trained transformers small and fast enough to deploy, and prove it by measurement.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
            verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs.")) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
                        force=True)
    if not debug:
        # the libraries below are chatty at import and export time
        for noisy in ("transformers", "torch", "onnxscript", "onnx_ir", "torch.onnx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: edgesmith shows its own progress


def _register_commands() -> None:
    from edgesmith.cli import devices, distill, doctor, models, passes, profiles, run  # noqa: F401
    from edgesmith.cli import sweep  # noqa: F401
    from edgesmith.cli import early_exit  # noqa: F401


def _is_a(exc: BaseException, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(exc).__mro__)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_commands()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = app(args=args, prog_name="edgesmith", standalone_mode=False)
    except EdgesmithError as exc:
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
        if debug:
            err_console.print_exception()
        first = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)
