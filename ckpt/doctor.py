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
from typing import TYPE_CHECKING

from . import fsutil
from .backend import per_backend
from .errors import CkptError, ManifestError
from .layout import LOCK_FILE
from .manifest import TaskState, parse_task, parse_toml, salvage_task, task_bytes
from .trash import recover_workspace
from .trash_results import Repair

if TYPE_CHECKING:
    from .workspace import Task, Workspace


@per_backend
def doctor(
    ws: Workspace,
    *,
    dry_run: bool = False,
    forget_missing: bool = False,
    drop_bad_records: bool = False,
    recreate_manifests: bool = False,
) -> list[Repair]:
    """Recover interrupted operations, then check every task's records against its files; see the module.

    With `drop_bad_records`, records a manifest must not hold (see manifest.salvage_task: a path outside the
    task or to its own structure, two records of one file) are dropped, so that the task works again."""
    repairs = recover_workspace(ws, dry_run=dry_run)
    for link in ws.linked_task_folders():
        repairs.append(Repair(ws.rel(Path(str(link.path))), str(link), "left alone: replace the link by its folder"))
    for name in ws.orphan_task_folders():
        repairs.append(_orphan(ws, name, dry_run, recreate_manifests))
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
        repairs.extend(_check_task(ws, task, dry_run, forget_missing, drop_bad_records))
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


def _orphan(ws: Workspace, name: str, dry_run: bool, recreate: bool) -> Repair:
    """A task folder without its manifest: reported; with `recreate`, a new manifest makes it a task again
    (running, no records, numbers after the highest file there), whose files `scan --add` then takes in."""
    where, problem = ws.rel(ws.tasks_dir / name), "a task folder without its manifest (task.toml)"
    if not recreate:
        return Repair(where, problem, f"left alone: ckpt doctor --recreate-manifests, then ckpt scan {name} --add")
    if dry_run:
        return Repair(where, problem, f"would recreate its manifest; then: ckpt scan {name} --add")
    try:
        ws.create_task(name)
    except CkptError as e:
        return Repair(where, problem, f"left alone: {e}")
    return Repair(where, problem, f"recreated its manifest (no records yet); now: ckpt scan {name} --add")


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
    if stripped == data and _last_record_complete(data, path):
        return None  # a whole record that breaks a rule (see manifest.salvage_task) is no crash's doing
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


_RECORD_KEYS = ("number", "file", "size", "sha256", "created")


def _last_record_complete(data: bytes, path: Path) -> bool:
    """Whether `data` is TOML whose last `[[checkpoints]]` table has every key a record needs."""
    try:
        doc = parse_toml(data, path)
    except ManifestError:
        return False
    records = doc.get("checkpoints")
    if not isinstance(records, list) or not records or not isinstance(records[-1], dict):
        return False
    return all(k in records[-1] for k in _RECORD_KEYS)


def _check_task(ws: Workspace, task: Task, dry_run: bool, forget_missing: bool, drop_bad: bool = False) -> list[Repair]:
    rel = ws.rel(task.manifest)
    try:
        state = task.state()
    except ManifestError as e:
        try:
            data = fsutil.read_own(task.manifest)
        except (OSError, CkptError):
            return [Repair(rel, str(e), "left alone")]
        cut = incomplete_tail(data, task.manifest, task.name)
        if cut is None:
            return _bad_records(ws, task, data, e, dry_run, forget_missing, drop_bad)
        problem = f"its last record is incomplete ({len(data) - cut} bytes; a save cut off while appending)"
        if dry_run:
            return [Repair(rel, problem, "would cut it off")]
        with fsutil.locked(task.folder / LOCK_FILE, f"task '{task.name}'"):
            data = fsutil.read_own(task.manifest)  # again, under the lock
            cut = incomplete_tail(data, task.manifest, task.name)
            if cut is None:
                return [Repair(rel, "an incomplete last record", "left alone: it changed meanwhile")]
            # the whole manifest is replaced atomically by its valid part; the cut record's file stays
            fsutil.atomic_write(task.manifest, data[:cut])
            task._reader.forget()
        cut_off = Repair(rel, problem, "cut it off; the file it named is reported below if present")
        return [cut_off, *_check_task(ws, task, dry_run, forget_missing, drop_bad)]
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


def _bad_records(
    ws: Workspace, task: Task, data: bytes, error: ManifestError, dry_run: bool, forget_missing: bool, drop_bad: bool
) -> list[Repair]:
    """A manifest that does not parse because of records it must not hold (manifest.salvage_task): each reported,
    dropped with `drop_bad` (their files stay, reported as files without a record)."""
    rel = ws.rel(task.manifest)
    try:
        _, dropped = salvage_task(data, task.manifest, task.name)
    except ManifestError:
        dropped = []
    if not dropped:
        return [Repair(rel, str(error), "left alone: fix or restore the manifest by hand")]
    if drop_bad and not dry_run:
        with task.lock():
            # again, under the lock; the whole manifest is replaced atomically by what can stay
            state, dropped = salvage_task(fsutil.read_own(task.manifest), task.manifest, task.name)
            fsutil.atomic_write(task.manifest, task_bytes(state))
            task._reader.forget()
        action = "dropped the record (its number is not reused); its file, if any, is reported below"
    elif drop_bad:
        action = "would drop the record"
    else:
        action = "left alone: drop such records with: ckpt doctor --drop-bad-records"
    repairs = [
        Repair(rel, f"{'checkpoint ' + str(n) if n is not None else 'a record'} of task '{task.name}': {why}", action)
        for n, why in dropped
    ]
    if drop_bad and not dry_run:
        repairs += _check_task(ws, task, dry_run, forget_missing, drop_bad)
    return repairs
