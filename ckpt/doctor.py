"""`ckpt doctor`, written once for every store: what interrupted commands left (ckpt.trash.recover_trash, and
each store's own leftovers), then every task's records against its files, and every model's weights.
Builds a list of Repairs; with `dry_run` changes nothing.

What it changes by default is what no user would want kept: an incomplete last record (a save cut off
mid-append; its file stays, as a file no record names), stale temporary files and staging folders, and
trash operations finished or undone. Records of missing files are only dropped with `forget_missing` (the
numbers are never reused), and files without a record are only reported: `ckpt scan TASK --add` takes
them in, with what their names say.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CkptError, ManifestError, NotFoundError
from .manifest import TaskState
from .trash import recover_trash
from .trash_entry import read_entry
from .trash_plan import locate
from .trash_results import Repair

if TYPE_CHECKING:
    from .task_base import Task
    from .workspace_base import Workspace


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
    repairs = recover_trash(ws, dry_run=dry_run) + ws.leftovers(dry_run=dry_run)
    # on a dry run the interrupted trashes are still there: their checkpoints' files are in the trash, and are
    # not reported missing (the real run puts them back, or finishes the trash)
    in_flight = _in_flight(ws) if dry_run else {}
    for link in ws.linked_task_folders():
        repairs.append(Repair(ws.rel(Path(str(link.path))), str(link), "left alone: replace the link by its folder"))
    for name in ws.orphan_task_folders():
        orphan = _orphan(ws, name, dry_run, recreate_manifests)
        if orphan is not None:
            repairs.append(orphan)
    for name in ws.task_names():
        try:
            task = ws.task(name)
        except ManifestError as problem:  # a store that reads the manifest to open the task
            mended, again = ws.mend(name, problem, dry_run=dry_run, drop_bad=drop_bad_records)
            repairs += mended
            if not again:
                continue
            task = ws.task(name)
        except CkptError as problem:
            repairs.append(Repair(ws.rel(ws.tasks_dir / name), str(problem), "left alone"))
            continue
        # a killed import's staged files first: a moved file it had numbered but not recorded goes back to its
        # source rather than being reported as a file no record names; but only against a readable manifest
        readable = _readable(task)
        if readable:
            repairs.extend(task.recover_imports(dry_run=dry_run))
        repairs.extend(_check_task(ws, task, dry_run, forget_missing, drop_bad_records, in_flight.get(name, set())))
        if not readable:  # _check_task may have mended the manifest
            repairs.extend(task.recover_imports(dry_run=dry_run))
    models, errors = ws.models.read_all()
    for error in errors:
        repairs.append(Repair(ws.rel(Path(error.path)) if error.path else "models", str(error), "left alone"))
    for m in models:
        key = ws.rel(m.path)
        if not ws.storage.exists(key):
            repairs.append(Repair(key, f"model '{m.title}' has no weights file", "left alone: remove or restore it"))
    return repairs


def _orphan(ws: Workspace, name: str, dry_run: bool, recreate: bool) -> Repair | None:
    """A task folder without its manifest: reported; with `recreate`, a new manifest makes it a task again
    (running, no records, numbers after the highest file there), whose files `scan --add` then takes in.
    None when it was a creation still running, which has since written its manifest."""
    where, problem = ws.rel(ws.tasks_dir / name), "a task folder without its manifest (task.toml)"
    if ws.remove_unfinished_task(name, dry_run=dry_run):
        problem = "a task folder whose creation stopped before its manifest (nothing in it)"
        return Repair(where, problem, "would remove it" if dry_run else "removed")
    if name in ws.task_names():  # a creation that was under way (remove_unfinished_task waited for it)
        return None
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


def _in_flight(ws: Workspace) -> dict[str, set[int]]:
    """The checkpoint numbers of each task that trash entries not yet complete hold (read, never settled)."""
    out: dict[str, set[int]] = {}
    for entry_id in ws.trash_entry_ids()[0]:
        try:
            entry = read_entry(ws, entry_id)
        except CkptError:
            continue
        if entry.state in ("pending", "restoring") and entry.task:
            out.setdefault(entry.task, set()).update(entry.numbers)
    return out


def _check_task(
    ws: Workspace,
    task: Task,
    dry_run: bool,
    forget_missing: bool,
    drop_bad: bool,
    in_flight: AbstractSet[int] = frozenset(),
) -> list[Repair]:
    try:
        state = task.state()
    except ManifestError as e:
        repairs, mended = ws.mend(task.name, e, dry_run=dry_run, drop_bad=drop_bad)
        if mended:
            repairs += _check_task(ws, task, dry_run, forget_missing, drop_bad, in_flight)
        return repairs
    repairs, dealt = task.leftovers(dry_run=dry_run)
    state = task.state()
    base = f"tasks/{task.name}/"
    files = locate(ws.storage, base, list(state.checkpoints.values()))
    missing = [
        cp
        for cp in state.checkpoints.values()
        if cp.file not in files and cp.number not in in_flight and not ws.storage.exists(base + cp.file)
    ]
    if missing:
        if forget_missing and not dry_run:
            gone = {cp.number for cp in missing}

            def forget(st: TaskState) -> None:
                # last_number keeps the highest number: a forgotten number is never given to a new checkpoint
                st.header.last_number = st.max_number
                for n in gone:
                    st.checkpoints.pop(n, None)

            task.update(forget)
            action = "forgot the record (its number is not reused)"
        elif forget_missing:
            action = "would forget the record"
        else:
            action = "left alone: put the file back, or forget the record with: ckpt doctor --forget-missing"
        for cp in sorted(missing, key=lambda c: c.number):
            repairs.append(Repair(base + cp.file, f"checkpoint {cp.number} of task '{task.name}' has no file", action))
    try:
        unknown = task.unknown_files()[0]
    except (CkptError, OSError) as e:
        return [*repairs, Repair(ws.rel(task.folder), f"cannot scan the task folder: {e}", "left alone")]
    for u in unknown:
        if u.rel in dealt:
            continue
        how = f"ckpt scan {task.name} --add" if u.addable else "move it out of the task folder"
        repairs.append(Repair(u.rel, f"a {u.kind} no record of task '{task.name}' names", f"left alone: {how}"))
    # entries named in `trashing` that are no longer pending (finished but not yet struck off, or gone)
    done = []
    for entry_id in state.header.trashing:
        try:
            if read_entry(ws, entry_id).state == "pending":
                continue
        except NotFoundError:
            pass
        done.append(entry_id)
    if done:
        repairs.append(Repair(ws.rel(task.manifest), f"{len(done)} finished trash entries still named", "struck off"))
        if not dry_run:

            def strike(st: TaskState) -> None:
                st.header.trashing = [i for i in st.header.trashing if i not in done]

            task.update(strike)
    return repairs
