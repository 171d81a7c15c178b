"""Command-line entry point: one module per command, errors rendered as one line with exit code 2."""

from __future__ import annotations

import typer

from polykv_search import __version__
from polykv_search.cli.errors import run_app

app = typer.Typer(
    name="polykv-search",
    help="Choose a KV-cache eviction policy and token budget for every layer of a causal LM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        typer.echo(f"polykv-search {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Choose a KV-cache eviction policy and token budget for every layer of a causal LM."""


# Commands register themselves on `app` when imported.
from polykv_search.cli import calibrate as _calibrate  # noqa: E402,F401
from polykv_search.cli import evaluate as _evaluate  # noqa: E402,F401
from polykv_search.cli import export as _export  # noqa: E402,F401
from polykv_search.cli import optimize as _optimize  # noqa: E402,F401
from polykv_search.cli import plan_cmds as _plan_cmds  # noqa: E402,F401
from polykv_search.cli import run as _run  # noqa: E402,F401


def main() -> None:
    run_app(app)
