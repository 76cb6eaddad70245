"""The `ckpt` command line: parse, call the core, render. No file-system logic here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ._common import STATE, err

app = typer.Typer(
    name="ckpt",
    help="Manage the checkpoints training runs leave behind: list, promote, preview, trash.",
    rich_markup_mode=None,  # plain help: Rich's markdown help costs start-up time (benchmarks/README.md)
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ckpt {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    workspace: Annotated[
        str | None,
        typer.Option(
            "--workspace", "-w", help="The workspace folder (else CKPT_WORKSPACE, else the nearest ckpt.toml above)."
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """ckpt: the checkpoints of your training runs, kept tidy.

    Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict, 5 busy, 6 integrity.
    """
    STATE.workspace = workspace


from . import imports as _imports  # noqa: E402,F401
from . import models as _models  # noqa: E402,F401
from . import tasks as _tasks  # noqa: E402,F401  (registers commands)
from . import trash as _trash  # noqa: E402,F401


def main() -> None:
    """Entry point of the `ckpt` script."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err("interrupted")
        sys.exit(130)
