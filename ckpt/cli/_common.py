"""What every command shares: the workspace option, output to stdout/stderr, and the error mapping."""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar

import typer

from ..errors import CkptError, UsageError
from ._table import fmt_metric, human_size  # noqa: F401 (re-exported: every command formats with them)

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; needed without a terminal.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")]
# where a metric is chosen: its direction; without either, the task, ckpt.toml [metrics] or the name says
MinOpt = Annotated[bool, typer.Option("--min", help="Lower is better (default: as the task or metric name says).")]
MaxOpt = Annotated[bool, typer.Option("--max", help="Higher is better (default: as the task or metric name says).")]


def direction_json(d: Any) -> dict[str, Any]:
    """The `direction` and `direction_source` keys of a choice by metric (null when none was made)."""
    return d.to_json() if d is not None else {"direction": None, "direction_source": None}


class State:
    workspace: str | None = None


STATE = State()


def again(*words: str) -> str:
    """A ckpt command line to suggest, naming the workspace the way the user did (`-w`), if they did."""
    import shlex

    prefix = ["ckpt", "-w", STATE.workspace] if STATE.workspace else ["ckpt"]
    return shlex.join([*prefix, *words])


def show_plan(plan: Any, json: bool) -> None:
    """A dry run's plan (ckpt.plans.Plan): `{"dry_run": true, "would": [...]}`, or a line per change."""
    if json:
        print_json({"dry_run": True, "would": plan.would})
        return
    for line in plan.would:
        out(f"would {line}")
    if not plan.would:
        out("nothing would change")
    err("dry run: nothing was changed")


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 problem', '2 problems'."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def open_workspace() -> Any:
    from ..workspace_base import Workspace

    return Workspace.open(STATE.workspace)


class Terminated(KeyboardInterrupt):
    """SIGTERM (also SIGHUP, SIGUSR1) during a command: it unwinds as Ctrl-C does, so that what a command was
    doing is put right or left for the next one to settle (a trash undone, an export's temporary files
    removed), then exits 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM, SIGHUP (the terminal closed) and SIGUSR1 (a batch system's warning) into `Terminated`
    inside the block; only in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signums = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, n)]
    old = {n: signal.signal(n, on_term) for n in signums}
    try:
        yield
    finally:
        for n, handler in old.items():
            signal.signal(n, handler)


def handle_errors(fn: F) -> F:
    """The one place that turns exceptions into a one-line message on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminate_cleanly():
                return fn(*args, **kwargs)
        except Terminated as e:
            err("terminated")
            raise typer.Exit(128 + e.signum) from None
        except CkptError as e:
            err(f"error: {_one_line(_naming_the_workspace(e))}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except BrokenPipeError:
            raise typer.Exit(1) from None
        except OSError as e:  # the file system said no (permissions, a full or read-only disk, a file where a
            # folder belongs): not a bug in ckpt, but nothing the core turned into a CkptError either
            if os.environ.get("CKPT_DEBUG"):
                raise
            if _raised_writing_output(e):
                err(f"error: cannot write the output: {e.strerror or e} (stdout); the command's work is done")
                raise typer.Exit(1) from None
            where = f": '{e.filename}'" if e.filename else ""
            doctor = again("doctor")
            err(f"error: {e.strerror or e}{where}; check that path, and run `{doctor}` to see what is out of place")
            raise typer.Exit(1) from None
        except Exception as e:  # a bug: still one line, the traceback only on request
            if os.environ.get("CKPT_DEBUG"):
                raise
            if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore, for s3://
                err(
                    "error: no usable AWS credentials for the s3:// workspace; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for MinIO (see docs/s3.md)"
                )
                raise typer.Exit(1) from None
            if type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):  # botocore
                where = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
                err(
                    f"error: cannot reach the S3 endpoint ({where}): {e}; check the network and AWS_ENDPOINT_URL "
                    "(see docs/s3.md), then run the command again"
                )
                raise typer.Exit(1) from None
            err(f"internal error: {type(e).__name__}: {e} (set CKPT_DEBUG=1 for a traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# the commands a hint may suggest, which then name the workspace as the user did (`ckpt -w WS doctor`)
_SUGGESTED = re.compile(
    r"(?<![\w./-])ckpt (?=(doctor|models|trash|trash-unused|verify|list|policy|tasks|import|export|scan|promote|"
    r"preview|plot|show|finish|latest|du)\b)"
)


def _naming_the_workspace(e: CkptError) -> str:
    """The error's text, its hint's commands given the `-w` the user gave (else they would act elsewhere)."""
    return f"{e.message}; {naming_the_workspace(e.hint)}" if e.hint else str(e)


def naming_the_workspace(text: str) -> str:
    """`text` (a hint, a repair's action) with the ckpt commands it suggests given the `-w` the user gave."""
    if not STATE.workspace:
        return text
    import shlex

    return _SUGGESTED.sub(f"ckpt -w {shlex.quote(STATE.workspace)} ", text)


def _one_line(text: str) -> str:
    """`text` with control characters escaped: a name with a newline or an escape sequence in it (a path the
    user typed, a name read from a file) must not split the error or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _raised_writing_output(e: BaseException) -> bool:
    """Whether `e` came from writing the command's output: its innermost Python frame is in ckpt.cli (only
    the command line writes to stdout; the core's file errors are raised inside the core)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("ckpt.cli")


def command(app: typer.Typer, name: str | None = None, **kw: Any) -> Callable[[F], F]:
    """Register a command on `app` with the shared error handling."""

    def deco(fn: F) -> F:
        app.command(name, **kw)(handle_errors(fn))
        return fn

    return deco


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def print_json(data: Any) -> None:
    """JSON on stdout: indented for a person at a terminal, one line for a script.

    Indenting makes Python use its pure-Python encoder: 0.8 s for 10,000 checkpoints against 0.04 s
    for the C one (benchmarks/README.md). The separators are the same either way.
    """
    indent = 2 if json_to_terminal() else None
    sys.stdout.write(json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def print_json_pieces(pieces: Sequence[bytes | memoryview]) -> None:
    """JSON that `print_json` would write for a script (one line), already encoded to UTF-8, in pieces."""
    stream = sys.stdout
    try:
        buffer = stream.buffer if codecs.lookup(stream.encoding).name == "utf-8" else None
    except (AttributeError, LookupError, TypeError):
        buffer = None
    if buffer is None:
        stream.write(b"".join(pieces).decode("utf-8") + "\n")
        return
    stream.flush()
    for piece in pieces:
        buffer.write(piece)
    stream.write("\n")


def json_to_terminal() -> bool:
    """Whether `print_json` indents: stdout is a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    # piped output is for grep and friends: one row per line, never wrapped at 80 columns
    return Console(file=stream, highlight=False, soft_wrap=False, width=None if tty else 4096)


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str | None = None,
    right: Sequence[str] = (),
    whole: Sequence[str] = (),
    items: Sequence[str] = (),
) -> None:
    """Print a table on stdout, fitted to the terminal (`_table.render`), leftmost columns kept first.

    `right` columns, and any whose values are all numbers, are right-aligned and never cut; `whole` ones are
    never cut either; `items` ones (`k=v  k=v`) are cut between items; the others are text, cut with `…`.
    """
    from ._table import ITEMS, NUM, TEXT, WHOLE, Column, render

    cols = []
    for i, name in enumerate(columns):
        values = [r[i] for r in rows]
        numbers = all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values)
        kind = NUM if name in right or (numbers and rows) else WHOLE if name in whole else TEXT
        kind = ITEMS if name in items else kind
        cols.append(Column(name, ["" if v is None else str(v) for v in values], kind, rank=i))
    render(cols, title=title, how="a wider terminal shows them (e.g. COLUMNS=200)")  # no --columns or --wide here


def is_tty() -> bool:
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; without one (and without --yes) fail with a hint to pass --yes."""
    if yes:
        return
    if not is_tty():
        raise UsageError(f"{question.rstrip('?')}: refusing without a terminal", hint="pass --yes")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        err("aborted; nothing changed")
        raise typer.Exit(1)


def human_time(iso: str | None) -> str:
    if not iso:
        return ""
    return iso[:19].replace("T", " ")
