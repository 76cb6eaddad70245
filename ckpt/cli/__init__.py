"""The `ckpt` command line: parse, call the core, render. No file-system logic here."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
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
    from ..fsutil import set_lock_timeout

    set_lock_timeout(wait)  # always set: in-process callers (tests) run several commands in one process


from . import imports as _imports  # noqa: E402,F401
from . import models as _models  # noqa: E402,F401
from . import preview as _preview  # noqa: E402,F401
from . import tasks as _tasks  # noqa: E402,F401  (registers commands)
from . import trash as _trash  # noqa: E402,F401


def main() -> None:
    """Entry point of the `ckpt` script."""
    try:
        with _only_invoked(sys.argv[1:]):
            app()
    except KeyboardInterrupt:  # pragma: no cover
        err("interrupted")
        sys.exit(130)


def _invoked(argv: list[str]) -> str | None:
    """The command `argv` names after the root options, or None (help, version, anything unusual)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-w", "--workspace", "--wait"):
            i += 2
        elif arg.startswith(("--workspace=", "--wait=")) or (arg.startswith("-w") and not arg.startswith("--")):
            i += 1
        else:
            return None if arg.startswith("-") else arg
    return None


@contextlib.contextmanager
def _only_invoked(argv: list[str]) -> Iterator[None]:
    """Show Typer only the command being run, for the duration of the call.

    Typer turns every registered command into a Click command (signatures, type hints) at each start,
    which costs more than a millisecond a command; `ckpt list` needs only `list`. Help, version, and
    a name that is no command (Click suggests one) get the whole app.
    """
    name = _invoked(argv)
    commands, groups = app.registered_commands, app.registered_groups
    keep_c = [c for c in commands if _command_name(c) == name]
    keep_g = [g for g in groups if _group_name(g) == name]
    if name is None or not (keep_c or keep_g):
        yield
        return
    app.registered_commands, app.registered_groups = keep_c, keep_g
    try:
        yield
    finally:
        app.registered_commands, app.registered_groups = commands, groups


def _command_name(command: typer.models.CommandInfo) -> str | None:
    if command.name:
        return command.name
    return typer.main.get_command_name(command.callback.__name__) if command.callback else None


def _group_name(group: typer.models.TyperInfo) -> str | None:
    for name in (group.name, group.typer_instance.info.name if group.typer_instance else None):
        if isinstance(name, str):
            return name
    return None
