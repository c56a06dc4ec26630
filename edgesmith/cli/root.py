"""The ``edgesmith`` typer app and its global options; every command module adds its commands to
this ``app``, and :mod:`edgesmith.cli.app` imports them all (registration flows down)."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler

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
