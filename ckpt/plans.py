"""Dry runs: what promote, finish, models rename / remove and trash restore would do, changing nothing.

Each plan reads through the workspace's common interface (tasks, models, trash entries), so it is the
same for a folder and a bucket, and it refuses what the command would refuse, with the same error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import fsutil
from .errors import ConflictError, IntegrityError, NotFoundError
from .models import Model, PromoteResult, already_made, choose, finish_title
from .names import case_twin, check_task_name, check_title

if TYPE_CHECKING:
    from .manifest import Checkpoint
    from .task_base import Task
    from .workspace_base import Workspace


@dataclass(slots=True)
class Plan:
    """What a command would do: one line per change (empty: nothing would change)."""

    would: list[str] = field(default_factory=list)


def _planned_model(ws: Workspace, task: Task, cp: Checkpoint, title: str) -> Model:
    """The model promote would make (not written: no time, storage decided when it is made)."""
    return Model(
        title=title,
        task=task.name,
        checkpoint=cp.number,
        file=cp.file.rsplit("/", 1)[-1],
        sha256=cp.sha256,
        size=cp.size,
        created="",
        storage="",
        step=cp.step,
        epoch=cp.epoch,
        metrics=dict(cp.metrics),
        folder=ws.models_dir / title,
    )


def _check_file(ws: Workspace, task: Task, cp: Checkpoint) -> None:
    """Refuse as promote would: a checkpoint whose file is missing or reached through a link (a folder
    workspace; a bucket's promote copies on the server and finds out then)."""
    if ws.remote:
        return
    src = task.path_of(cp)
    if fsutil.symlink_on_path(task.folder, cp.file) is not None:
        raise IntegrityError(
            f"checkpoint {cp.number} of task '{task.name}' is a symlink; ckpt does not promote through links", path=src
        )
    if not (src.is_file() or src.is_dir()):
        raise IntegrityError(
            f"checkpoint {cp.number} of task '{task.name}' is missing its file {ws.rel(src)}",
            path=src,
            hint="run: ckpt doctor",
        )


def _free_title(ws: Workspace, title: str, renaming: str | None = None) -> None:
    if not ws.remote and os.path.lexists(ws.models_dir / title):
        raise ConflictError(f"model '{title}' already exists", hint="choose another title, or see: ckpt models")
    twin = case_twin(title, [t for t in ws.models.titles() if t != renaming])
    if twin is not None:
        raise ConflictError(
            f"model title '{title}' differs from model '{twin}' only in case",
            hint="titles must stay distinct on case-insensitive file systems; choose another title",
        )


def plan_promote(
    ws: Workspace, task_name: str, number: int | None, *, title: str | None, best: str | None, mode: str | None
) -> PromoteResult:
    """What `promote` would make; raises what it would raise. `unchanged`: it would make nothing."""
    if title is not None:
        check_title(title)
    check_task_name(task_name)
    task = ws.task(task_name)
    task.take_in_save()  # as the real promote's lock does first: a dry run sees what the run will see
    c = choose(ws, task, number, best, mode, title)
    if c.same is not None:
        return c.unchanged()
    _free_title(ws, c.title)
    _check_file(ws, task, c.cp)
    return PromoteResult(_planned_model(ws, task, c.cp, c.title), c.why, c.better)


def plan_finish(ws: Workspace, task_name: str, *, failed: bool, title: str | None) -> Plan:
    """What `finish` would do: the status it would set and the model it would make (if any)."""
    if title is not None:
        check_title(title)
    task = ws.task(task_name)
    status = "failed" if failed else "finished"
    plan = Plan([f"mark task '{task.name}' {status}"] if task.status != status else [])
    cp = None if failed else task.latest()
    if cp is None:
        return plan
    base = title or finish_title(task.name, cp.number)
    candidate = base
    for i in range(2, 1000):
        try:
            if already_made(ws, candidate, task.name, cp) is not None:
                return plan
        except ConflictError:  # another checkpoint's title: finish appends -2, -3...
            candidate = f"{base[: 100 - len(str(i)) - 1]}-{i}"
            continue
        _check_file(ws, task, cp)
        plan.would.append(f"promote checkpoint {cp.number} of task '{task.name}' as model '{candidate}'")
        return plan
    return plan


def plan_rename(ws: Workspace, old: str, new: str) -> Plan:
    """What `models rename` would do; raises ModelNotFound, ConflictError as it would."""
    check_title(old)
    check_title(new)
    model = ws.models[old]
    if new in ws.models:
        raise ConflictError(f"model '{new}' already exists", hint="choose another title, or see: ckpt models")
    _free_title(ws, new, renaming=old)
    return Plan([f"rename model '{model.title}' to '{new}'"])


def plan_remove(ws: Workspace, title: str) -> Plan:
    """What `models remove` would do; raises ModelNotFound as it would."""
    model = ws.models[title]
    return Plan([f"move model '{model.title}' (checkpoint {model.checkpoint} of task '{model.task}') to the trash"])


def plan_restore(ws: Workspace, entry_id: str) -> Plan:
    """What `trash restore` would do; raises NotFoundError or ConflictError as it would."""
    from .trash import list_entries
    from .trash_entry import check_entry_id

    check_entry_id(entry_id)
    entries, _ = list_entries(ws)
    entry = next((e for e in entries if e.id == entry_id), None)
    if entry is None:
        raise NotFoundError(f"no trash entry '{entry_id}'", hint="see: ckpt trash list")
    if entry.state != "complete":
        raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
    if entry.kind == "model":
        if entry.title and entry.title in ws.models:
            raise ConflictError(f"restoring trash entry '{entry_id}' would overwrite model '{entry.title}'")
        return Plan([f"restore model '{entry.title}'"])
    task = ws.task(entry.task or "")
    present = {cp.number for cp in task.checkpoints}
    back = [n for n in entry.numbers if n in present]
    if back:
        raise ConflictError(
            f"restoring trash entry '{entry_id}' would overwrite: checkpoint(s) {back} are in the manifest of "
            f"task '{task.name}' again; nothing was changed"
        )
    if not ws.remote:
        for cp in entry.checkpoints:
            if fsutil.symlink_on_path(task.folder, cp.file) is not None:
                raise IntegrityError(
                    f"restoring checkpoint {cp.number} of trash entry '{entry_id}' would go through a symlink; "
                    "ckpt never moves files through links; nothing was changed"
                )
            if os.path.lexists(task.path_of(cp)):
                raise ConflictError(
                    f"restoring trash entry '{entry_id}' would overwrite: '{ws.rel(task.path_of(cp))}' exists; "
                    "nothing was changed"
                )
    return Plan([f"restore checkpoint {n} of task '{task.name}'" for n in entry.numbers])
