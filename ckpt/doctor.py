"""`ckpt doctor`: recovery of interrupted operations (trash.recover_workspace) and the consistency of
records and files: a task manifest whose last record was cut short, records whose file is missing, files
no record names, models without their weights. Builds a list of Repairs; with `dry_run` changes nothing.

What it changes by default is what no user would want kept: an incomplete last `[[checkpoints]]` table
(a save cut off mid-append; its file stays, as a file no record names). Records of missing files are
only dropped with `forget_missing` (the numbers are never reused), and files without a record are only
reported: `ckpt scan TASK --add` takes them in, with what their names say.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import fsutil
from .backend import per_backend
from .errors import CkptError, ManifestError
from .manifest import TaskState, parse_task
from .trash import recover_workspace
from .trash_results import Repair
from .workspace import LOCK_FILE, Task, Workspace


@per_backend
def doctor(ws: Workspace, *, dry_run: bool = False, forget_missing: bool = False) -> list[Repair]:
    """Recover interrupted operations, then check every task's records against its files; see the module."""
    repairs = recover_workspace(ws, dry_run=dry_run)
    for name in ws.task_names():
        try:
            task = ws.task(name)
        except CkptError as problem:
            repairs.append(Repair(ws.rel(ws.tasks_dir / name), str(problem), "left alone"))
            continue
        # a killed import's staged files first: a moved file it had numbered but not recorded goes back to its
        # source rather than being reported as a file no record names; but only against a readable manifest
        readable = _readable(task)
        if readable:
            repairs.extend(task.recover_imports(dry_run=dry_run))
        repairs.extend(_check_task(ws, task, dry_run, forget_missing))
        if not readable:  # _check_task may have cut an incomplete last record off
            repairs.extend(task.recover_imports(dry_run=dry_run))
    models, errors = ws.models.read_all()
    for error in errors:
        repairs.append(Repair(ws.rel(Path(error.path)) if error.path else "models", str(error), "left alone"))
    for m in models:
        if fsutil.symlink_on_path(m.folder, m.file) is not None or not os.path.lexists(m.path):
            repairs.append(
                Repair(ws.rel(m.path), f"model '{m.title}' has no weights file", "left alone: remove or restore it")
            )
    return repairs


def _readable(task: Task) -> bool:
    try:
        task.state()
    except ManifestError:
        return False
    return True


def incomplete_tail(data: bytes, path: Path, task: str) -> int | None:
    """Where the incomplete end of a task manifest starts, or None (when the whole parses, or what is left
    by cutting at most the last record does not). Tried in order: without trailing NUL bytes (a power loss
    after the size grew), before a last line that is part of a `[[checkpoints]]` header, and before the
    last `[[checkpoints]]` table."""
    stripped = data.rstrip(b"\0")
    line = stripped.rfind(b"\n")
    cuts = [len(stripped)]
    if line >= 0 and b"[[checkpoints]]".startswith(stripped[line + 1 :]):
        cuts.append(line)
    cuts.append(stripped.rfind(b"\n[[checkpoints]]"))
    for cut in cuts:
        if 0 < cut < len(data):
            try:
                parse_task(data[:cut], path, task)
            except ManifestError:
                continue
            return cut
    return None


def _check_task(ws: Workspace, task: Task, dry_run: bool, forget_missing: bool) -> list[Repair]:
    rel = ws.rel(task.manifest)
    try:
        state = task.state()
    except ManifestError as e:
        try:
            data = task.manifest.read_bytes()
        except OSError:
            return [Repair(rel, str(e), "left alone")]
        cut = incomplete_tail(data, task.manifest, task.name)
        if cut is None:
            return [Repair(rel, str(e), "left alone: fix or restore the manifest by hand")]
        problem = f"its last record is incomplete ({len(data) - cut} bytes; a save cut off while appending)"
        if dry_run:
            return [Repair(rel, problem, "would cut it off")]
        with fsutil.locked(task.folder / LOCK_FILE, f"task '{task.name}'"):
            data = task.manifest.read_bytes()  # again, under the lock
            cut = incomplete_tail(data, task.manifest, task.name)
            if cut is None:
                return [Repair(rel, "an incomplete last record", "left alone: it changed meanwhile")]
            # the whole manifest is replaced atomically by its valid part; the cut record's file stays
            fsutil.atomic_write(task.manifest, data[:cut])
            task._reader.forget()
        cut_off = Repair(rel, problem, "cut it off; the file it named is reported below if present")
        return [cut_off, *_check_task(ws, task, dry_run, forget_missing)]
    repairs: list[Repair] = []
    missing = [cp for cp in state.checkpoints.values() if not os.path.lexists(task.path_of(cp))]
    if missing:
        if forget_missing and not dry_run:
            with task.lock():
                state = task.state()
                gone = {cp.number for cp in state.checkpoints.values() if not os.path.lexists(task.path_of(cp))}
                kept = {n: cp for n, cp in state.checkpoints.items() if n not in gone}
                # last_number keeps the highest number: a forgotten number is never given to a new checkpoint
                task._rewrite(TaskState(replace(state.header, last_number=state.max_number), kept))
            action = "forgot the record (its number is not reused)"
        elif forget_missing:
            action = "would forget the record"
        else:
            action = "left alone: put the file back, or forget the record with: ckpt doctor --forget-missing"
        for cp in sorted(missing, key=lambda c: c.number):
            repairs.append(
                Repair(ws.rel(task.path_of(cp)), f"checkpoint {cp.number} of task '{task.name}' has no file", action)
            )
    from .importer import scan

    try:
        found = scan(ws, task.name)
    except (CkptError, OSError) as e:
        return [*repairs, Repair(ws.rel(task.folder), f"cannot scan the task folder: {e}", "left alone")]
    for u in found.unknown:
        how = f"ckpt scan {task.name} --add" if u.addable else "move it out of the task folder"
        repairs.append(Repair(u.rel, f"a {u.kind} no record of task '{task.name}' names", f"left alone: {how}"))
    return repairs
