"""Commands about the workspace and its tasks: init, tasks, list, show, finish."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._app import app
from ._common import (
    DryRunOpt,
    JsonOpt,
    again,
    command,
    err,
    fmt_metric,
    human_size,
    json_to_terminal,
    open_workspace,
    out,
    plural,
    print_json,
    print_json_pieces,
    show_plan,
    table,
)
from ._complete import tasks as complete_tasks
from ._render import (
    ROWS_FORM,
    TASKS_FORM,
    checkpoint_json,
    checkpoints_json,
    extend_rows,
    model_json,
    plain_rows,
    splice_rows,
    task_json,
    task_text,
)
from ._table import (
    ColumnsOpt,
    LimitOpt,
    WideOpt,
    check_view,
    checkpoint_columns,
    limited,
    render,
    task_columns,
)

if TYPE_CHECKING:
    from ..task_rows import CachedRows


@command(app, "init")
def init(
    path: Annotated[
        str | None,
        typer.Argument(help="Folder (or s3://bucket/prefix) to make a workspace (default: the current folder)."),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Make a workspace (a folder with ckpt.toml, or s3://bucket/prefix); an existing one is left as it is.

    Example: ckpt init runs
    """
    from ..workspace_base import Workspace

    ws = Workspace.init(path or ".")
    if json:
        print_json({"workspace": ws.location})
    else:
        out(f"workspace ready at {ws.location}")


@command(app, "tasks")
def tasks_list(
    limit: LimitOpt = None, columns: ColumnsOpt = None, wide: WideOpt = False, json: JsonOpt = False
) -> None:
    """Every task: status, number of checkpoints, size on disk, latest metrics.

    Example: ckpt -w runs tasks --json
    """
    check_view(json, columns, wide)
    ws = open_workspace()
    for name in ws.orphan_task_folders():
        err(f"warning: tasks/{name} has no task.toml, so it is no task; see: {again('doctor')}")
    if json and not json_to_terminal():
        # a script's listing: each task's row is kept as text while its manifest is unchanged
        texts, errors = ws.tasks_rendered(TASKS_FORM, task_text)
        for e in errors:
            err(f"warning: skipped a task: {e}")
        out("[" + ", ".join(limited(texts, limit)) + "]")  # what print_json writes for the rows: ", " between items
        return
    rows, errors = ws.tasks()
    for e in errors:
        err(f"warning: skipped a task: {e}")
    rows = limited(rows, limit)
    if json:
        print_json([task_json(r) for r in rows])
        return
    if not rows:
        err("no tasks yet; training scripts create them with ckpt.Workspace.create_task")
        return
    render(task_columns(rows), columns=columns, wide=wide)


_FIELDS = ("number", "step", "epoch", "size", "created")


def _sorted(t: Any, cps: list[Any], field: str, desc: bool | None) -> list[Any]:
    """`cps` ordered by `field`: a plain field ascending (or `desc`); a metric best first by its direction
    (or ascending / descending as asked). Missing and NaN values always last (ckpt.metrics.rank)."""
    from ..metrics import rank

    if field in _FIELDS:
        present = [cp for cp in cps if getattr(cp, field) is not None]
        missing = [cp for cp in cps if getattr(cp, field) is None]
        return sorted(present, key=lambda cp: getattr(cp, field), reverse=bool(desc)) + missing
    if desc is None:
        better = t.direction(field, flags="--asc or --desc")
        err(f"sorted by {field}, best first: {better.extreme} first ({better.explain()}); --asc / --desc to choose")
        minimize = better.minimize
    else:
        minimize = not desc
    ranked, missing = rank(cps, field, minimize, metrics_of=lambda cp: cp.metrics, tie=lambda cp: cp.number)
    return ranked + missing


@command(app, "list")
def list_checkpoints(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    sort: Annotated[
        str | None, typer.Option("--sort", help="Sort by a metric (or number, step, epoch, size, created).")
    ] = None,
    desc: Annotated[
        bool | None,
        typer.Option("--desc/--asc", help="Sort order (default: a metric best first, other fields ascending)."),
    ] = None,
    limit: LimitOpt = None,
    top: Annotated[
        int | None,
        typer.Option("--top", min=1, metavar="N", help="The best N by the --sort metric (best first)."),
    ] = None,
    columns: ColumnsOpt = None,
    wide: WideOpt = False,
    spark: Annotated[
        bool | None,
        typer.Option("--spark/--no-spark", help="A sparkline per metric under the table (default: at a terminal)."),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """A task's checkpoints: number, step, epoch, metrics, size, created, models made from them.

    Example: ckpt list unet --sort val_loss   (best first: a loss is better lower)

    Example: ckpt list unet --sort val_loss --top 5   (the best 5)
    """
    from ..errors import UsageError

    check_view(json, columns, wide)
    if top is not None:
        _check_top(task, sort, desc, limit)
        limit = top
    ws = open_workspace()
    t = ws.task(task)
    t.settle()  # an interrupted trash is finished or undone first, as every locking command does
    # a script's plain listing reuses the rows' text kept from the last one while the task is unchanged
    plain = json and sort is None and not desc and limit is None and not json_to_terminal()
    cached = t.cached_rows(ROWS_FORM) if plain else None
    pieces = _from_cache(cached, ws.models_of(task)) if cached is not None else None
    if cached is not None and pieces is not None:
        for number, link in cached.linked:
            err(_linked_warning(number, link))
        print_json_pieces(pieces)
        return
    cps = every = t.checkpoints
    t.refresh_cache()
    linked = t.linked(cps)
    for cp, link in linked:
        err(_linked_warning(cp.number, link))
    latest = cps[-1].number if cps else None
    models = ws.models_of(task)
    if sort is not None:
        if sort not in _FIELDS and not any(sort in cp.metrics for cp in cps):
            known = sorted({k for cp in cps for k in cp.metrics})
            raise UsageError(
                f"cannot sort by '{sort}': no checkpoint records it",
                hint=f"use one of: {', '.join([*_FIELDS, *known])}",
            )
        cps = _sorted(t, cps, sort, desc)
    elif desc:  # --desc alone: by number, newest first
        cps = cps[::-1]
    cps = limited(cps, limit)
    if json:
        rendered = _plain_rows(ws, t, cps) if plain else None
        made = rendered and splice_rows(rendered[0], [cp.number for cp in cps], rendered[1], models)
        if not rendered or not made:
            print_json(checkpoints_json(ws, t, cps, latest, models))
            return
        t.keep_rows(ROWS_FORM, cps, rendered[1], rendered[0], linked)
        print_json_pieces(made)
        return
    if not cps:
        err(f"task '{task}' has no checkpoints yet")
        return
    render(checkpoint_columns(cps, latest, models, sort), title=f"{task} ({t.status})", columns=columns, wide=wide)
    if spark or (spark is None and json_to_terminal()):  # (stdout is a terminal)
        from .plot import spark_lines

        for line in spark_lines(t, every):
            out(line)


def _check_top(task: str, sort: str | None, desc: bool | None, limit: int | None) -> None:
    """--top N is --limit N of a listing sorted best first by a metric (or in the --asc / --desc order given):
    without a metric it means nothing (exit 2)."""
    from ..errors import UsageError

    if sort is None or sort in _FIELDS:
        hint = f"e.g. ckpt list {task} --sort val_loss --top 5"
        raise UsageError("--top N needs --sort METRIC (best first)", hint=hint)
    # --asc / --desc with --top say which end is best, for a metric whose direction ckpt cannot tell
    if limit is not None:
        raise UsageError("--top N is --limit N best first: give one of them", hint="drop --limit")


def _from_cache(cached: CachedRows, models: dict[int, list[str]]) -> list[bytes | memoryview] | None:
    """`ckpt list --json`'s text from the rows the last listing kept; None if they cannot be used."""
    index = cached.index() if models else ([], [])
    return splice_rows(cached.text, *index, models) if index is not None else None


def _plain_rows(ws: Any, t: Any, cps: list[Any]) -> tuple[bytes, list[int]] | None:
    """`plain_rows` of every checkpoint; after appends, the rows kept before them are reused."""
    kept = t.rows_before_appends(ROWS_FORM)
    index = kept.index() if kept is not None else None
    grown = extend_rows(ws, t, cps, kept.text, *index) if kept is not None and index is not None else None
    return grown or plain_rows(ws, t, cps)


def _linked_warning(number: int, link: str) -> str:
    return f"warning: checkpoint {number} is reached through symlink '{link}'; ckpt never moves or deletes it"


@command(app, "show")
def show(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    number: Annotated[int, typer.Argument(help="The checkpoint number.")],
    json: JsonOpt = False,
) -> None:
    """One checkpoint in full: path, sha256, size, metrics and the tensors it holds (read without unpickling).

    Example: ckpt show unet 7 --json
    """
    from ..readcheck import check_readable
    from ..sources import inspect_checkpoint

    ws = open_workspace()
    t = ws.task(task)
    t.settle()
    cp = t.checkpoint(number)
    latest = t.latest()
    models = ws.models_of(task).get(number, [])
    check_readable(ws, t.path_of(cp), task=t.name)  # as verify: nothing is read through a symlink
    info = inspect_checkpoint(t.local_path(cp))
    data = checkpoint_json(ws, t, cp, latest is not None and latest.number == number, models)
    data["format"] = info.format
    data["parameters"] = info.parameters
    data["tensors"] = [{"name": x.name, "shape": x.shape, "dtype": x.dtype} for x in info.tensors]
    for row, x in zip(data["tensors"], info.tensors, strict=True):
        if x.shard is not None:
            row["shard"] = x.shard
        if x.split is not None:
            row["split"] = x.split
    data["tensor_bytes"] = info.bytes
    data["shards"] = info.shards
    data["layout"] = info.layout
    data["other_items"] = info.others
    data["unsafe_globals"] = info.unsafe_globals
    data["weights_under"] = info.weights_under
    data["other_tensors"] = info.other_tensors
    if json:
        print_json(data)
        return
    for key in ("number", "path", "sha256", "step", "epoch"):
        if data.get(key) is not None:
            out(f"{key:10} {data[key]}")
    out(f"{'size':10} {human_size(cp.size)} ({cp.size} bytes)")
    out(f"{'created':10} {cp.created}")
    for k, v in cp.metrics.items():
        out(f"{'metric':10} {k} = {fmt_metric(v)}")
    if models:
        out(f"{'models':10} {', '.join(models)}")
    out(f"{'format':10} {info.format}" + (f" ({info.note})" if info.note else ""))
    under = f" (under '{info.weights_under}')" if info.weights_under else ""
    out(f"{'params':10} {info.parameters:,} in {plural(len(info.tensors), 'tensor')}{under}")
    out(f"{'bytes':10} {human_size(info.bytes)} of tensors in {plural(info.shards, 'file')}")
    if info.layout:
        out(f"{'layout':10} {info.layout}")
    if info.others:
        shown = ", ".join(info.others[:8]) + (f" and {len(info.others) - 8} more" if len(info.others) > 8 else "")
        out(f"{'items':10} {shown} (not tensors)")
    if info.other_tensors:
        also = ", ".join(f"{k} {plural(n, 'tensor')}" for k, n in info.other_tensors.items())
        out(f"{'also':10} {also} (not counted as parameters)")
    if info.unsafe_globals:
        err(f"warning: loading this file needs full unpickling of: {', '.join(info.unsafe_globals)}")
    if info.tensors and info.shards > 1:
        split = any(x.split for x in info.tensors)  # DCP says how each tensor is split; shards of files do not
        table(
            ["tensor", "shape", "dtype", "file"] + (["split"] if split else []),
            [
                [x.name, "×".join(map(str, x.shape)) or "scalar", x.dtype, x.shard or ""]
                + ([x.split or ""] if split else [])
                for x in info.tensors
            ],
            whole=["shape", "dtype"],
        )
    elif info.tensors:
        table(
            ["tensor", "shape", "dtype"],
            [[x.name, "×".join(map(str, x.shape)) or "scalar", x.dtype] for x in info.tensors],
            whole=["shape", "dtype"],
        )


@command(app, "finish")
def finish(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    failed: Annotated[bool, typer.Option("--failed", help="Mark the run failed; promote nothing.")] = False,
    title: Annotated[
        str | None, typer.Option("--title", "-t", help="Title for the model (default: TASK-NUMBER).")
    ] = None,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Mark a task finished and promote its latest checkpoint to a model (or --failed: promote nothing).

    Example: ckpt finish unet --title unet-final
    """
    from ..errors import UsageError
    from ..models import finish as do_finish

    if failed and title is not None:
        raise UsageError("--title goes with a finish that promotes, not with --failed")
    ws = open_workspace()
    if dry_run:
        from ..plans import plan_finish

        show_plan(plan_finish(ws, task, failed=failed, title=title), json)
        return
    res = do_finish(ws, task, failed=failed, title=title)
    if json:
        print_json(
            {
                "task": res.task,
                "status": res.status,
                "model": model_json(ws, res.model) if res.model else None,
                "note": res.note,
            }
        )
        return
    out(f"task '{res.task}' is {res.status}: {res.note}")
