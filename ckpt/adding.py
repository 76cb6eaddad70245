"""Adding files and folders to a folder task as they are (`Task.add_existing`: import, scan --add): staged under
a marker, placed under new numbers by link, reflink, copy or move, then recorded in one append."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from . import fsutil, hashing, placing
from .errors import (
    CkptError,
    ConflictError,
    IntegrityError,
    UsageError,
)
from .manifest import (
    Checkpoint,
    record_bytes,
)
from .timeutil import now_iso

if TYPE_CHECKING:
    from .staging import Marker
    from .task import FolderTask

from .layout import (
    CHECKPOINT_DIR,
    STAGING_PREFIX,
    Incoming,
)

T = TypeVar("T")


def add_existing(
    task: FolderTask, items: list[Incoming], *, mode: str = "link", unique: bool = False
) -> list[Checkpoint]:
    """Add files or folders that already exist (import, scan --add) as new checkpoints, in order.

    With `unique`, an item whose sha256 and size a record already has (checked under the lock, so two
    imports at once do not both add it) is left out.

    `mode` is "link" (hard link, else reflink, else copy), "copy" or "move"; the source is never
    modified except by "move". Each item's size and sha256 are known (hashed by the caller); a copy
    that does not match them raises IntegrityError. Returns the new records. Raises ConflictError
    when the task is not running, BusyError when its lock is taken.

    Whatever is staged is named first in a marker (ckpt.staging), so that a kill at any point leaves
    each source in its place, recorded, or where the next lock of the task (or `ckpt doctor`) puts it back.
    """
    if mode not in ("link", "copy", "move"):
        raise UsageError(f"unknown mode {mode!r}", hint="use link, copy or move")
    if not items:
        return []
    cdir = task.folder / CHECKPOINT_DIR
    task.refuse_links()  # files are staged in checkpoints/ before the lock is taken
    fsutil.make_dirs(cdir)
    # copying happens outside the lock, under temporary names, as in _commit_new; a file that can be
    # hard-linked is linked straight to its numbered name under the lock (a link is never half-made)
    cdev = os.stat(cdir).st_dev
    plan = [
        (item, None if mode == "link" and not item.is_dir and item.dev == cdev else cdir / _staging_name())
        for item in items
    ]
    marker = _stage_marker(task, plan, mode == "move")
    staged: list[tuple[Incoming, Path, str]] = []
    added: list[Checkpoint] = []
    stuck = False
    try:
        for item, tmp in plan:
            if tmp is None:
                staged.append((item, item.source, "direct"))
                continue
            if item.source.is_dir():
                listed = [(r, n) for r, n, _ in item.files] if item.files is not None else None
                how = placing.place_tree_new(item.source, tmp, mode, listed)
            else:
                how = placing.place_new(item.source, tmp, mode)
            staged.append((item, tmp, how))
            if how == "copy":
                _check_copy(item, tmp)
        with task.lock():
            state = task.state()
            if state.header.status != "running":
                raise ConflictError(
                    f"task '{task.name}' is {state.header.status}; it takes no new checkpoints",
                    hint="import into a new task with --task",
                )
            if unique:
                have = {(cp.sha256, cp.size) for cp in state.checkpoints.values()}
                for x in [x for x in staged if (x[0].sha256, x[0].size) in have]:
                    staged.remove(x)
                    _unstage(x)
                    stuck |= x[2] == "move" and os.path.lexists(x[1])  # not put back: the marker stays
            number = state.max_number
            placed: list[Checkpoint] = []
            renamed: list[tuple[str, str | Path]] = []
            committed = -1  # the manifest's size once the records are in it
            try:
                _place_locked(task, staged, cdir, number, placed, renamed)
                fsutil.fsync_dir(cdir)
                # records are appended (in one write) only once every file is in place; a crash between
                # leaves numbered files without records, which `ckpt scan TASK --add` takes back in
                chunks = [record_bytes_fast(cp) for cp in placed]
                blob = b"".join(chunks)
                committed = os.stat(task.manifest).st_size + len(blob)
                after = fsutil.append_durably(task.manifest, blob)
            except BaseException:
                if os.stat(task.manifest).st_size == committed:
                    raise  # an interrupt after the records landed: they name the files, which stay
                for target, back in reversed(renamed):  # nothing was recorded: back to the staging names
                    with contextlib.suppress(OSError, CkptError):
                        if back == target:
                            os.unlink(target)  # a direct link: the source still has the bytes
                        else:
                            fsutil.move_noreplace(target, back)
                raise
            for cp, data in zip(placed, chunks, strict=True):
                task.note_append(cp, data, after)
            added = placed
    finally:
        for item, tmp, how in staged:
            if how == "direct" or not os.path.lexists(tmp):
                continue
            if how == "move":  # not committed: put the source back (if that fails, the marker stays)
                try:
                    fsutil.move_noreplace(tmp, item.source)
                except (OSError, CkptError):
                    stuck = True
                continue
            fsutil.remove_tree(tmp)
        done = {id(x[0]) for x in staged}
        for item, tmp in plan:  # an item cut off while it was being staged (a folder half copied)
            if tmp is None or id(item) in done or not os.path.lexists(tmp):
                continue
            if mode == "move" and not os.path.lexists(item.source):
                try:
                    fsutil.move_noreplace(tmp, item.source)
                except (OSError, CkptError):
                    stuck = True
            else:
                fsutil.remove_tree(tmp)
        if marker is not None:
            marker.done(keep=stuck)
    for item, _, how in staged:
        if mode == "move" and how != "move":
            fsutil.remove_tree(item.source)  # moved across file systems: the source goes once committed
    return added


def _stage_marker(task: FolderTask, plan: list[tuple[Incoming, Path | None]], move: bool) -> Marker | None:
    """The marker naming what `plan` stages (ckpt.staging), written and held; None when nothing is staged."""
    staged = [(item, tmp) for item, tmp in plan if tmp is not None]
    if not staged:
        return None
    from .staging import Marker, StagedItem

    listed = []
    for item, tmp in staged:
        st = os.lstat(item.source) if move else None
        listed.append(StagedItem(tmp.name, item.source, move, st.st_dev if st else -1, st.st_ino if st else -1))
    return Marker.write(task.folder, listed)


def _place_locked(
    task: FolderTask,
    staged: list[tuple[Incoming, Path, str]],
    cdir: Path,
    number: int,
    placed: list[Checkpoint],
    renamed: list[tuple[str, str | Path]],
) -> None:
    """Rename staged files to their numbers (caller holds the lock), filling `placed` and `renamed`."""
    folder = os.fspath(cdir)  # plain strings: a Path per file costs more than its link() on large imports
    for item, tmp, how in staged:
        ext = "" if item.is_dir else _suffix(item.original_name)
        number += 1
        while True:
            name = f"{number:06d}{ext}"
            target = f"{folder}/{name}"
            back: str | Path = tmp
            try:
                if how == "direct":
                    how = _link_or_copy_locked(item.source, target)
                    back = target  # on failure there is nothing to put back: the new name goes
                else:
                    how = "staged"
                    renamed.append((target, back))  # first: an interrupt right after the rename still undoes it
                    try:
                        fsutil.move_noreplace(tmp, target)
                    except ConflictError:
                        renamed.pop()
                        raise
                break
            except ConflictError:
                number += 1  # a file without a record: never reuse its number
        if how != "staged":
            renamed.append((target, back))
        if how == "copy":  # the link was refused and the copy made under the lock must match the hash
            _check_copy(item, Path(target))
        placed.append(
            Checkpoint(
                number=number,
                file=f"{CHECKPOINT_DIR}/{name}",
                size=item.size,
                sha256=item.sha256,
                created=item.created or now_iso(),
                step=item.step,
                epoch=item.epoch,
                metrics=dict(item.metrics),
                original_name=item.original_name,
                task=task.name,
            )
        )


def _staging_name() -> str:
    return f"{STAGING_PREFIX}{os.urandom(6).hex()}"


def _link_or_copy_locked(src: Path, target: str) -> str:
    """Hard-link `src` as `target`; where the link is refused, copy (ConflictError when `target` exists)."""
    try:
        placing.link_new(src, target)
        return "direct"
    except FileExistsError:
        raise ConflictError(f"'{target}' already exists", path=target) from None
    except OSError:
        return placing.place_new(src, Path(target), "link")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_STRING = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': written as is


def record_bytes_fast(cp: Checkpoint) -> bytes:
    """record_bytes(cp), byte for byte, without tomli-w's per-character escaping (much faster on imports of
    thousands); anything unusual (quoted keys, escapes, NaN) goes through tomli-w."""
    name = cp.original_name
    if (
        type(cp.number) is not int
        or type(cp.size) is not int
        or (cp.step is not None and type(cp.step) is not int)
        or (cp.epoch is not None and type(cp.epoch) is not int)
        or not _PLAIN_STRING.fullmatch(f"{cp.file}{cp.sha256}{cp.created}{name or ''}")
    ):
        return record_bytes(cp)
    text = f'\n[[checkpoints]]\nnumber = {cp.number}\nfile = "{cp.file}"\n'
    if cp.step is not None:
        text += f"step = {cp.step}\n"
    if cp.epoch is not None:
        text += f"epoch = {cp.epoch}\n"
    text += f'size = {cp.size}\nsha256 = "{cp.sha256}"\ncreated = "{cp.created}"\n'
    if name is not None:
        text += f'original_name = "{name}"\n'
    if cp.metrics:
        text += "\n[checkpoints.metrics]\n"
        for mk, mv in cp.metrics.items():
            lit = literal(mv)
            if lit is None or not _BARE_KEY.fullmatch(mk):
                return record_bytes(cp)
            text += f"{mk} = {lit}\n"
    return text.encode()


def _unstage(staged: tuple[Incoming, Path, str]) -> None:
    """Undo the staging of an item that turned out to be recorded already."""
    item, tmp, how = staged
    if how == "move":
        with contextlib.suppress(OSError, CkptError):
            fsutil.move_noreplace(tmp, item.source)
    elif how != "direct":
        fsutil.remove_tree(tmp)


def _suffix(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return ext if 1 < len(ext) <= 20 and ext[1:].replace("_", "").isalnum() else ""


def _check_copy(item: Incoming, copied: Path) -> None:
    """A copy must hold the bytes that were hashed: the source may have changed in between."""
    if copied.is_dir():
        files = fsutil.tree_files(copied)
        digests = hashing.sha256_many([copied / rel for rel, _ in files])
        pairs = [(rel, d) for (rel, _), d in zip(files, digests, strict=True) if isinstance(d, str)]
        ok = len(pairs) == len(files) and hashing.tree_digest(pairs) == item.sha256
    else:
        ok = hashing.sha256_file(copied) == item.sha256
    if not ok:
        raise IntegrityError(f"'{item.source}' changed while it was being imported", path=item.source)


def literal(value: object) -> str | None:
    """The TOML literal tomli-w writes for a plain int, finite float or simple ASCII string; None otherwise."""
    if isinstance(value, str):
        return f'"{value}"' if _PLAIN_STRING.fullmatch(value) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None
