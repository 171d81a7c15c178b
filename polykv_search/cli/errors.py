"""Turns exceptions into one line with a hint and exit code 2; the traceback only with POLYKV_DEBUG=1."""

from __future__ import annotations

import logging
import os
import sys

import click
import typer
from rich.console import Console
from rich.logging import RichHandler

from polykv_search.errors import PolykvError

# Tables are wide (a column per signal); when stderr is not a terminal, do not squeeze them into 80 columns.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)


def debug_enabled() -> bool:
    return os.environ.get("POLYKV_DEBUG", "") not in ("", "0")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if debug_enabled() else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("polykv_search").setLevel(min(level, logging.INFO))
    for noisy in ("transformers", "kvpress", "datasets", "accelerate", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # the libraries' own progress bars and advice would drown ours; they read these when first imported (set here,
    # not by importing them: transformers alone takes 1.5 s to import, which --help and validate do not need)
    for name, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("DATASETS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    # imported here only when a caller already loaded them: then the variables above came too late
    if "datasets" in sys.modules:
        import datasets.utils.logging as ds_logging

        ds_logging.disable_progress_bar()
        ds_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        import transformers.utils.logging as tf_logging

        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()


def run_app(app: typer.Typer) -> None:
    setup_logging()
    try:
        app(standalone_mode=False)
    except PolykvError as exc:
        _fail(f"error: {exc}", exc)
    except click.exceptions.Abort:
        _fail("aborted", None, code=130)
    except click.ClickException as exc:  # bad option values, unknown commands
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        _fail("interrupted; re-run with --resume to continue from the last checkpoint", None, code=130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected failure is a bug: still one line unless debugging
        _fail(f"internal error: {type(exc).__name__}: {exc} (set POLYKV_DEBUG=1 for the traceback)", exc, code=1)


def _fail(message: str, exc: BaseException | None, *, code: int = 2) -> None:
    if debug_enabled() and exc is not None:
        err_console.print_exception()
    err_console.print(message, style="bold red", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)
