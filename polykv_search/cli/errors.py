"""Turns exceptions into one line with a hint and exit code 2; the traceback only with POLYKV_DEBUG=1."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from polykv_search.errors import PolykvError

# Tables are wide (a column per signal); when stderr is not a terminal, do not squeeze them into 80 columns.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)


def debug_enabled() -> bool:
    return os.environ.get("POLYKV_DEBUG", "") not in ("", "0")


HOLD = "polykv_hold"  # a record with this extra set (the device line, a data warning) waits for work to start


class HoldingHandler(logging.Handler):
    """Passes records to `inner`, except those flagged HOLD (the device a model loaded on, a warning about the data
    read before the model loads): they wait for the next record, the first progress line or a successful end, and
    a refusal drops them, so bad input stays one line."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__()
        self.inner = inner
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, HOLD, False):
            self.held.append(record)
            return
        self.say_held()
        self.inner.handle(record)

    def say_held(self) -> None:  # not `release`: logging.Handler's lock method has that name
        held, self.held = self.held, []
        for record in held:
            self.inner.handle(record)


_holding: HoldingHandler | None = None


def release_held() -> None:
    """Say the held records now (work starts: a progress line, or the command's end)."""
    if _holding is not None:
        _holding.say_held()


def _log_handler() -> logging.Handler:
    """Rich's handler on a terminal; elsewhere (a batch job, a pipe, CI) a plain one, so each record stays on one
    physical line that grep and log readers can take whole (rich wraps at the console's width)."""
    if err_console.is_terminal:
        return RichHandler(console=err_console, show_path=False, show_time=False)
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    return plain


def setup_logging(verbose: bool = False) -> None:
    global _holding
    level = logging.DEBUG if debug_enabled() else (logging.INFO if verbose else logging.WARNING)
    _holding = HoldingHandler(_log_handler())
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[_holding],
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
        code = app(standalone_mode=False)
    except PolykvError as exc:
        _fail(f"error: {exc}", exc)
    except KeyboardInterrupt:
        _fail(INTERRUPTED, None, code=130)
    except Exception as exc:  # noqa: BLE001 (sorted by kind below; anything else is a bug)
        kind = click_kind(exc)
        if kind == "abort":  # click turns Ctrl-C into Abort
            _fail(INTERRUPTED, None, code=130)
        elif kind == "exit":
            sys.exit(exc.exit_code)
        elif kind == "help":  # no arguments: the help, as a usage error
            exc.show()
            sys.exit(2)
        elif kind == "usage":  # a bad option value, a missing option, an unknown command
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            _fail(f"error: {exc.format_message()}{where}", exc)
        else:  # an unexpected failure is a bug: still one line unless debugging
            _fail(f"internal error: {type(exc).__name__}: {exc} (set POLYKV_DEBUG=1 for the traceback)", exc,
                  code=1)
    release_held()
    if code == 130:  # typer turns Ctrl-C into Exit(130), which a non-standalone app returns
        _fail(INTERRUPTED, None, code=130)
    if isinstance(code, int) and code != 0:  # a command's own exit code; success returns (tests call main())
        sys.exit(code)


INTERRUPTED = "interrupted; re-run with --resume to continue from the last checkpoint"


def click_kind(exc: BaseException) -> str | None:
    """What a click exception means, by its class names: typer vendors its own copy of click, whose classes are not
    click's, so they are recognised by name (the same names in both)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "Abort" in names:
        return "abort"
    if "Exit" in names and hasattr(exc, "exit_code"):
        return "exit"
    if "NoArgsIsHelpError" in names:
        return "help"
    if "ClickException" in names:
        return "usage"
    return None


def _fail(message: str, exc: BaseException | None, *, code: int = 2) -> None:
    if _holding is not None:
        _holding.held.clear()  # a refusal is one line: what was held back is not said
    if debug_enabled() and exc is not None:
        err_console.print_exception()
    err_console.print(message, style="bold red", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)
