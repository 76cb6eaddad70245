"""Commands about the trash: trash-unused, trash list / restore / empty, models remove, du, doctor."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer

from ._app import app
from ._common import (
    DryRunOpt,
    JsonOpt,
    MaxOpt,
    MinOpt,
    YesOpt,
    again,
    command,
    confirm,
    direction_json,
    err,
    human_size,
    naming_the_workspace,
    open_workspace,
    out,
    plural,
    print_json,
    show_plan,
    table,
)
from ._complete import entries as complete_entries
from ._complete import tasks as complete_tasks
from ._complete import titles as complete_titles
from ._table import ColumnsOpt, LimitOpt, WideOpt, check_view, limited, render, trash_columns
from .models import models_app

trash_app = typer.Typer(
    help="The trash bin: list, restore and empty what trash-unused and models remove moved there.\n\n"
    "Example: ckpt trash list",
    rich_markup_mode=None,
    no_args_is_help=True,
)
app.add_typer(trash_app, name="trash")

# trash-unused's options, declared once: Typer evaluates each annotation's text at every start, a name costs least
TaskArg = Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)]
KeepLastOpt = Annotated[int, typer.Option("--keep-last", min=0, help="Also keep the last N checkpoints.")]
KeepBestOpt = Annotated[int, typer.Option("--keep-best", min=0, help="Also keep the best N checkpoints by --metric.")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="The metric for --keep-best.")]
OptTaskArg = Annotated[str | None, typer.Argument(help="The task (or --all).", autocompletion=complete_tasks)]
KeepEveryOpt = Annotated[
    int, typer.Option("--keep-every", min=0, help="Also keep the first checkpoint at or after every K steps.")
]
KeepIntervalOpt = Annotated[
    str | None, typer.Option("--keep-interval", help="Also keep the latest checkpoint of each interval: 30m, 6h, 1d.")
]


def _reason(*words: Any) -> str:
    """The command line that made a trash entry, as a user would type it."""
    return shlex.join(["ckpt", *(str(w) for w in words if w is not None and w != "")])


def _numbers(numbers: list[int]) -> str:
    from ..task_base import ranges

    return ranges(numbers) if numbers else ""


@command(app, "trash-unused")
def trash_unused(
    ctx: typer.Context,
    task: OptTaskArg = None,
    every_task: Annotated[
        bool, typer.Option("--all", help="Every task, each by its retention policy; tasks without one are skipped.")
    ] = False,
    keep_last: KeepLastOpt = 0,
    keep_best: KeepBestOpt = 0,
    metric: MetricOpt = None,
    minimize: MinOpt = False,
    maximize: MaxOpt = False,
    keep_every: KeepEveryOpt = 0,
    keep_interval: KeepIntervalOpt = None,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Move every unused checkpoint of TASK to the trash, as one entry (restorable until emptied).

    Used: a model was made from it, it is the latest, or a keep rule protects it. Without keep flags the
    task's retention policy decides (ckpt policy show TASK); flags replace it for this run.

    Example: ckpt trash-unused unet --keep-best 2 --metric val_loss --dry-run
    """
    from ..errors import UsageError
    from ..metrics import flag_mode
    from ..policy import apply, parse_interval
    from ..trash import KeepRules

    mode = flag_mode(minimize, maximize)
    if mode is not None and not keep_best:
        raise UsageError(
            f"--{mode} goes with --keep-best N --metric M", hint=f"e.g. --keep-best 2 --metric val_loss --{mode}"
        )
    interval = parse_interval(keep_interval) if keep_interval is not None else 0
    # a keep flag typed as 0 is a flag too: `--keep-last 0` keeps models and the latest only, whatever the policy
    flags = bool(keep_last or keep_best or metric or keep_every or interval) or _typed(
        ctx, "keep_last", "keep_best", "keep_every"
    )
    if every_task:
        if task is not None or flags:
            raise UsageError("--all applies each task's own policy: it takes no TASK and no keep flags")
        _trash_all(dry_run, json)
        return
    if task is None:
        raise UsageError("trash-unused needs a TASK (or --all)", hint="e.g. ckpt trash-unused unet --dry-run")
    reason = _reason(
        "trash-unused",
        task,
        *(["--keep-last", keep_last] if keep_last else []),
        *(["--keep-best", keep_best] if keep_best else []),
        *(["--metric", metric] if metric else []),
        f"--{mode}" if mode else None,
        *(["--keep-every", keep_every] if keep_every else []),
        *(["--keep-interval", keep_interval] if interval else []),
    )
    rules = KeepRules(keep_last, keep_best, metric, mode, keep_every, interval) if flags else None
    ws = open_workspace()
    res, source = apply(ws, task, rules, reason=reason, dry_run=dry_run)
    _report_trash(ws, task, res, source, dry_run, json)


def _typed(ctx: typer.Context, *names: str) -> bool:
    """Whether any of these options was given on the command line (a 0 typed is told from one left out)."""
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            return True
    return False


def _policy_words(source: str | None) -> str:
    return {"task": "the task's policy", "workspace": "the workspace's policy"}.get(source or "", "")


def _trash_json(task: str, res: Any, source: str | None, dry_run: bool) -> dict[str, Any]:
    plan = res.plan
    return {
        "task": task,
        "dry_run": dry_run,
        "entry": res.entry,
        "trashed": plan.trashed,
        "kept": [{"number": d.number, "reason": d.reason} for d in plan.kept],
        "bytes_freed_on_empty": plan.bytes_freed_on_empty,
        "not_freed": plan.held.to_json() if plan.held else None,
        "rules": source if source else None,
        **direction_json(plan.direction),
    }


def _report_trash(ws: Any, task: str, res: Any, source: str | None, dry_run: bool, json: bool) -> None:
    plan = res.plan
    for w in plan.warnings:
        err(f"warning: {w}")
    if json:
        print_json(_trash_json(task, res, source, dry_run))
        return
    if source in ("task", "workspace"):
        from ..policy import describe, effective

        err(f"policy ({_policy_words(source)}): {describe(effective(ws, task).rules)}")
    if plan.direction is not None:
        d = plan.direction
        err(f"keep-best: the {d.extreme} {d.metric} is best ({d.explain()})")
    if dry_run:
        if not plan.decisions:
            err(f"task '{task}' has no checkpoints")
            return
        table(
            ["#", "action", "why", "size"],
            [[d.number, d.action, d.reason, human_size(d.size)] for d in plan.decisions],
            title=f"{task}: dry run, nothing changed",
            right=["#", "size"],
        )
        err(
            f"would move {plural(len(plan.trashed), 'checkpoint')} to the trash; emptying it would free "
            f"{human_size(plan.bytes_freed_on_empty)}"
        )
        if plan.held:
            err(f"note: {human_size(plan.held.bytes)} stay on disk: {plan.held.why}")
        return
    if res.entry is None:
        out(f"nothing to trash in task '{task}': every checkpoint is used")
        return
    out(
        f"moved {plural(len(plan.trashed), 'checkpoint')} of task '{task}' ({_numbers(plan.trashed)}) to the trash "
        f"as entry {res.entry}; emptying it frees {human_size(plan.bytes_freed_on_empty)}"
    )
    if plan.held:
        err(f"note: {human_size(plan.held.bytes)} stay on disk: {plan.held.why}")
    err(f"undo with: {again('trash', 'restore', res.entry)}")


def _trash_all(dry_run: bool, json: bool) -> None:
    import typer as _typer

    from ..policy import apply_all

    ws = open_workspace()
    outcomes = apply_all(ws, reason=_reason("trash-unused", "--all"), dry_run=dry_run)
    failed = [o for o in outcomes if o.error is not None]
    if json:
        print_json(
            {
                "dry_run": dry_run,
                "tasks": [_trash_json(o.task, o.result, o.source, dry_run) for o in outcomes if o.result is not None],
                "skipped": [{"task": o.task, "reason": o.skipped} for o in outcomes if o.skipped],
                "errors": [{"task": o.task, "error": str(o.error)} for o in failed],
            }
        )
    else:
        for o in outcomes:
            if o.result is None:
                continue
            plan = o.result.plan
            if dry_run:
                keep = ", ".join(f"{d.number} ({d.reason})" for d in plan.kept)
                out(
                    f"{o.task}: would trash {plural(len(plan.trashed), 'checkpoint')}"
                    f"{' (' + _numbers(plan.trashed) + ')' if plan.trashed else ''}, keep {keep or 'none'} "
                    f"[{_policy_words(o.source)}]"
                )
            elif o.result.entry is None:
                out(f"{o.task}: nothing to trash [{_policy_words(o.source)}]")
            else:
                out(
                    f"{o.task}: moved {plural(len(plan.trashed), 'checkpoint')} ({_numbers(plan.trashed)}) to the "
                    f"trash as entry {o.result.entry}; emptying it frees {human_size(plan.bytes_freed_on_empty)} "
                    f"[{_policy_words(o.source)}]"
                )
        skipped = [o.task for o in outcomes if o.skipped]
        if skipped:
            err(f"skipped {plural(len(skipped), 'task')} without a policy: {', '.join(skipped)} (see: ckpt policy set)")
    for o in failed:
        err(f"error: task '{o.task}': {o.error}")
    if failed:
        raise _typer.Exit(max(o.error.exit_code for o in failed if o.error is not None))


def _entry_json(e: Any) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "task": e.task,
        "checkpoints": e.numbers if e.kind == "checkpoints" else None,
        "model": e.title,
        "size": e.size,
        "bytes_freed_on_empty": e.bytes,
        "created": e.created,
        "reason": e.reason,
        "state": e.state,
    }


@command(trash_app, "list")
def trash_list(
    limit: LimitOpt = None, columns: ColumnsOpt = None, wide: WideOpt = False, json: JsonOpt = False
) -> None:
    """Every trash entry: id, task, checkpoints or model, size, created, and the command that made it.

    Example: ckpt trash list --json
    """
    from ..trash import list_entries

    check_view(json, columns, wide)
    ws = open_workspace()
    entries, errors = list_entries(ws)
    for e in errors:
        err(f"warning: skipped a trash entry: {e}")
    entries = limited(entries, limit)
    if json:
        print_json([_entry_json(e) for e in entries])
        return
    if not entries:
        err("the trash is empty")
        return
    render(trash_columns(entries, _what), columns=columns, wide=wide)


def _what(e: Any) -> str:
    return f"model {e.title}" if e.kind == "model" else f"checkpoints {_numbers(e.numbers)}"


@command(trash_app, "restore")
def trash_restore(
    entry: Annotated[
        str, typer.Argument(help="The trash entry id (see: ckpt trash list).", autocompletion=complete_entries)
    ],
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Put a trash entry's files and records back exactly as they were; refused if anything would be overwritten.

    Example: ckpt trash restore 20261204-101500-a1b2c3
    """
    from ..trash import restore

    ws = open_workspace()
    if dry_run:
        from ..plans import plan_restore

        show_plan(plan_restore(ws, entry), json)
        return
    e = restore(ws, entry).entry
    if json:
        print_json(
            {
                "entry": e.id,
                "kind": e.kind,
                "task": e.task,
                "checkpoints": e.numbers if e.kind == "checkpoints" else None,
                "model": e.title,
            }
        )
        return
    if e.kind == "model":
        out(f"restored model '{e.title}' from trash entry {e.id}")
    else:
        out(f"restored checkpoint(s) {_numbers(e.numbers)} of task '{e.task}' from trash entry {e.id}")


@command(trash_app, "empty")
def trash_empty(
    entries: Annotated[
        list[str] | None,
        typer.Argument(help="Entry ids to delete (default: every entry).", autocompletion=complete_entries),
    ] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Only entries older than this: 45s, 30m, 12h, 7d, 2w.")
    ] = None,
    auto: Annotated[
        bool,
        typer.Option("--auto", help="The oldest entries first, until ckpt.toml's [trash] max_size and max_age hold."),
    ] = False,
    yes: YesOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Delete trash entries for good: the only command that deletes checkpoint bytes. Asks first (or --yes).

    Example: ckpt trash empty --older-than 7d --yes
    """
    from ..timeutil import parse_age
    from ..trash import empty, plan_empty

    age = parse_age(older_than) if older_than is not None else None
    ws = open_workspace()
    budget: Any = None
    if auto:
        from ..budget import plan_auto
        from ..errors import UsageError

        if entries or older_than is not None:
            raise UsageError("--auto chooses the entries by the budget: it takes no ids and no --older-than")
        budget = plan_auto(ws)
        plan = budget.plan
        limits = _limits(budget.budget)
        err(
            f"trash budget {limits}: the trash would free {human_size(budget.bytes_before)}; "
            f"after this, {human_size(budget.bytes_after)}"
        )
    else:
        plan = plan_empty(ws, entries or None, age)
    for entry_id, why in plan.skipped:
        err(f"skipped {entry_id}: {why}")
    if dry_run:
        from ..plans import Plan

        would = [
            f"delete trash entry {e.id} ({human_size(e.size)}; frees about {human_size(e.bytes)})" for e in plan.entries
        ]
        if json and budget is not None:
            print_json({"dry_run": True, "would": would, **_budget_json(budget)})
            return
        show_plan(Plan(would + [f"finish deleting {p.name}" for p in plan.leftovers]), json)
        return
    if plan.entries:
        confirm(
            f"delete {plural(len(plan.entries), 'trash entry', 'trash entries')} ({human_size(plan.size)}; frees "
            f"about {human_size(sum(e.bytes for e in plan.entries))}) for good?",
            yes,
        )
    res = empty(ws, plan) if plan.entries or plan.leftovers else None
    emptied = res.emptied if res else []
    freed = res.bytes_freed if res else 0
    if json:
        print_json(
            {
                "emptied": emptied,
                "bytes_freed": freed,
                "not_freed": res.held.to_json() if res and res.held else None,
                "skipped": [{"id": i, "reason": r} for i, r in (res.skipped if res else plan.skipped)],
                **(_budget_json(budget) if budget is not None else {}),
            }
        )
        return
    if not emptied:
        out("nothing to empty" + (": the trash is within its budget" if budget is not None else ""))
        return
    out(f"deleted {plural(len(emptied), 'trash entry', 'trash entries')}; freed {human_size(freed)} ({freed} bytes)")
    if res and res.held:
        err(f"note: {human_size(res.held.bytes)} stay on disk: {res.held.why}")


def _limits(b: Any) -> str:
    parts = []
    if b.max_size is not None:
        parts.append(f"max_size {human_size(b.max_size)} ({b.max_size} bytes)")
    if b.max_age is not None:
        from ..policy import interval_text

        parts.append(f"max_age {interval_text(int(b.max_age.total_seconds()))}")
    return ", ".join(parts)


def _budget_json(auto: Any) -> dict[str, Any]:
    return {"budget": {**auto.budget.to_json(), "bytes_before": auto.bytes_before, "bytes_after": auto.bytes_after}}


@command(models_app, "remove")
def models_remove(
    title: Annotated[str, typer.Argument(help="The model's title.", autocompletion=complete_titles)],
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Move a model to the trash (restorable until emptied); its source checkpoint is untouched.

    Example: ckpt models remove unet-7
    """
    from ..trash_models import trash_model

    ws = open_workspace()
    if dry_run:
        from ..plans import plan_remove

        show_plan(plan_remove(ws, title), json)
        return
    res = trash_model(ws, title, reason=_reason("models", "remove", title))
    if json:
        print_json(
            {"entry": res.entry, "model": res.model.title, "task": res.model.task, "checkpoint": res.model.checkpoint}
        )
        return
    out(f"moved model '{title}' to the trash as entry {res.entry}")
    err(f"undo with: {again('trash', 'restore', res.entry)}")


@command(app, "du")
def du(json: JsonOpt = False) -> None:
    """Disk use of the workspace by task, models and trash; each file counted once however many links it has.

    Example: ckpt du --json
    """
    from ..trash import disk_use

    ws = open_workspace()
    use = disk_use(ws)
    if json:
        print_json(
            {
                "tasks": use.tasks,
                "by_task": use.by_task,
                "models": use.models,
                "trash": use.trash,
                "other": use.other,
                "total": use.total,
            }
        )
        return
    rows: list[list[Any]] = [[f"tasks/{name}", human_size(n)] for name, n in use.by_task.items()]
    rows += [
        ["tasks (all)", human_size(use.tasks)],
        ["models", human_size(use.models)],
        ["trash", human_size(use.trash)],
        ["other", human_size(use.other)],
        ["total", human_size(use.total)],
    ]
    table(["part", "size"], rows, right=["size"])


@command(app, "doctor")
def doctor(
    dry_run: DryRunOpt = False,
    forget_missing: Annotated[
        bool, typer.Option("--forget-missing", help="Drop the records of checkpoints whose file is gone.")
    ] = False,
    drop_bad_records: Annotated[
        bool,
        typer.Option(
            "--drop-bad-records",
            help="Drop records a manifest must not hold (a path outside the task or to its own folders, two records "
            "of one file); their files stay.",
        ),
    ] = False,
    recreate_manifests: Annotated[
        bool,
        typer.Option(
            "--recreate-manifests",
            help="Give a task folder that lost its task.toml a new one (then take its files in with scan --add).",
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Finish or undo what interrupted commands left, and check records against files.

    Trash operations, promote staging folders and temp files are recovered; an incomplete last record
    of a manifest is cut off; records without a file and files without a record are reported.

    Example: ckpt doctor --dry-run
    """
    from ..doctor import doctor as do_doctor

    ws = open_workspace()
    repairs = do_doctor(
        ws,
        dry_run=dry_run,
        forget_missing=forget_missing,
        drop_bad_records=drop_bad_records,
        recreate_manifests=recreate_manifests,
    )
    if json:
        print_json(
            {
                "dry_run": dry_run,
                "repairs": [{"path": r.path, "problem": r.problem, "action": r.action} for r in repairs],
            }
        )
        return
    if not repairs:
        out("nothing to repair")
        return
    table(["path", "problem", "action"], [[r.path, r.problem, naming_the_workspace(r.action)] for r in repairs])
