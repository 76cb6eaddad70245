"""Commands about models: promote, models (list, show, rename)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from ._common import (
    JsonOpt,
    MaxOpt,
    MinOpt,
    command,
    direction_json,
    err,
    fmt_metric,
    human_size,
    open_workspace,
    out,
    print_json,
)
from ._render import model_json
from ._table import ColumnsOpt, LimitOpt, WideOpt, check_view, limited, model_columns, render

models_app = typer.Typer(
    help="The models: checkpoints promoted under a title. Without a subcommand: list them.",
    rich_markup_mode=None,
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(models_app, name="models")


@command(app, "promote")
def promote(
    task: Annotated[str, typer.Argument(help="The task.")],
    number: Annotated[int | None, typer.Argument(help="The checkpoint number (or use --best).")] = None,
    title: Annotated[
        str, typer.Option("--title", "-t", help="The model's title (letters, digits, - _ .); default TASK-N.")
    ] = "",
    best: Annotated[
        str | None, typer.Option("--best", help="Pick the checkpoint with the best value of this metric.")
    ] = None,
    minimize: MinOpt = False,
    maximize: MaxOpt = False,
    copy: Annotated[bool, typer.Option("--copy", help="Store a verified copy instead of a hard link.")] = False,
    json: JsonOpt = False,
) -> None:
    """Make a named model from a checkpoint: ckpt promote TASK 7 --title unet-7 (again: no change, exit 0)."""
    from ..errors import UsageError
    from ..metrics import flag_mode
    from ..models import promote as do_promote

    mode = flag_mode(minimize, maximize)
    if mode is not None and best is None:
        raise UsageError(f"--{mode} goes with --best METRIC", hint=f"e.g. ckpt promote {task} --best val_loss --{mode}")
    ws = open_workspace()
    res = do_promote(ws, task, number, title=title or None, best=best, mode=mode, copy=copy)
    if json:
        print_json({**model_json(ws, res.model), "unchanged": res.unchanged, **direction_json(res.direction)})
        return
    m = res.model
    if best is not None:
        err(res.chosen_by)
    if res.unchanged:
        out(f"model '{m.title}' is already checkpoint {m.checkpoint} of task '{m.task}'; nothing changed")
        return
    out(f"model '{m.title}' from checkpoint {m.checkpoint} of task '{m.task}' ({m.storage}, {human_size(m.size)})")


def _render_models(models: list, json: bool, view: tuple[int | None, str | None, bool]) -> None:  # type: ignore[type-arg]
    limit, columns, wide = view
    models = limited(models, limit)
    ws = open_workspace()
    if json:
        print_json([model_json(ws, m) for m in models])
        return
    if not models:
        err("no models yet; make one with: ckpt promote TASK N --title TITLE")
        return
    render(model_columns(models), columns=columns, wide=wide)


@models_app.callback()
def models_default(
    ctx: typer.Context,
    limit: LimitOpt = None,
    columns: ColumnsOpt = None,
    wide: WideOpt = False,
    json: JsonOpt = False,
) -> None:
    """Every model: title, task, checkpoint, metrics, size, storage, created."""
    if ctx.invoked_subcommand is not None:
        return
    _list(json, (limit, columns, wide))


@command(models_app, "list")
def models_list(
    limit: LimitOpt = None, columns: ColumnsOpt = None, wide: WideOpt = False, json: JsonOpt = False
) -> None:
    """Every model: title, task, checkpoint, metrics, size, storage, created."""
    _list(json, (limit, columns, wide))


def _list(json: bool, view: tuple[int | None, str | None, bool]) -> None:
    from ._common import handle_errors

    @handle_errors
    def run() -> None:
        check_view(json, view[1], view[2])
        ws = open_workspace()
        models, errors = ws.models.read_all()
        for e in errors:
            err(f"warning: skipped a model: {e}")
        _render_models(models, json, view)

    run()


@command(models_app, "show")
def models_show(title: Annotated[str, typer.Argument(help="The model's title.")], json: JsonOpt = False) -> None:
    """One model in full."""
    ws = open_workspace()
    m = ws.models[title]
    data = model_json(ws, m)
    if json:
        print_json(data)
        return
    for k, v in data.items():
        if k == "metrics":
            for mk, mv in m.metrics.items():
                out(f"{'metric':10} {mk} = {fmt_metric(mv)}")
        elif v is not None:
            out(f"{k:10} {v}")


@command(models_app, "rename")
def models_rename(
    old: Annotated[str, typer.Argument(help="The current title.")],
    new: Annotated[str, typer.Argument(help="The new title.")],
    json: JsonOpt = False,
) -> None:
    """Rename a model; its source checkpoint is untouched."""
    from ..models import rename

    ws = open_workspace()
    m = rename(ws, old, new)
    if json:
        print_json(model_json(ws, m))
    else:
        out(f"model '{old}' is now '{new}'")
