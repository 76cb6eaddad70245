"""The `ckpt` command line: parse, call the core, render. No file-system logic here."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer

from ._app import app
from ._common import err

# registers the commands, in the order help lists them: tasks, models, trash, files, preview, look
# isort: off
try:  # Ctrl-C while the commands load (the first ~0.1 s) is said in one line, as any other time
    from . import tasks as _tasks  # noqa: F401
    from . import models as _models  # noqa: F401
    from . import trash as _trash  # noqa: F401
    from . import imports as _imports  # noqa: F401
    from . import export as _export  # noqa: F401
    from . import preview as _preview  # noqa: F401
    from . import policy as _policy  # noqa: F401
    from . import plot as _plot  # noqa: F401
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None
# isort: on

__all__ = ["app", "main"]

# Commands that run networks (long, and torch makes reference cycles): they keep the cyclic garbage collector.
_COLLECTING = frozenset({"preview", "demo", "report"})


def main() -> NoReturn:
    """Entry point of the `ckpt` script (and of `python -m ckpt`)."""
    stdout_closed = _open_closed_std_fds()
    argv = sys.argv[1:]
    if _invoked(argv) not in _COLLECTING:
        # a short command frees what it allocates by reference counting; the cyclic collector's passes over
        # everything it holds (a task's 1,000 records, say) cost it 2-8 ms and would free nothing
        gc.freeze()
        gc.disable()
    code: object = 0
    try:
        with _only_invoked(argv):
            # not standalone: a parser error comes back here, to be said in ckpt's one-line form
            code = app(standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # pragma: no cover
        err("interrupted")
        code = 130
    except Exception as e:
        code = _parser_error(e, argv)
    if stdout_closed:
        err("error: stdout was closed, so the output was lost (the command's work is done and kept)")
        code = code or 1
    _exit(code)


# Typer's own exceptions, named through its public API only: BadParameter subclasses UsageError, which
# subclasses the base of every parser error (Typer 0.26+ bundles its own Click: never `import click`).
_USAGE_ERROR = typer.BadParameter.__mro__[1]
_PARSER_ERROR = _USAGE_ERROR.__mro__[1]


def _parser_error(e: Exception, argv: list[str]) -> int:
    """A parser error (unknown option, missing argument, bad value) as one line on stderr; its exit code."""
    if not isinstance(e, _PARSER_ERROR):
        if type(e).__name__ == "Abort":  # Ctrl-D at a prompt
            err("aborted")
            return 1
        if os.environ.get("CKPT_DEBUG"):
            raise e
        if isinstance(e, OSError):  # outside a command: `--version` or help into a full stdout
            err(f"error: cannot write the output: {e.strerror or e} (stdout)")
            return 1
        err(f"internal error: {type(e).__name__}: {e} (set CKPT_DEBUG=1 for a traceback)")
        return 1
    message = e.format_message()  # type: ignore[attr-defined]
    if type(e).__name__ == "NoArgsIsHelpError":  # `ckpt` or a group without a command: its help
        sys.stderr.write(message.rstrip("\n") + "\n")
        return 2
    ctx = getattr(e, "ctx", None)  # the command the parser was in: `ckpt models show`
    if ctx is not None:
        path, root = ctx.command_path, ctx.find_root().command_path
        where = "ckpt" + path[len(root) :] + " --help"  # `python -m ckpt models show`: `ckpt models show`
    else:  # an option's value missing at the end of the line: the parser gives no context
        name = _invoked(argv)
        known = {_command_name(c) for c in app.registered_commands} | {_group_name(g) for g in app.registered_groups}
        where = f"ckpt {name} --help" if name in known else "ckpt --help"
    err(f"error: {' '.join(message.split()).rstrip('.')}; see: {where}")
    code = getattr(e, "exit_code", 2)
    return code if isinstance(code, int) else 2


def _open_closed_std_fds() -> bool:
    """Open /dev/null on each closed descriptor 0-2, so that no file ckpt opens becomes stdin, stdout or
    stderr (a manifest opened as descriptor 1 would take the output); whether stdout was closed.

    Output that cannot be encoded (a name that is not UTF-8, `PYTHONIOENCODING=ascii`) is written with
    backslash escapes rather than ending the command half-way, as stderr always does.
    """
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:  # in order: open() takes the lowest free descriptor
        got = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if got != fd:  # pragma: no cover (only if 0-2 were not the lowest free)
            os.dup2(got, fd)
            os.close(got)
    if 0 in closed:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    if 1 in closed:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    return 1 in closed


def _exit(code: object) -> NoReturn:
    """Flush stdout and stderr, then end the process at once, without the interpreter's teardown.

    The teardown frees every module and object one by one: 20-45 ms of a 150-280 ms command, and more
    the more a command read (benchmarks/README.md). Nothing ckpt needs happens in it: by the time a
    command returns it has closed its files, released its locks and joined its threads. Only the
    console script and `python -m ckpt` end this way; `app` called in a process that goes on (the
    tests, an embedding program) returns as usual. `code` is what SystemExit carries.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1, as Python does
        err(str(code))
        status = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`ckpt list | head -1`): exit 1, as inside a command
        status = status or 1
    except OSError as e:  # a full disk behind stdout (`> /dev/full`): said, not silent
        with contextlib.suppress(OSError, ValueError):
            err(f"error: cannot write the output: {e.strerror or e} (stdout); the command's work is done")
        status = status or 1
    except ValueError:
        status = status or 1
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)  # a profiler or coverage tool reports at the interpreter's exit: let it
    os._exit(status)


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
