"""Commands that bring runs in and check them: import, scan, verify."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from ._app import app
from ._common import (
    DryRunOpt,
    JsonOpt,
    again,
    command,
    console,
    err,
    fmt_metric,
    human_size,
    is_tty,
    open_workspace,
    out,
    plural,
    print_json,
    show_plan,
    table,
)
from ._complete import tasks as complete_tasks
from ._render import metric_or_none


@contextlib.contextmanager
def _hashing_progress(wanted: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of bytes hashed on stderr, on a terminal only; yields the callback (or None)."""
    if not (wanted and is_tty()):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("hashing"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        job = bar.add_task("hashing", total=None)
        yield lambda n, total: bar.update(job, advance=n, total=total)


def _metrics(m: dict[str, float]) -> dict[str, float | None]:
    return {k: metric_or_none(v) for k, v in m.items()}


@command(app, "import")
def import_(
    path: Annotated[Path, typer.Argument(help="A run folder (or one checkpoint file or folder).")],
    task: Annotated[
        str | None, typer.Option("--task", help="The task to import into (default: named after the folder).")
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="auto, lightning (*.ckpt), huggingface (checkpoint-N/), files, dcp, sharded, deepspeed or composer.",
        ),
    ] = "auto",
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link the files in (the default; no bytes copied).")
    ] = False,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the files in.")] = False,
    move: Annotated[bool, typer.Option("--move", help="Move the files in (the source folder loses them).")] = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Import a Lightning, Hugging Face Trainer or plain folder of checkpoints into a task.

    Importing the same folder again adds only what is new.

    Example: ckpt import lightning_logs/version_0 --task lit
    """
    from ..errors import UsageError
    from ..importer import import_path

    if link + copy + move > 1:
        raise UsageError("give at most one of --link, --copy, --move")
    mode = "copy" if copy else "move" if move else "link"
    ws = open_workspace()
    with _hashing_progress(not json) as progress:
        res = import_path(ws, path, task=task, fmt=fmt, mode=mode, progress=progress, dry_run=dry_run)
    if json:
        print_json(
            {
                "task": res.task,
                "format": res.format,
                "mode": res.mode,
                "created_task": res.created_task,
                "added": res.added,
                "dry_run": dry_run,
                "checkpoints": [
                    {
                        "source": r.source,
                        "original_name": r.original_name,
                        "action": r.action,
                        "number": r.number,
                        "step": r.step,
                        "epoch": r.epoch,
                        "metrics": _metrics(r.metrics),
                        "size": r.size,
                        "sha256": r.sha256 or None,
                        "note": r.note,
                    }
                    for r in res.rows
                ],
            }
        )
        return
    table(
        ["#", "original name", "step", "epoch", "metrics", "size", "action", "note"],
        [
            [
                r.number,
                r.original_name,
                r.step,
                r.epoch,
                "  ".join(f"{k}={fmt_metric(v)}" for k, v in r.metrics.items()),
                human_size(r.size) if r.size else "",
                r.action,
                r.note,
            ]
            for r in res.rows
        ],
        right=["#", "step", "epoch", "size"],
        items=["metrics"],
    )
    if dry_run:
        would = sum(r.action == "would add" for r in res.rows)
        made = " (a new task)" if res.created_task else ""
        err(f"dry run: would add {plural(would, 'checkpoint')} to task '{res.task}'{made}; nothing was changed")
        return
    how = {"link": "linked", "copy": "copied", "move": "moved"}[res.mode]
    made = " (new task)" if res.created_task else ""
    err(f"{res.added} of {plural(len(res.rows), 'checkpoint')} ({res.format}) {how} into task '{res.task}'{made}")


def _unknown_json(u: Any) -> dict[str, Any]:
    return {"path": u.rel, "kind": u.kind, "size": u.size, "modified": u.modified, "addable": u.addable}


@command(app, "scan")
def scan(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    add: Annotated[
        bool, typer.Option("--add", help="Add the checkpoint files found as new checkpoints (moved into checkpoints/).")
    ] = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Files in a task folder that its manifest does not know (written by a script itself); --add takes them in.

    Example: ckpt scan unet --add
    """
    from ..errors import UsageError
    from ..importer import scan as do_scan

    if dry_run and not add:
        raise UsageError("--dry-run goes with --add (a scan alone changes nothing)")
    ws = open_workspace()
    if dry_run:
        t = ws.task(task)
        if t.status != "running":  # as the real --add refuses
            from ..errors import ConflictError

            raise ConflictError(f"task '{task}' is {t.status}; it takes no new checkpoints")
    res = do_scan(ws, task, add=add and not dry_run)
    if dry_run:
        from ..plans import Plan

        show_plan(Plan([f"add {u.rel} as a new checkpoint" for u in res.unknown if u.addable]), json)
        return
    if json:
        print_json(
            {
                "task": res.task,
                "unknown": [_unknown_json(u) for u in res.unknown],
                "temporary": [_unknown_json(u) for u in res.temporary],
                "added": [
                    {"number": cp.number, "original_name": cp.original_name, "path": f"tasks/{task}/{cp.file}"}
                    for cp in res.added
                ],
            }
        )
        return
    for cp in res.added:
        out(f"added {cp.original_name} as checkpoint {cp.number}")
    if res.unknown:
        table(
            ["unknown", "kind", "size", "modified", "addable"],
            [[u.rel, u.kind, human_size(u.size), u.modified[:19], "yes" if u.addable else "no"] for u in res.unknown],
            right=["size"],
        )
    for u in res.temporary:
        err(f"note: {u.rel} is a temporary file of an unfinished save or import")
    if not res.unknown and not res.added:
        err(f"task '{task}': every file is known to the manifest")
    elif res.unknown and not add and any(u.addable for u in res.unknown):
        err(f"add them with: {again('scan', task, '--add')}")


@command(app, "verify")
def verify(
    tasks: Annotated[
        list[str] | None, typer.Argument(help="Tasks to verify (default: all).", autocompletion=complete_tasks)
    ] = None,
    models: Annotated[bool, typer.Option("--models", help="Verify the models too.")] = False,
    json: JsonOpt = False,
) -> None:
    """Re-hash checkpoint files against their recorded sha256; report missing, changed and unknown files.

    Exits with 6 when anything is wrong.

    Example: ckpt verify unet --models
    """
    from ..verify import verify as do_verify

    ws = open_workspace()
    with _hashing_progress(not json) as progress:
        res = do_verify(ws, tasks or None, models=models, progress=progress)
    if json:
        print_json(
            {
                "ok": res.ok,
                "tasks": res.tasks,
                "models": res.models,
                "checked": res.checked,
                "files": res.files,
                "bytes": res.bytes,
                "seconds": round(res.seconds, 3),
                "problems": [
                    {
                        "kind": p.kind,
                        "path": p.path,
                        "task": p.task,
                        "number": p.number,
                        "model": p.model,
                        "expected": p.expected,
                        "actual": p.actual,
                        "note": p.note,
                    }
                    for p in res.problems
                ],
                "temporary": res.temporary,
            }
        )
    else:
        if res.problems:
            table(
                ["problem", "path", "task", "#", "model", "note"],
                [[p.kind, p.path, p.task, p.number, p.model, p.note] for p in res.problems],
            )
        rate = res.bytes / res.seconds / 2**20 if res.seconds > 0 else 0.0
        err(
            f"checked {res.checked} checkpoints and models: {plural(len(res.problems), 'problem')} "
            f"({res.files} files, {human_size(res.bytes)} hashed at {rate:.0f} MiB/s)"
        )
    if not res.ok:
        raise typer.Exit(6)
