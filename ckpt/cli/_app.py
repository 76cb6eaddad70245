"""The Typer application and its root options; the command modules register on it (ckpt.cli imports them)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ._common import STATE

app = typer.Typer(
    name="ckpt",
    help="Manage the checkpoints training runs leave behind: list, promote, preview, trash.",
    # plain help: Rich's help (panels) made `ckpt --help` 2.4x `import typer, rich` against 1.7x plain
    # (benchmarks/README.md); the groups are named in the epilog instead
    rich_markup_mode=None,
    epilog="Commands by group, in the order you meet them. Tasks: init, tasks, list, show, finish. "
    "Models: promote, models. Trash: trash-unused, trash, du, doctor. Retention: policy, latest. "
    "Files: import, scan, verify, export. Preview: preview, demo. Look: plot, report. "
    "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict, 5 busy, 6 integrity.",
    add_completion=True,
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
            "--workspace",
            "-w",
            help="The workspace folder or s3://bucket/prefix (else CKPT_WORKSPACE, else the nearest ckpt.toml above).",
        ),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            min=0,
            metavar="SECONDS",
            help="Wait this long for a lock another ckpt holds, then exit 5 (else CKPT_LOCK_TIMEOUT, else 30).",
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
    from ..locks import set_lock_timeout

    set_lock_timeout(wait)  # always set: in-process callers (tests) run several commands in one process
