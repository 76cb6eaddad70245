"""Commands about models: promote, models (list, show, rename)."""

from __future__ import annotations

from typing import Annotated

import typer

from ._app import app
from ._common import (
    DryRunOpt,
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
    show_plan,
)
from ._complete import tasks as complete_tasks
from ._complete import titles as complete_titles
from ._render import model_json
from ._table import ColumnsOpt, LimitOpt, WideOpt, check_view, limited, model_columns, render

models_app = typer.Typer(
    help="The models: checkpoints promoted under a title. Without a subcommand: list them.\n\n"
    "Example: ckpt models show unet-7",
    rich_markup_mode=None,
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(models_app, name="models")


@command(app, "promote")
def promote(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    number: Annotated[int | None, typer.Argument(help="The checkpoint number (or use --best).")] = None,
    title: Annotated[
        str | None, typer.Option("--title", "-t", help="The model's title (letters, digits, - _ .); default TASK-N.")
    ] = None,
    best: Annotated[
        str | None, typer.Option("--best", help="Pick the checkpoint with the best value of this metric.")
    ] = None,
    minimize: MinOpt = False,
    maximize: MaxOpt = False,
    copy: Annotated[bool, typer.Option("--copy", help="Store a verified copy instead of a hard link.")] = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Make a named model from a checkpoint (again: no change, exit 0).

    Example: ckpt promote unet 7 --title unet-7

    Example: ckpt promote unet --best val_loss   (the lowest loss, as unet-N)
    """
    from ..errors import UsageError
    from ..metrics import flag_mode
    from ..models import promote as do_promote

    mode = flag_mode(minimize, maximize)
    if mode is not None and best is None:
        raise UsageError(f"--{mode} goes with --best METRIC", hint=f"e.g. ckpt promote {task} --best val_loss --{mode}")
    ws = open_workspace()
    if dry_run:
        from ..plans import plan_promote

        res = plan_promote(ws, task, number, title=title, best=best, mode=mode)
    else:
        res = do_promote(ws, task, number, title=title, best=best, mode=mode, copy=copy)
    if json:
        made = {**model_json(ws, res.model), "unchanged": res.unchanged, **direction_json(res.direction)}
        if dry_run and not res.unchanged:
            made.update(created=None, storage=None)  # decided when it is made
        print_json({**made, "dry_run": True} if dry_run else made)
        return
    m = res.model
    if best is not None:
        err(res.chosen_by)
    if dry_run:
        if res.unchanged:
            out(f"model '{m.title}' is already checkpoint {m.checkpoint} of task '{m.task}'; nothing would change")
        else:
            out(f"would make model '{m.title}' from checkpoint {m.checkpoint} of task '{m.task}'")
        err("dry run: nothing was changed")
        return
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
        if json or wide or limit is not None or columns is not None:  # they would be silently ignored
            err(f"error: give the options after the subcommand; e.g. ckpt models {ctx.invoked_subcommand} --json")
            raise typer.Exit(2)
        return
    _list(json, (limit, columns, wide))


@command(models_app, "list")
def models_list(
    limit: LimitOpt = None, columns: ColumnsOpt = None, wide: WideOpt = False, json: JsonOpt = False
) -> None:
    """Every model: title, task, checkpoint, metrics, size, storage, created.

    Example: ckpt models list --json
    """
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
def models_show(
    title: Annotated[str, typer.Argument(help="The model's title.", autocompletion=complete_titles)],
    json: JsonOpt = False,
) -> None:
    """One model in full: where it came from, its metrics, size and storage.

    Example: ckpt models show unet-7 --json
    """
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
    old: Annotated[str, typer.Argument(help="The current title.", autocompletion=complete_titles)],
    new: Annotated[str, typer.Argument(help="The new title.")],
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Rename a model; its source checkpoint is untouched.

    Example: ckpt models rename unet-7 unet-release
    """
    from ..models import rename

    ws = open_workspace()
    if dry_run:
        from ..plans import plan_rename

        show_plan(plan_rename(ws, old, new), json)
        return
    m = rename(ws, old, new)
    if json:
        print_json(model_json(ws, m))
    else:
        out(f"model '{old}' is now '{new}'")
