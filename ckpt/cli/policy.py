"""Commands about retention and resuming: policy set / show / unset, latest."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import typer

from ._app import app
from ._common import JsonOpt, MaxOpt, MinOpt, command, err, open_workspace, out, print_json
from ._complete import tasks as complete_tasks
from .trash import KeepBestOpt, KeepEveryOpt, KeepIntervalOpt, KeepLastOpt, MetricOpt

policy_app = typer.Typer(
    help="A retention policy, per task or the workspace default: what trash-unused (and every save) keeps.\n\n"
    "Example: ckpt policy set unet --keep-last 3 --keep-best 2 --metric val_loss",
    rich_markup_mode=None,
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")

PolicyTaskArg = Annotated[
    str | None, typer.Argument(help="The task (default: the workspace default).", autocompletion=complete_tasks)
]


def _policy_json(task: str | None, eff: Any) -> dict[str, Any]:
    from ..policy import describe, to_json

    return {"task": task, "source": eff.source, "policy": to_json(eff.rules), "summary": describe(eff.rules)}


@command(policy_app, "set")
def policy_set(
    task: PolicyTaskArg = None,
    keep_last: KeepLastOpt = 0,
    keep_best: KeepBestOpt = 0,
    metric: MetricOpt = None,
    minimize: MinOpt = False,
    maximize: MaxOpt = False,
    keep_every: KeepEveryOpt = 0,
    keep_interval: KeepIntervalOpt = None,
    json: JsonOpt = False,
) -> None:
    """Set the retention policy of TASK (or, without TASK, the workspace default), replacing the one it had.

    A checkpoint is kept when any rule keeps it; models and the latest are always kept. The metric's
    direction is decided now (--min/--max, the task, ckpt.toml [metrics], the name) and recorded; for the
    workspace default only --min/--max is recorded, else each task decides it when the policy is applied.

    Example: ckpt policy set unet --keep-last 3 --keep-best 2 --metric val_loss --keep-every 1000 --keep-interval 6h
    """
    from ..errors import UsageError
    from ..metrics import flag_mode
    from ..policy import describe, parse_interval, set_policy
    from ..trash import KeepRules

    mode = flag_mode(minimize, maximize)
    if mode is not None and not keep_best:
        raise UsageError(f"--{mode} goes with --keep-best N --metric M")
    interval = parse_interval(keep_interval) if keep_interval is not None else 0
    rules = KeepRules(keep_last, keep_best, metric, mode, keep_every, interval)
    ws = open_workspace()
    eff = set_policy(ws, task, rules)
    if json:
        print_json(_policy_json(task, eff))
        return
    where = f"task '{task}'" if task else "the workspace (default for tasks without their own)"
    out(f"policy of {where}: {describe(eff.rules)}")


@command(policy_app, "show")
def policy_show(task: PolicyTaskArg = None, json: JsonOpt = False) -> None:
    """The retention policy that applies to TASK (its own, else the workspace default), or the workspace default.

    Example: ckpt policy show unet --json
    """
    from ..policy import Effective, describe, effective, workspace_policy

    ws = open_workspace()
    if task is not None:
        eff = effective(ws, task)
        if eff.rules is not None and eff.rules.keep_best and eff.rules.metric and eff.rules.mode is None:
            # the workspace default leaves the direction to each task: show this task's
            d = ws.task(task).direction(eff.rules.metric)
            eff = Effective(replace(eff.rules, mode=d.mode), eff.source)
    else:
        rules = workspace_policy(ws)
        eff = Effective(rules, "workspace" if rules is not None else None)
    if json:
        print_json(_policy_json(task, eff))
        return
    words = {"task": "the task's own", "workspace": "the workspace default"}.get(eff.source or "", "none")
    out(describe(eff.rules))
    err(f"policy: {words}")


@command(policy_app, "unset")
def policy_unset(task: PolicyTaskArg = None, json: JsonOpt = False) -> None:
    """Remove the retention policy of TASK (it then follows the workspace default), or the workspace default.

    Example: ckpt policy unset unet
    """
    from ..policy import Effective, describe, effective, read_workspace_doc, set_policy

    ws = open_workspace()
    had = ws.task(task).header.policy is not None if task is not None else "policy" in read_workspace_doc(ws)
    set_policy(ws, task, None)
    # what applies now: a task follows the workspace default, if any
    eff = effective(ws, task) if task is not None else Effective(None, None)
    if json:
        print_json({**_policy_json(task, eff), "removed": had})
        return
    whose = f"task '{task}'" if task else "the workspace"
    out(f"removed the policy of {whose}" if had else f"{whose} had no policy of its own: nothing removed")
    if task is not None:
        now = "the workspace default" if eff.source == "workspace" else "none"
        err(f"policy now: {now}: {describe(eff.rules)}")


@command(app, "latest")
def latest(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    path: Annotated[
        bool, typer.Option("--path", help="Print only the path of its file (in a bucket: a verified local copy).")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """The latest checkpoint of TASK: its number, or with --path the file to resume from; exit 3 when none.

    Example: ckpt latest unet --path  (python train.py --resume "$(ckpt latest unet --path)")
    """
    from ..errors import CheckpointNotFound
    from ..manifest import metric_json
    from ..resume import resume_path

    ws = open_workspace()
    t = ws.task(task)
    cp = t.latest()
    if cp is None:
        trashed = _trashed_entries(ws, task)
        if trashed:
            raise CheckpointNotFound(
                f"task '{task}' has no checkpoint: its checkpoints are in the trash ({', '.join(trashed)})",
                hint=f"see: ckpt trash list; to resume from them: ckpt trash restore {trashed[-1]}",
            )
        raise CheckpointNotFound(f"task '{task}' has no checkpoint yet", hint="start from scratch")
    local = str(resume_path(t, cp)) if (path or json) else None
    if json:
        print_json(
            {
                "task": task,
                "number": cp.number,
                "step": cp.step,
                "epoch": cp.epoch,
                "metrics": {k: metric_json(v) for k, v in cp.metrics.items()},
                "file": cp.file,
                "sha256": cp.sha256,
                "size": cp.size,
                "created": cp.created,
                "path": local,
            }
        )
        return
    if path:
        out(str(local))
        return
    out(str(cp.number))


def _trashed_entries(ws: Any, task: str) -> list[str]:
    """Ids of the trash entries holding checkpoints of `task`, oldest first (none when the trash is unreadable)."""
    from ..errors import CkptError
    from ..trash import list_entries

    try:
        entries, _ = list_entries(ws)
    except CkptError:
        return []
    return [e.id for e in entries if e.kind == "checkpoints" and e.task == task and e.checkpoints]
