"""Bring your own runs: import Lightning, Hugging Face and plain checkpoint folders; scan tasks.

Importing plans first (find, parse names, hash on all cores: finders.py, import_names.py; then match
against what the task already holds), then hands the new checkpoints to `Task.add_existing`, which
links them in under the task lock. Formats and numbering rules are documented in docs/import.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import fsutil
from .errors import CkptError, ConflictError, IntegrityError, NotFoundError, TaskNotFound, UsageError
from .finders import (
    FILE_SUFFIXES,
    HF_DIR,
    Found,
    ImportRow,
    detect_format,
    find_files,
    find_huggingface,
    find_lightning,
    find_steps,
    hash_found,
    order_by_plain_name,
)
from .finders import iso_time as _iso  # the names scan uses (scan is being rewritten apart from this split)
from .finders import mtime_of as _mtime
from .finders import read_json as _read_json
from .import_names import hf_metrics, parse_lightning_name, parse_plain_name
from .layout import (
    CACHE_FILE,
    CHECKPOINT_DIR,
    IMPORT_MARKER_PREFIX,
    LIST_CACHE_FILE,
    LOCK_FILE,
    PENDING_PREFIX,
    SAVING_FILE,
    STAGING_PREFIX,
    TASK_FILE,
    Incoming,
)
from .layouts import COMPOSER_FILE, KINDS, folder_kind, pointer_target, step_epoch
from .names import check_task_name
from .pathtext import escape_path

if TYPE_CHECKING:
    from .manifest import Checkpoint
    from .task_base import Task
    from .workspace_base import Workspace

FORMATS = ("auto", "lightning", "huggingface", "files", *KINDS)
MODES = ("link", "copy", "move")


@dataclass(slots=True)
class ImportResult:
    task: str
    format: str
    mode: str
    created_task: bool
    rows: list[ImportRow]

    @property
    def added(self) -> int:
        return sum(r.action == "added" for r in self.rows)


# --- import ---------------------------------------------------------------------------------------


def default_task_name(path: Path, fmt: str) -> str:
    """A task name from the source path: its folder name, skipping Lightning's `checkpoints` folder."""
    p = path.resolve()
    if not p.is_dir() or (fmt == "huggingface" and HF_DIR.fullmatch(p.name)) or (fmt in KINDS and folder_kind(p)):
        p = p.parent
    if p.name == "checkpoints" and p.parent != p:
        p = p.parent
    raw = p.name
    if re.fullmatch(r"version_\d+", raw) and p.parent.name == "lightning_logs" and p.parent.parent.name:
        # lightning_logs/version_3 says little: name it after the project folder, as <project>-version_3
        raw = f"{p.parent.parent.name}-{raw}"
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", raw).lstrip(".-")[:100]
    return name or "imported"


def plan(
    path: Path, fmt: str = "auto", progress: Callable[[int, int], None] | None = None
) -> tuple[str, list[Found], list[ImportRow]]:
    """What `path` holds: (format, checkpoints in import order with sizes and hashes, skipped rows)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    if not os.path.lexists(path):
        raise NotFoundError(f"'{path}' does not exist", path=path)
    _refuse_link(path)
    if not path.is_dir():
        _check_single_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    finder = {"lightning": find_lightning, "huggingface": find_huggingface, "files": find_files}.get(fmt, find_steps)
    if fmt == "huggingface" and not path.is_dir():
        raise UsageError(f"'{path}' is a file; a Hugging Face checkpoint is a checkpoint-N folder")
    found, skipped = finder(path)
    if not found and not skipped:
        raise NotFoundError(
            f"no {fmt} checkpoints in '{path}'",
            path=path,
            hint="pass --format (lightning: *.ckpt, huggingface: checkpoint-N/, files: *.pt *.pth *.bin *.safetensors;"
            " dcp, sharded, deepspeed, composer: docs/formats-checkpoints.md)",
        )
    hash_found(found, progress)
    return fmt, found, skipped


def _refuse_link(path: Path) -> None:
    if fsutil.is_symlink(path):  # never followed: an import would link, copy or move the link's target
        target = escape_path(os.readlink(path))
        raise IntegrityError(
            f"'{path}' is a symlink (to {target}); ckpt never follows a link",
            path=path,
            hint=f"import what it points at: ckpt import {target}",
        )


def _check_single_file(path: Path) -> None:
    """A file given to import on its own must be a checkpoint: a run's `latest` pointer, or any file
    without a checkpoint suffix, is refused (UsageError) rather than numbered as one."""
    fsutil.refuse_irregular(path, os.stat(path, follow_symlinks=False).st_mode)  # /dev/zero, a FIFO: exit 6
    if path.name.endswith(FILE_SUFFIXES):
        return
    target = pointer_target(path) if path.name == "latest" else None
    if target is not None:
        raise UsageError(
            f"'{path}' is DeepSpeed's latest pointer (to {escape_path(target)}), not a checkpoint",
            path=path,
            hint=f"import the run folder: ckpt import {escape_path(str(path.parent))}",
        )
    raise UsageError(
        f"'{path}' is not a checkpoint file ({' '.join(FILE_SUFFIXES)})",
        path=path,
        hint="import a checkpoint file, a step folder or a run folder",
    )


def import_path(
    ws: Workspace,
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    fmt: str = "auto",
    mode: str = "link",
    progress: Callable[[int, int], None] | None = None,
    dry_run: bool = False,
) -> ImportResult:
    """Import the checkpoints under `path` into task `task` (created if needed; default: named after the folder).

    With `dry_run`, nothing is written: the rows say what would be added ("would add") or left.

    Already-imported checkpoints (same sha256 and size as a record of the task) and repeats (`last.ckpt`,
    identical bytes under two names) are not numbered again, so importing twice changes nothing.
    Raises NotFoundError, UsageError, ConflictError (task not running), BusyError, IntegrityError.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", hint="use --link, --copy or --move")
    src = fsutil.user_path(path)
    _refuse_link(src)  # before resolving it: a link loop is refused as a link, not a resolve error
    if ws.holds(src):
        raise UsageError(
            f"'{src}' is inside the workspace", hint="for files a script wrote into a task, use: ckpt scan"
        )
    if task is not None and not dry_run:
        # a killed import's staged files go back to their sources first, so that this run reads them there
        with contextlib.suppress(TaskNotFound):
            ws.task(task).settle()
    fmt, found, skipped = plan(src, fmt, progress)
    name = task if task is not None else default_task_name(src, fmt)
    check_task_name(name)
    modes = found_modes(found)
    origin = src.resolve()
    source = {"path": escape_path(str(origin if origin.is_dir() else origin.parent)), "how": mode}
    created = False
    try:
        t = ws.task(name)
        if dry_run:
            t.take_in_save()  # as the import's lock will: the numbers it plans are the ones it gives
        elif t.settle():
            # a killed import's staged files went back to their sources just now: what to import is read again
            fmt, found, skipped = plan(src, fmt, progress)
            modes = found_modes(found)
    except TaskNotFound:
        if dry_run:
            return _would(name, fmt, mode, True, [], found, skipped)
        t = ws.create_task(name, exist_ok=True, metric_modes=modes, source=source if found else None)
        created = True
    if dry_run:
        if t.status != "running":
            raise ConflictError(f"task '{t.name}' is {t.status}; it takes no new checkpoints")
        return _would(t.name, fmt, mode, False, t.checkpoints, found, skipped)
    rows, new = _match(t.checkpoints, found)
    try:
        added = t.add_existing(new, mode=mode, unique=True)
    except BaseException:
        if created:  # a failed import leaves no empty task behind
            with contextlib.suppress(CkptError, OSError):
                t.discard_if_empty()
        raise
    # after the records: a failed import leaves the manifest as it was (directions and source are a note)
    if t.status == "running":
        t.note_import(modes, source if added else None)
    by_source = {cp.original_name: cp for cp in added}
    known: dict[tuple[str, int], Checkpoint] | None = None
    for r in rows:
        if r.action == "added":
            if r.original_name in by_source:
                r.number = by_source[r.original_name].number
            else:  # another import added the same bytes meanwhile
                if known is None:
                    known = {(cp.sha256, cp.size): cp for cp in t.checkpoints}
                r.action, r.note = "already", "added by another import meanwhile"
                r.number = known[(r.sha256, r.size)].number
    t.refresh_cache()
    return ImportResult(t.name, fmt, mode, created, rows + skipped)


def _would(
    name: str, fmt: str, mode: str, new_task: bool, held: list[Checkpoint], found: list[Found], skipped: list[ImportRow]
) -> ImportResult:
    """What an import would do (a dry run): the rows, with "would add" for what it would number."""
    rows, _ = _match(held, found)
    for r in rows:
        if r.action == "added":
            r.action = "would add"
    return ImportResult(name, fmt, mode, new_task, rows + skipped)


def found_modes(found: list[Found]) -> dict[str, str]:
    """The directions the checkpoints recorded, {metric: "min" | "max"}; a metric recorded both ways is left out."""
    modes: dict[str, str] = {}
    both: set[str] = set()
    for c in found:
        for metric, mode in c.modes.items():
            if modes.setdefault(metric, mode) != mode:
                both.add(metric)
    return {k: v for k, v in modes.items() if k not in both}


def _match(held: list[Checkpoint], found: list[Found]) -> tuple[list[ImportRow], list[Incoming]]:
    """Rows for every candidate, and the Incoming items of those the task (holding `held`) does not hold yet."""
    known: dict[tuple[str, int], Checkpoint] = {(cp.sha256, cp.size): cp for cp in held}
    # of identical files in this import, the named one is kept and last.ckpt is the repeat
    first: dict[tuple[str, int], Found] = {}
    for c in sorted(found, key=lambda c: c.is_last):
        first.setdefault((c.sha256, c.size), c)
    rows: list[ImportRow] = []
    new: list[Incoming] = []
    for c in found:
        key = (c.sha256, c.size)
        row = ImportRow(
            escape_path(c.path), c.name, "added", None, c.step, c.epoch, dict(c.metrics), c.size, c.sha256, c.note
        )
        if key in known:
            cp = known[key]
            row.number = cp.number
            same = cp.original_name == c.name
            row.action = "already" if same else "duplicate"
            row.note = "imported before" if same else f"same bytes as checkpoint {cp.number} ({cp.original_name})"
        elif first[key] is not c:
            row.action = "duplicate"
            row.note = f"same bytes as {first[key].name}"
        else:
            new.append(_incoming(c))
        rows.append(row)
    return rows, new


# --- scan -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Unknown:
    """A file or folder in a task folder that the manifest does not know."""

    path: Path
    rel: str  # relative to the workspace
    kind: str  # "file" or "dir"
    size: int
    modified: str
    addable: bool  # a checkpoint file (by suffix) or a folder holding weights


@dataclass(slots=True)
class ScanResult:
    task: str
    unknown: list[Unknown]
    temporary: list[Unknown]  # ckpt's own in-progress names (*.tmp, .import-*): never added
    added: list[Checkpoint] = field(default_factory=list)


_OWNED = {TASK_FILE, CACHE_FILE, LIST_CACHE_FILE, LOCK_FILE, CHECKPOINT_DIR, SAVING_FILE}


def scan(ws: Workspace, task_name: str, *, add: bool = False) -> ScanResult:
    """Files in a task that its manifest does not know; with `add`, checkpoint-like ones are added under new
    numbers, ordered as plain files are (`Task.adopt`: moved on a folder; on a bucket copied on the server,
    recorded, and only then the original deleted). Raises TaskNotFound, BusyError."""
    t = ws.task(task_name)
    if add:
        t.settle()  # what a killed import or scan --add staged goes back first, so that this run sees it
    else:
        t.take_in_save()  # as reads do: a killed save's file is its checkpoint, not a file to add
    result = ScanResult(t.name, *t.unknown_files())
    if add:
        candidates = [u for u in result.unknown if u.addable]
        if candidates:
            result.added, added = t.adopt(candidates)
            result.unknown = [u for u in result.unknown if u.rel not in added]
    return result


def adopt_files(t: Task, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
    """A folder's `Task.adopt`: the candidates still unknown under the lock, moved in under new numbers."""
    with t.lock():  # scanned again under the lock: a file can only be added while nothing else moves
        fresh = {u.rel for u in scan_folder(t.ws, t).unknown}
    candidates = [u for u in candidates if u.rel in fresh]
    found = [_found_of(u, t) for u in candidates]
    order_by_plain_name(found)
    hash_found(found)
    items = [_incoming(c) for c in found]
    added = t.add_existing(items, mode="move")
    t.refresh_cache()
    return added, {u.rel for u in candidates}


def _incoming(c: Found) -> Incoming:
    """What `Task.add_existing` is handed for a checkpoint found in a source (an import) or a task (scan --add)."""
    return Incoming(
        source=c.path,
        original_name=c.name,
        size=c.size,
        sha256=c.sha256,
        step=c.step,
        epoch=c.epoch,
        metrics=dict(c.metrics),
        created=_iso(c.mtime) if c.mtime else None,
        files=c.files,
        is_dir=c.is_dir,
        dev=c.dev,
    )


def _found_of(u: Unknown, t: Task) -> Found:
    name = escape_path(u.path.relative_to(t.folder).as_posix())
    base = u.path.name
    if u.kind == "dir":
        m = HF_DIR.fullmatch(base)
        if m:
            epoch, metrics = hf_metrics(_read_json(u.path / "trainer_state.json"), int(m.group(1)))
            return Found(
                u.path, name, is_dir=True, step=int(m.group(1)), epoch=epoch, metrics=metrics, mtime=_mtime(u.path)
            )
        step, epoch = step_epoch(base)
        return Found(u.path, name, is_dir=True, step=step, epoch=epoch, mtime=_mtime(u.path))
    if "=" in base:
        epoch, step, metrics = parse_lightning_name(base)
        return Found(u.path, name, epoch=epoch, step=step, metrics=metrics, mtime=_mtime(u.path), size=u.size)
    epoch, step = parse_plain_name(base)
    if COMPOSER_FILE.fullmatch(base):
        step, epoch = step_epoch(base)
    return Found(u.path, name, epoch=epoch, step=step, mtime=_mtime(u.path), size=u.size)


def _found(ws: Workspace, path: Path, into: list[Unknown]) -> None:
    """`path` described into `into`, unless it is gone (a temporary file renamed meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
        into.append(_unknown(ws, path))


def _unknown(ws: Workspace, path: Path) -> Unknown:
    st = os.stat(path, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        size = 0
        try:
            size = sum(s for _, s in fsutil.tree_files(path))
            from .formats import weights_file

            if folder_kind(path) is None:
                weights_file(path)
            addable = True
        except CkptError:
            addable = False  # its size stays what could be counted
        return Unknown(path, ws.rel(path), "dir", size, _iso(st.st_mtime), addable)
    addable = path.suffix in FILE_SUFFIXES and not path.is_symlink() and not path.name.startswith(".")
    return Unknown(path, ws.rel(path), "file", st.st_size, _iso(st.st_mtime), addable)


def scan_folder(ws: Workspace, t: Task) -> ScanResult:
    """What a folder task holds that its manifest does not know (a folder's `Task.unknown_files`). A save or
    import running meanwhile is no damage: a name gone by the time it is looked at is passed over, and a file
    recorded by the time the listing is done is known."""
    result = _scan_folder(ws, t)
    if result.unknown:  # a save may have recorded it meanwhile (between its rename and its record)
        known = {cp.file for cp in t.reload().checkpoints.values()}
        result.unknown = [u for u in result.unknown if u.rel.removeprefix(f"tasks/{t.name}/") not in known]
    return result


def _scan_folder(ws: Workspace, t: Task) -> ScanResult:
    known = {cp.file for cp in t.checkpoints}
    unknown: list[Unknown] = []
    temporary: list[Unknown] = []
    with os.scandir(t.folder) as it:
        top = sorted(it, key=lambda e: e.name)
    for e in top:
        if e.name in _OWNED or e.name.startswith((PENDING_PREFIX, IMPORT_MARKER_PREFIX, ".lock")):
            continue
        _found(ws, Path(e.path), temporary if e.name.startswith(".") else unknown)
    cdir = t.folder / CHECKPOINT_DIR
    if cdir.is_dir() and not cdir.is_symlink():
        with os.scandir(cdir) as it:
            inner = sorted(it, key=lambda e: e.name)
        for e in inner:
            if f"{CHECKPOINT_DIR}/{e.name}" in known:
                continue
            if e.name.startswith(".") and (e.name.endswith(".tmp") or e.name.startswith(STAGING_PREFIX)):
                _found(ws, Path(e.path), temporary)
            else:
                _found(ws, Path(e.path), unknown)
    return ScanResult(t.name, unknown, temporary)
