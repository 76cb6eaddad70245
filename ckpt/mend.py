"""What a folder's own interrupted writes leave, and how `ckpt doctor` mends a folder task's manifest: a last
record cut short by a crash while appending, records it must not hold (manifest.salvage_task), a promote's
staging folder and temporary files left behind. The bucket's counterparts are in ckpt.store_doctor."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import fsutil, locks
from .errors import CkptError, ManifestError
from .layout import LOCK_FILE
from .manifest import parse_task, parse_toml, salvage_task, task_bytes
from .model_sources import MODEL_FILE
from .trash_entry import STAGING_PREFIX, is_temp
from .trash_results import Repair

if TYPE_CHECKING:
    from .task_base import Task
    from .workspace_base import Workspace


def mend_manifest(task: Task, error: ManifestError, *, dry_run: bool, drop_bad: bool) -> tuple[list[Repair], bool]:
    """What is wrong with a manifest that does not parse, each mended where it can be (an incomplete last
    record always, records it must not hold with `drop_bad`); and whether it parses now."""
    ws = task.ws
    rel = ws.rel(task.manifest)
    try:
        data = fsutil.read_own(task.manifest)
    except (OSError, CkptError):
        return [Repair(rel, str(error), "left alone")], False
    cut = incomplete_tail(data, task.manifest, task.name)
    if cut is None:
        return _bad_records(task, data, error, dry_run, drop_bad)
    problem = f"its last record is incomplete ({len(data) - cut} bytes; a save cut off while appending)"
    if dry_run:
        return [Repair(rel, problem, "would cut it off")], False
    with locks.locked(task.folder / LOCK_FILE, f"task '{task.name}'"):
        data = fsutil.read_own(task.manifest)  # again, under the lock
        cut = incomplete_tail(data, task.manifest, task.name)
        if cut is None:
            return [Repair(rel, "an incomplete last record", "left alone: it changed meanwhile")], False
        # the whole manifest is replaced atomically by its valid part; the cut record's file stays
        fsutil.atomic_write(task.manifest, data[:cut])
        task.forget_read()
    return [Repair(rel, problem, "cut it off; the file it named is reported below if present")], True


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


def _bad_records(
    task: Task, data: bytes, error: ManifestError, dry_run: bool, drop_bad: bool
) -> tuple[list[Repair], bool]:
    """A manifest that does not parse because of records it must not hold (manifest.salvage_task): each reported,
    dropped with `drop_bad` (their files stay, reported as files without a record)."""
    rel = task.ws.rel(task.manifest)
    try:
        _, dropped = salvage_task(data, task.manifest, task.name)
    except ManifestError:
        dropped = []
    if not dropped:
        return [Repair(rel, str(error), "left alone: fix or restore the manifest by hand")], False
    if drop_bad and not dry_run:
        with task.lock():
            # again, under the lock; the whole manifest is replaced atomically by what can stay
            state, dropped = salvage_task(fsutil.read_own(task.manifest), task.manifest, task.name)
            fsutil.atomic_write(task.manifest, task_bytes(state))
            task.forget_read()
        action = "dropped the record (its number is not reused); its file, if any, is reported below"
    elif drop_bad:
        action = "would drop the record"
    else:
        action = "left alone: drop such records with: ckpt doctor --drop-bad-records"
    repairs = [
        Repair(rel, f"{'checkpoint ' + str(n) if n is not None else 'a record'} of task '{task.name}': {why}", action)
        for n, why in dropped
    ]
    return repairs, drop_bad and not dry_run


def folder_leftovers(ws: Workspace, *, dry_run: bool, stale_after: float) -> list[Repair]:
    """A promote's staging folders and the temporary files of interrupted writes, once older than
    `stale_after` seconds (a live command may be writing them)."""
    repairs: list[Repair] = []
    now = time.time()
    try:
        with os.scandir(ws.models_dir) as it:
            staging = [Path(e.path) for e in it if e.name.startswith(STAGING_PREFIX)]
    except FileNotFoundError:
        staging = []
    for folder in sorted(staging):
        age = now - max((st.st_mtime for _, st in fsutil.lstat_tree(folder)), default=now)
        if age < stale_after:
            repairs.append(Repair(ws.rel(folder), "a promote's staging folder", "left alone: it may be in use"))
            continue
        repairs.append(
            Repair(
                ws.rel(folder), "an interrupted promote's staging folder", "would delete it" if dry_run else "deleted"
            )
        )
        if not dry_run:
            fsutil.remove_tree(folder)
    try:
        with os.scandir(ws.models_dir) as it:
            folders = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        folders = []
    for title in folders:  # no ckpt leaves one (a model is renamed into place whole): not deleted, reported
        if not os.path.lexists(ws.models_dir / title / MODEL_FILE):
            repairs.append(
                Repair(
                    ws.rel(ws.models_dir / title),
                    f"a model folder without model.toml: no model, but the title '{title}' is taken",
                    "left alone: move it out of models/ to free the title (its files are not ckpt's record)",
                )
            )
    for path in _temp_files(ws):
        if now - _mtime(path) < stale_after:
            continue
        repairs.append(
            Repair(ws.rel(path), "a temp file of an interrupted write", "would delete it" if dry_run else "deleted")
        )
        if not dry_run:
            fsutil.remove_file(path)
    return repairs


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def _temp_files(ws: Workspace) -> list[Path]:
    """`.<name>.<rand>.tmp` regular files where ckpt writes: the root, task folders and their checkpoints/,
    model folders, trash entries."""
    folders = [ws.root]
    for name in ws.task_names():
        folders += [ws.tasks_dir / name, ws.tasks_dir / name / "checkpoints"]
    for parent in (ws.models_dir, ws.trash_dir):
        try:
            with os.scandir(parent) as it:
                folders += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            pass
    out: list[Path] = []
    for folder in folders:
        if fsutil.is_symlink(folder):
            continue
        try:
            with os.scandir(folder) as it:
                out += [Path(e.path) for e in it if is_temp(e.name) and e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted(out)
