"""The trash bin: trash-unused, models remove, trash restore / empty, and finishing what a crash left.

Written once for every store (`ws.storage`: a folder, a bucket), in one crash order. trash-unused:

1. the entry record, "pending", naming every checkpoint it will hold (created, never replacing);
2. on a store that renames, a marker `tasks/<task>/.pending-<id>`: the files are about to leave the task,
   and the next lock of the task (every change takes it) finishes or undoes what follows;
3. the files into the entry: renamed on a folder, copied on the server in a bucket;
4. one commit of the task manifest: the records dropped and the entry named in its `trashing`;
5. the originals a copy left deleted, the entry "complete", its name struck off `trashing`, the marker removed.

Before 4 a crash is undone (files that left the task go back; copies go); after it, finished (`settle`).
The commit carries its own id, so a retry whose first attempt landed is known (ckpt.store). On a store with
locks the task's lock is held throughout, so a pending entry seen under it is dead; on one without, only
a pending entry older than STALE_PENDING is undone (it may be running on another machine). Restore marks
the entry "restoring" (If-Match), puts the files back, commits the records, then deletes the entry; empty
marks it "emptying", deletes its files, its record last. An interrupted restore or empty is finished by
running it again or by `ckpt doctor`.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    BusyError,
    CkptError,
    CommitUnknown,
    ConflictError,
    IntegrityError,
    NotFoundError,
    TaskNotFound,
)
from .layout import PENDING_PREFIX
from .manifest import TaskState
from .models import MODEL_FILE
from .storage.base import PreconditionFailed
from .timeutil import now_iso, parse_iso
from .trash_entry import (
    ENTRY_ID,
    FILES_DIR,
    MODEL_DIR,
    Entry,
    created_key,
    delete_entry,
    entry_or_none,
    held_elsewhere,
    is_temp,
    is_young,
    mark,
    new_entry_id,
    put_entry,
    read_entry,
    read_entry_tagged,
)
from .trash_models import restore_model, settle_model
from .trash_plan import KeepRules, TrashPlan, TrashResult, count_links, held_by_links, locate, plan_unused

if TYPE_CHECKING:
    from .task_base import Task
    from .trash_results import DiskUse, EmptyPlan, EmptyResult, Repair, RestoreResult
    from .workspace_base import Workspace


class _Overlap(Exception):
    pass


# --- trash-unused -------------------------------------------------------------------------------------


def trash_unused(
    ws: Workspace, task_name: str, rules: KeepRules | None = None, *, reason: str = "", dry_run: bool = False
) -> TrashResult:
    """Move every unused checkpoint of `task_name` to one new trash entry (or, `dry_run`, only plan it).

    A checkpoint is used when a model was made from it, when it is the latest, or when `rules`
    protect it. Raises TaskNotFound, UsageError (rules), BusyError, ManifestError.
    """
    rules = rules or KeepRules()
    rules.check()
    task = ws.task(task_name)
    reason = reason or f"trash_unused({task_name!r})"
    if dry_run:
        return TrashResult(plan_unused(task, rules, reason), None)
    with task.lock():
        # decided under the lock (where the store has one), from the manifest read under it: a promote (which
        # takes it) cannot make a model from a checkpoint being moved; without locks the commit checks instead
        settle_task(task)
        plan = plan_unused(task, rules, reason)
        if not plan.checkpoints:
            return TrashResult(plan, None)
        return TrashResult(plan, _execute(ws, task, plan))


def _execute(ws: Workspace, task: Task, plan: TrashPlan) -> str:
    cps = plan.checkpoints
    storage = ws.storage
    gone = {cp.number for cp in cps}
    entry = Entry(
        id="",
        kind="checkpoints",
        task=task.name,
        state="pending",
        created=now_iso(),
        reason=plan.reason,
        size=sum(cp.size for cp in cps),
        bytes=plan.bytes_freed_on_empty,
        checkpoints=list(cps),
        tracked=True,
    )

    def drop(state: TaskState) -> None:
        if not gone <= state.checkpoints.keys():
            raise _Overlap
        state.header.last_number = state.max_number
        for n in gone:
            del state.checkpoints[n]
        state.header.trashing = [*state.header.trashing, entry.id]

    try:
        while True:
            entry.id = new_entry_id()
            entry.folder = ws.root / "trash" / entry.id
            if storage.can_rename:  # the marker first: from here on the next lock of the task settles the entry
                storage.claim(_marker(task, entry.id), entry.id.encode())
            try:
                put_entry(ws, entry, new=True)
                break
            except PreconditionFailed:  # the id is taken (If-None-Match): another one
                if storage.can_rename:
                    storage.delete([_marker(task, entry.id)])
        left = storage.transfer(
            f"tasks/{task.name}", f"trash/{entry.id}/{FILES_DIR}", [cp.file for cp in cps], into_new=True
        )
        task.update(drop)
        _finish(ws, task, entry, left)
    except _Overlap:
        _undo(ws, task, entry)
        raise ConflictError(
            f"checkpoints of task '{task.name}' were moved to the trash by another command meanwhile; nothing "
            "was changed by this one",
            hint=f"see: ckpt trash list; run again: ckpt trash-unused {task.name}",
        ) from None
    except FileNotFoundError:  # a file left the task meanwhile: on a store without locks, to another trash
        _undo(ws, task, entry)
        raise ConflictError(
            f"checkpoints of task '{task.name}' were moved to the trash by another command meanwhile (or a file "
            "went away); nothing was changed by this one",
            hint=f"see: ckpt trash list; run again: ckpt trash-unused {task.name}",
        ) from None
    except CommitUnknown:
        raise  # the entry stays pending: the next trash-unused, trash list or doctor settles it
    except (Exception, KeyboardInterrupt, SystemExit):  # not a kill: that runs nothing, and the next lock does it
        with contextlib.suppress(Exception):  # put right at once what can be; what cannot, the next lock or doctor
            _recover_own(ws, task, entry.id)
        raise
    return entry.id


def _recover_own(ws: Workspace, task: Task, entry_id: str) -> None:
    """After a failure of this process's own trash (it holds the task's lock where the store has one): the
    entry finished when its commit landed, else undone; then its marker goes."""
    entry = entry_or_none(ws, entry_id)
    if entry is None:  # it failed while creating its record: nothing had moved, and its folder goes
        ws.storage.delete([f"trash/{entry_id}"])
    elif entry.state == "pending":
        entry = _settle_locked(ws, task, entry, own=True)
    if ws.storage.can_rename and (entry is None or entry.state != "pending"):
        ws.storage.delete([_marker(task, entry_id)])


def _marker(task: Task, entry_id: str) -> str:
    return f"tasks/{task.name}/{PENDING_PREFIX}{entry_id}"


def _finish(ws: Workspace, task: Task, entry: Entry, left: list[str] | None = None) -> Entry:
    """After the commit: the originals a copy left deleted (`left`, else those beside a copy in the entry),
    the entry complete, its name off the manifest's `trashing`, the marker removed."""
    storage = ws.storage
    if left is None:
        copied = locate(storage, f"trash/{entry.id}/{FILES_DIR}/", entry.checkpoints)
        there = locate(storage, f"tasks/{task.name}/", entry.checkpoints)
        # never the last copy: only an original whose copy is in the entry goes
        left = [b.key for cp in entry.checkpoints if cp.file in copied for b in there.get(cp.file, [])]
    storage.delete(left)
    done = replace(entry, state="complete")
    put_entry(ws, done)

    def untrack(state: TaskState) -> None:
        if entry.id not in state.header.trashing:
            raise _Overlap  # nothing to commit
        state.header.trashing = [i for i in state.header.trashing if i != entry.id]

    with contextlib.suppress(_Overlap):
        task.update(untrack)
    if storage.can_rename:
        storage.delete([_marker(task, entry.id)])
    return done


def _undo(ws: Workspace, task: Task | None, entry: Entry, state: TaskState | None = None) -> Entry:
    """Undo a trash whose commit never landed: what left the task goes back (while its record is there), then
    the entry goes with the copies it holds. A file only the entry holds whose record is gone is never
    deleted: then the entry stays (doctor reports it) unless another entry holds that checkpoint too."""
    storage = ws.storage
    prefix = f"trash/{entry.id}/{FILES_DIR}/"
    if task is not None:
        state = state or task.reload()
        copied = locate(storage, prefix, entry.checkpoints)
        there = locate(storage, f"tasks/{task.name}/", entry.checkpoints)
        back: list[str] = []
        for cp in entry.checkpoints:
            if cp.file in there or cp.file not in copied:
                continue  # the original is in place (a copy here is a duplicate), or the file is nowhere
            if cp.number in state.checkpoints:
                back.append(cp.file)
            elif not held_elsewhere(ws, entry):
                return entry
        left = storage.transfer(f"trash/{entry.id}/{FILES_DIR}", f"tasks/{task.name}", back)
        del left  # copies of a store that copies: they go with the entry
        if storage.can_rename:
            storage.delete([_marker(task, entry.id)])
    delete_entry(ws, entry.id)
    return replace(entry, state="gone")


def settle_task(task: Task) -> None:
    """Finish the trashes of `task` whose commit landed and that stopped after it (named in its `trashing`)."""
    for entry_id in task.state().header.trashing:
        with contextlib.suppress(NotFoundError):
            entry = read_entry(task.ws, entry_id)
            if entry.state == "pending":
                _finish(task.ws, task, entry)


def settle_marker(task: Task, marker: Path) -> Repair:
    """The marker of an interrupted trash on a store that renames: its entry settled, the marker removed.
    The caller holds the task's lock (Task.lock calls this)."""
    from .trash_results import Repair

    ws = task.ws
    entry_id = marker.name[len(PENDING_PREFIX) :]
    rel = ws.rel(marker)
    entry = entry_or_none(ws, entry_id) if ENTRY_ID.fullmatch(entry_id) else None
    if entry is None or entry.kind != "checkpoints" or entry.task != task.name:
        ws.storage.delete([rel])
        return Repair(rel, "a pending marker that names no trash entry of this task", "removed the marker")
    if entry.state == "restoring":
        try:
            restore(ws, entry.id)
        except CkptError as e:  # never a lock refused for it: the marker stays, and doctor reports it
            return Repair(rel, f"an interrupted restore of trash entry '{entry.id}'", f"left alone: {e}")
        ws.storage.delete([rel])
        return Repair(rel, f"an interrupted restore of trash entry '{entry.id}'", "finished the restore")
    if entry.state != "pending":  # a restore stopped before it marked the entry, or a trash after it finished
        ws.storage.delete([rel])
        return Repair(rel, f"trash entry '{entry.id}' was {entry.state} but its marker was left", "removed the marker")
    settled = settle(ws, entry).state
    ws.storage.delete([rel])
    action = {"complete": "finished: the entry is complete", "gone": "undone: the files are back in the task"}
    return Repair(
        rel, f"an interrupted trash-unused ('{entry.id}')", action.get(settled, "left alone: see ckpt doctor")
    )


def settle(ws: Workspace, entry: Entry) -> Entry:
    """A "pending" entry of an interrupted trash: finished when its commit landed, else undone. On a store with
    locks this takes the task's lock (without waiting: a trash that holds it is running, and the entry is
    returned as it is); on one without, a pending entry younger than STALE_PENDING may be running elsewhere
    and is left."""
    if entry.state != "pending":
        return entry
    if entry.kind == "model":
        return settle_model(ws, entry)
    try:
        task: Task | None = ws.task(entry.task or "")
    except TaskNotFound:
        task = None
    if task is None:
        return entry  # its checkpoints cannot go back, and nothing says its commit landed: left for a person
    try:
        with task.lock(timeout=0):
            return _settle_locked(ws, task, entry)
    except BusyError:
        return entry


def _settle_locked(ws: Workspace, task: Task, entry: Entry, own: bool = False) -> Entry:
    """`settle` under the task's lock; `own`: the entry is this process's, which knows it is not running."""
    state = task.reload()
    if entry.id in state.header.trashing:  # its commit landed: finish it
        return _finish(ws, task, entry)
    kept = any(cp.number in state.checkpoints for cp in entry.checkpoints)
    if kept and not own and not ws.storage.can_lock and is_young(entry.created):
        return entry
    # read again after the manifest: an entry finished meanwhile was complete before it left `trashing`
    fresh = entry_or_none(ws, entry.id)
    if fresh is None:
        return replace(entry, state="gone")
    if fresh.state != "pending":
        return fresh
    if not kept and _copies_whole(ws, entry) and not held_elsewhere(ws, entry):
        # its records went and the manifest does not name it: its own commit landed and the name was lost (an
        # entry of an older ckpt, or a manifest one rewrote), since no other entry holds its checkpoints
        return _finish(ws, task, entry)
    return _undo(ws, task, entry, state)


def _copies_whole(ws: Workspace, entry: Entry) -> bool:
    copied = locate(ws.storage, f"trash/{entry.id}/{FILES_DIR}/", entry.checkpoints)
    return all(cp.file in copied for cp in entry.checkpoints)


def trash_entry(ws: Workspace, entry_id: str) -> Entry:
    """Trash entry `entry_id` as `trash list` shows it: a pending one is settled first."""
    return settle(ws, read_entry(ws, entry_id))


def list_entries(ws: Workspace) -> tuple[list[Entry], list[CkptError]]:
    """Every readable trash entry (oldest first), and the errors of those that could not be read: those
    `ws.trash_entry_ids` names, each read as it stands (a pending one settled first)."""
    ids, errors = ws.trash_entry_ids()
    entries: list[Entry] = []
    for entry_id in ids:
        try:
            entry = trash_entry(ws, entry_id)
        except NotFoundError:
            continue  # emptied or restored meanwhile, or a folder without its record (doctor reports it)
        except CkptError as e:
            errors.append(e)
            continue
        if entry.state != "gone":
            entries.append(entry)
    # oldest first by the time recorded (to the microsecond): ids name the second only, then a random suffix
    entries.sort(key=lambda e: (created_key(e.created), e.id))
    return entries, errors


# --- restore -----------------------------------------------------------------------------------------


def restore(ws: Workspace, entry_id: str) -> RestoreResult:
    """Put the files and records of trash entry `entry_id` back exactly as they were; the entry is removed.

    Raises NotFoundError, ConflictError (something would be overwritten, a number is back in the manifest,
    or the entry is being made or emptied; nothing is changed), IntegrityError (a file is missing).
    """
    from .trash_results import RestoreResult

    entry = settle(ws, read_entry(ws, entry_id))
    if entry.state == "emptying":
        raise ConflictError(
            f"trash entry '{entry_id}' is being emptied (or an empty was interrupted): its files are going",
            hint=f"finish it: ckpt trash empty {entry_id} (or: ckpt doctor)",
        )
    if entry.state == "gone":
        raise NotFoundError(f"trash entry '{entry_id}' was an interrupted trash, undone", hint="see: ckpt trash list")
    if entry.state == "pending":
        raise ConflictError(
            f"trash entry '{entry_id}' is still being made (or was interrupted)",
            hint="try again later, or: ckpt doctor",
        )
    if entry.kind == "model":
        return RestoreResult(restore_model(ws, entry_id))
    try:
        task = ws.task(entry.task or "")
    except TaskNotFound:
        raise NotFoundError(
            f"task '{entry.task}' of trash entry '{entry.id}' no longer exists; its checkpoints cannot go back",
            hint=f"the files are in {ws.rel(entry.folder)}",
        ) from None
    with task.lock():
        entry, etag = read_entry_tagged(ws, entry_id)  # again, under the lock
        if entry.state not in ("complete", "restoring"):
            raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
        _restore_locked(ws, task, entry, etag)
    return RestoreResult(entry)


def _restore_locked(ws: Workspace, task: Task, entry: Entry, etag: str) -> None:
    storage = ws.storage
    state = task.reload()
    base, prefix = f"tasks/{task.name}/", f"trash/{entry.id}/{FILES_DIR}/"
    there = locate(storage, base, entry.checkpoints)
    copied = locate(storage, prefix, entry.checkpoints)
    if entry.state != "restoring":
        conflicts = [
            f"checkpoint {cp.number} is in the manifest of task '{task.name}' again"
            for cp in entry.checkpoints
            if cp.number in state.checkpoints
        ]
        conflicts += [f"'{base}{cp.file}' exists" for cp in entry.checkpoints if cp.file in there]
        if conflicts:
            shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
            raise ConflictError(f"restoring trash entry '{entry.id}' would overwrite: {shown}; nothing was changed")
    lacking = [cp for cp in entry.checkpoints if cp.file not in copied and cp.file not in there]
    if lacking:  # never a record without its file: nothing is restored from a damaged entry
        try:
            now = read_entry_tagged(ws, entry.id)[1]
        except NotFoundError:
            now = ""
        if now != etag:  # an empty began meanwhile (it marked the entry before deleting): say that, not damage
            raise ConflictError(
                f"trash entry '{entry.id}' was emptied or changed by another command meanwhile; nothing was restored",
                hint="see: ckpt trash list",
            )
        raise IntegrityError(
            f"trash entry '{entry.id}' is missing the files of {len(lacking)} checkpoint(s) (first: checkpoint "
            f"{lacking[0].number}, {prefix}{lacking[0].file}); nothing was changed",
            path=entry.folder,
            hint="see: ckpt doctor",
        )
    if storage.can_rename:  # files are about to move: the next lock of the task finishes this restore
        storage.claim(_marker(task, entry.id), entry.id.encode())  # or an interrupted restore's: this one's now
    if entry.state != "restoring":  # If-Match: an empty that began meanwhile wins, and this restore stops
        mark(ws, entry, "restoring", etag)
    # the files back first, then the records: a record never names a file that is not in place
    storage.transfer(
        f"trash/{entry.id}/{FILES_DIR}",
        f"tasks/{task.name}",
        [cp.file for cp in entry.checkpoints if cp.file not in there],
    )
    records = {cp.number: replace(cp, task=task.name) for cp in entry.checkpoints}

    def add(st: TaskState) -> None:
        for n, cp in records.items():
            st.checkpoints.setdefault(n, cp)
        st.header.last_number = max(st.header.last_number, st.max_number)

    task.update(add)
    delete_entry(ws, entry.id)
    if storage.can_rename:
        storage.delete([_marker(task, entry.id)])


# --- empty -------------------------------------------------------------------------------------------


def plan_empty(ws: Workspace, ids: list[str] | None = None, older_than: timedelta | None = None) -> EmptyPlan:
    """Choose the entries to delete: `ids` (all when empty or None), only those older than `older_than`; an
    entry an interrupted empty left ("emptying") is chosen whatever its age, one being made or restored
    (or interrupted doing so) is skipped. Raises NotFoundError for an id not in the trash."""
    from .trash_results import EmptyPlan

    skipped: list[tuple[str, str]] = []
    if ids:
        candidates = [trash_entry(ws, i) for i in dict.fromkeys(ids)]
    else:
        candidates, errors = list_entries(ws)
        skipped.extend((str(e.path and Path(e.path).parent.name), f"unreadable: {e}") for e in errors)
    cutoff = datetime.now(UTC) - older_than if older_than is not None else None
    chosen: list[Entry] = []
    for e in candidates:
        if e.state == "gone":
            continue
        if e.state == "emptying":
            chosen.append(e)
            continue
        if e.state != "complete":
            doing = "being restored" if e.state == "restoring" else "being made"
            skipped.append((e.id, f"{e.state}: {doing}, or interrupted doing so; run: ckpt doctor"))
            continue
        if cutoff is not None:
            try:
                if parse_iso(e.created) > cutoff:
                    continue
            except ValueError:
                skipped.append((e.id, f"unreadable created time {e.created!r}"))
                continue
        chosen.append(e)
    return EmptyPlan(chosen, skipped, ws.trash_leftovers())


def empty(ws: Workspace, plan: EmptyPlan) -> EmptyResult:
    """Delete the planned entries for good; return the bytes actually freed (each inode once, where other
    links hold none). The only operation of ckpt that deletes checkpoint bytes. Never follows a symlink."""
    from .trash_results import EmptyResult

    emptied: list[str] = []
    skipped = list(plan.skipped)
    links: dict[object, list[int]] = {}
    for path in plan.leftovers:  # what an older ckpt's interrupted empty renamed aside
        key = ws.rel(path)
        count_links(links, ws.storage.list_prefix(key + "/"))
        ws.storage.delete([key])
    for planned in plan.entries:
        try:
            _empty_entry(ws, planned.id, links)
        except (ConflictError, NotFoundError):
            skipped.append((planned.id, "restored or changed meanwhile"))
            continue
        emptied.append(planned.id)
    freed = sum(size for n, nlink, size in links.values() if n >= nlink)
    return EmptyResult(emptied, freed, skipped, held_by_links(links, None))


def _empty_entry(ws: Workspace, entry_id: str, links: dict[object, list[int]]) -> None:
    """Mark the entry "emptying" (If-Match), then delete its files and its record last: an interrupted empty
    leaves an entry that says so (restore refuses it; empty and doctor finish it), never one that claims
    files it no longer has."""
    entry, etag = read_entry_tagged(ws, entry_id)
    if entry.state not in ("complete", "emptying"):
        raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
    if entry.state != "emptying":
        mark(ws, entry, "emptying", etag)
    blobs = ws.storage.list_prefix(f"trash/{entry_id}/")
    count_links(links, blobs)  # its record too: emptying frees every byte of the entry
    delete_entry(ws, entry_id)


# --- recovery (ckpt doctor) --------------------------------------------------------------------------


def recover_trash(ws: Workspace, *, dry_run: bool = False) -> list[Repair]:
    """Finish or undo what interrupted trash operations left: entries pending, restoring or emptying, markers
    of tasks on a store that renames, and (an older ckpt's) folders renamed aside by an empty."""
    from .trash_results import Repair

    repairs: list[Repair] = []
    for name in ws.task_names():
        try:
            task = ws.task(name)
            markers = task.pending_markers()
        except CkptError:
            continue
        if markers and dry_run:
            repairs += [
                Repair(ws.rel(m), "an interrupted trash or restore", "would finish or undo it") for m in markers
            ]
        elif markers:
            with task.lock(settle=False):
                repairs += [settle_marker(task, m) for m in task.pending_markers()]
    for path in ws.trash_leftovers():
        repairs.append(Repair(ws.rel(path), "an interrupted trash empty", "would delete it" if dry_run else "deleted"))
        if not dry_run:
            ws.storage.delete([ws.rel(path)])
    ids, errors = ws.trash_entry_ids()
    for err in errors:
        repairs.append(Repair(ws.rel(Path(err.path)) if err.path else "trash", str(err), "left alone"))
    for entry_id in ids:
        rel = f"trash/{entry_id}"
        try:
            entry = read_entry(ws, entry_id)
        except NotFoundError:
            repairs += _loose_folder(ws, entry_id, dry_run)
            continue
        except CkptError as e:
            repairs.append(Repair(rel, str(e), "left alone"))
            continue
        if entry.state == "complete":
            repairs += _check_complete(ws, entry)
            continue
        what = f"trash entry '{entry_id}' is {entry.state}"
        if dry_run:
            young = entry.state == "pending" and not ws.storage.can_lock and is_young(entry.created)
            would = {"emptying": "would finish the empty", "restoring": "would finish the restore"}.get(
                entry.state, "would finish or undo it"
            )
            repairs.append(
                Repair(rel, what, "would leave it: it may still be running (under an hour old)" if young else would)
            )
            continue
        if entry.state == "emptying":
            _empty_entry(ws, entry_id, {})
            action = "finished the empty"
        elif entry.state == "restoring":
            try:
                restore(ws, entry_id)
                action = "finished the restore"
            except CkptError as e:
                action = f"left alone: {e}"
        else:
            settled = settle(ws, entry).state
            action = {
                "complete": "finished: the entry is complete",
                "gone": "undone: nothing had moved",
            }.get(settled, "left alone: it may still be running (or a file only it holds lost its record)")
        repairs.append(Repair(rel, what, action))
    return repairs


def _check_complete(ws: Workspace, entry: Entry) -> list[Repair]:
    """A complete entry that no longer holds what it names (files deleted by hand, or behind a symlink, which
    ckpt never follows): restore would refuse it, so doctor says so."""
    from .trash_results import Repair

    try:
        if entry.kind == "model":
            lacking = 0 if ws.storage.exists(f"trash/{entry.id}/{MODEL_DIR}/{MODEL_FILE}") else 1
        else:
            copied = locate(ws.storage, f"trash/{entry.id}/{FILES_DIR}/", entry.checkpoints)
            lacking = sum(cp.file not in copied for cp in entry.checkpoints)
    except CkptError as e:  # a folder of it is a link, or a file: never followed
        return [Repair(f"trash/{entry.id}", str(e), "left alone: it cannot be restored until that is put right")]
    if not lacking:
        return []
    what = (
        "its model"
        if entry.kind == "model"
        else f"the files of {lacking} of its {len(entry.checkpoints)} checkpoint(s)"
    )
    return [
        Repair(
            f"trash/{entry.id}",
            f"trash entry '{entry.id}' lacks {what} (deleted, or reached through a symlink ckpt does not follow)",
            f"left alone: it cannot be restored; put the files back, or empty it: ckpt trash empty {entry.id}",
        )
    ]


def _loose_folder(ws: Workspace, entry_id: str, dry_run: bool) -> list[Repair]:
    """A trash folder without entry.toml: an empty one goes; one with files is left (they may be the only copy)."""
    from .trash_results import Repair

    rel = f"trash/{entry_id}"
    blobs = [b for b in ws.storage.list_prefix(rel + "/") if not is_temp(b.key.rsplit("/", 1)[-1])]
    if blobs:
        return [Repair(rel, "a trash folder with files but no entry.toml", "left alone")]
    if not ws.storage.exists(rel) and not ws.storage.list_prefix(rel + "/"):
        return []
    if dry_run:
        return [Repair(rel, "an empty trash folder", "would remove it")]
    ws.storage.delete([b.key for b in ws.storage.list_prefix(rel + "/")] + [rel])
    return [Repair(rel, "an empty trash folder", "removed")]


def disk_use(ws: Workspace) -> DiskUse:
    """Bytes of the workspace by task, models and trash. Tasks count first: a model hard-linked to a
    checkpoint of a task costs nothing more (`ws.usage` counts each file, inode or object once)."""
    from .trash_results import DiskUse

    names = ws.task_names()
    sizes, other = ws.usage([f"tasks/{n}" for n in names] + ["models", "trash"])
    by_task = dict(zip(names, sizes, strict=False))
    models, trash = sizes[-2:]
    return DiskUse(by_task, models, trash, other, sum(sizes) + other)
