"""The marker of an import's staging (Task.add_existing), which lets a killed import be finished or undone.

An import (or `scan --add`) first puts each item that is not hard-linked straight to its number under a
hidden staging name in `checkpoints/` (`.import-<hex>`), outside the task lock: a copy, a link, or with
`--move` the source itself, renamed. Before the first of them it writes the marker
`tasks/<task>/.importing-<hex>`, which names each staging name and where its item came from (for a move,
with the source's device and inode), and it holds an flock on the marker until it is done. Under the task
lock the staged items are renamed to their numbers and their records appended; then what is left staged
is cleaned up (a moved source goes back) and the marker removed.

A marker that nobody holds is what a killed import left. The next lock of the task, a read-only command
(`Task.settle`) and `ckpt doctor` read it, under the task lock, item by item:

- its staging name is still there: a moved source goes back to its original name, anything else (a copy
  or a link of a source that is still where it was) is deleted;
- a moved source that is at a number no record names (killed between that rename and the append) goes
  back to its original name; at a number a record names, it was committed: nothing to do.

Then the marker goes. A source whose original name is taken again stays where it is and the marker stays,
so that doctor keeps reporting it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import fsutil
from .errors import CkptError
from .pathtext import escape_path, unescape_name

if TYPE_CHECKING:
    from .trash_results import Repair

MARKER_PREFIX = ".importing-"  # workspace.IMPORT_MARKER_PREFIX (this module is imported only when needed)
STAGING_PREFIX = ".import-"  # workspace.STAGING_PREFIX
MARKER_VERSION = 1


@dataclass(slots=True)
class StagedItem:
    """One item of an import as its marker names it."""

    staging: str  # the name in checkpoints/
    source: Path
    move: bool  # the source itself may be renamed to the staging name (--move, --add)
    dev: int = -1  # the source's device and inode, for a move
    ino: int = -1


class Marker:
    """A marker written and held (flock) by the import that is running."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def write(cls, folder: Path, items: list[StagedItem]) -> Marker:
        """Write the marker of `items` into task folder `folder`, held until `done`; raises OSError."""
        doc = {
            "version": MARKER_VERSION,
            "items": [
                {"staging": i.staging, "source": escape_path(i.source), "move": i.move, "dev": i.dev, "ino": i.ino}
                for i in items
            ],
        }
        path = folder / f"{MARKER_PREFIX}{os.urandom(6).hex()}"
        tmp = fsutil.temp_path(folder, path.name)
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
        try:
            # held and complete before it has its name: a recovery never sees a marker whose import still runs
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = memoryview(json.dumps(doc).encode())
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
            os.rename(tmp, path)
            fsutil.fsync_dir(folder)  # the marker is durable before anything is staged
        except BaseException:
            os.close(fd)
            fsutil.remove_file(tmp)
            raise
        return cls(path, fd)

    def done(self, keep: bool = False) -> None:
        """Remove the marker (unless `keep`: something staged could not be cleaned up) and let it go."""
        try:
            if not keep:
                fsutil.remove_file(self.path)
        finally:
            os.close(self.fd)


def markers_in(folder: Path) -> list[Path]:
    """The import markers in task folder `folder`, live or not."""
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if e.name.startswith(MARKER_PREFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _open_marker(marker: Path) -> int:
    """A descriptor of the marker file; OSError for anything but a regular file (a FIFO must not hang us)."""
    fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(marker))
    return fd


@contextlib.contextmanager
def _held(marker: Path) -> Iterator[int | None]:
    """The marker's descriptor with its flock taken, or None when its import is still running (or it is gone)."""
    try:
        fd = _open_marker(marker)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def abandoned(markers: list[Path]) -> list[Path]:
    """Those of `markers` that no running import holds."""
    out = []
    for m in markers:
        with _held(m) as fd:
            if fd is not None:
                out.append(m)
    return out


def _items(fd: int) -> list[StagedItem] | None:
    """The items a marker names, or None when it is unreadable (torn: nothing was staged after it)."""
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            doc = json.loads(f.read(1 << 24))
        out = []
        for d in doc["items"]:
            staging = d["staging"]
            if not (isinstance(staging, str) and staging.startswith(STAGING_PREFIX) and "/" not in staging):
                return None
            out.append(StagedItem(staging, Path(unescape_name(str(d["source"]))), bool(d["move"]), d["dev"], d["ino"]))
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover(
    marker: Path,
    cdir: Path,
    recorded: set[str],
    rel: Callable[[Path], str],
    *,
    dry_run: bool = False,
) -> list[Repair]:
    """Finish or undo the import that left `marker` (see the module); the caller holds the task lock.

    `recorded` holds the `file` of every record of the task. Returns what was found and done; an empty list
    when the marker's import is still running.
    """
    from .trash_results import Repair

    repairs: list[Repair] = []
    with _held(marker) as fd:
        if fd is None:
            return []
        items = _items(fd)
        if items is None:
            # a marker is written whole before anything is staged (temp name, then rename): an unreadable one
            # is damaged by hand; what it named, if anything, is reported below as a staging leftover
            repairs.append(
                Repair(rel(marker), "an unreadable import marker", "would remove it" if dry_run else "removed")
            )
            if not dry_run:
                fsutil.remove_file(marker)
            return repairs
        stuck = False
        by_inode: dict[int, str] | None = None
        temps = _temp_files(cdir)
        for item in items:
            staged = cdir / item.staging
            for temp in temps.get(item.staging, []):  # a copy cut off before it had its staging name
                repairs.append(
                    Repair(
                        rel(temp),
                        "a part-written copy of an interrupted import",
                        "would delete it" if dry_run else "deleted",
                    )
                )
                if not dry_run:
                    fsutil.remove_file(temp)
            try:
                st = os.lstat(staged)
            except FileNotFoundError:
                st = None
            if st is not None:
                # the moved source itself; or anything, where the source is gone: never delete the only copy
                if (item.move and (st.st_dev, st.st_ino) == (item.dev, item.ino)) or not os.path.lexists(item.source):
                    ok = _put_back(staged, item.source, dry_run)
                    stuck |= not ok
                    repairs.append(_back(rel(staged), item.source, ok, dry_run))
                else:
                    repairs.append(
                        Repair(
                            rel(staged),
                            "a copy an interrupted import left (its source is where it was)",
                            "would delete it" if dry_run else "deleted",
                        )
                    )
                    if not dry_run:
                        fsutil.remove_tree(staged)
                continue
            if not item.move or os.path.lexists(item.source):
                continue  # never staged, or staged and put back
            if by_inode is None:
                by_inode = _names_by_inode(cdir, st_dev=item.dev)
            name = by_inode.get(item.ino)
            if name is None or f"{cdir.name}/{name}" in recorded:
                continue  # committed (its record names it); or gone on since (trashed, say)
            ok = _put_back(cdir / name, item.source, dry_run)
            stuck |= not ok
            repairs.append(_back(rel(cdir / name), item.source, ok, dry_run, numbered=True))
        if not repairs:
            repairs.append(
                Repair(
                    rel(marker),
                    "the marker of an interrupted import (nothing left to undo)",
                    "would remove it" if dry_run else "removed",
                )
            )
        if not dry_run and not stuck:
            fsutil.remove_file(marker)
            fsutil.fsync_dir(marker.parent)
    return repairs


def _temp_files(cdir: Path) -> dict[str, list[Path]]:
    """fsutil.temp_path's files for staging names (`.<staging name>.<random>.tmp`), by staging name."""
    out: dict[str, list[Path]] = {}
    try:
        with os.scandir(cdir) as it:
            for e in it:
                if e.name.startswith("." + STAGING_PREFIX) and e.name.endswith(".tmp"):
                    staging = "." + e.name[2:].split(".", 1)[0]  # `..import-<hex>.<random>.tmp`
                    out.setdefault(staging, []).append(Path(e.path))
    except OSError:
        pass
    return out


def _names_by_inode(cdir: Path, st_dev: int) -> dict[int, str]:
    try:
        if os.stat(cdir).st_dev != st_dev:
            return {}
        with os.scandir(cdir) as it:
            return {e.inode(): e.name for e in it}
    except OSError:
        return {}


def _put_back(path: Path, source: Path, dry_run: bool) -> bool:
    """Move `path` back to `source` (never over something); whether it is (or, on a dry run, can be) there."""
    if dry_run:
        return not os.path.lexists(source)
    try:
        fsutil.make_dirs(source.parent)
        fsutil.move_noreplace(path, source)
    except (CkptError, OSError):
        return False
    return True


def _back(path: str, source: Path, ok: bool, dry_run: bool, numbered: bool = False) -> Repair:
    from .trash_results import Repair

    what = (
        "a moved file an interrupted import had numbered but not recorded"
        if numbered
        else "a moved file an interrupted import left staged"
    )
    shown = escape_path(source)
    if ok:
        return Repair(path, what, f"would move it back to {shown}" if dry_run else f"moved it back to {shown}")
    return Repair(path, what, f"left alone: {shown} exists; move it back by hand, then run: ckpt doctor")


def leftovers(cdir: Path, claimed: set[str]) -> list[Path]:
    """Staging names in `cdir` that no marker names (an older ckpt's kill, or a marker removed by hand)."""
    try:
        with os.scandir(cdir) as it:
            return sorted(Path(e.path) for e in it if e.name.startswith(STAGING_PREFIX) and e.name not in claimed)
    except (FileNotFoundError, NotADirectoryError):
        return []


def claimed_names(markers: list[Path]) -> set[str]:
    """The staging names that `markers` name (live ones included)."""
    out: set[str] = set()
    for m in markers:
        try:
            fd = _open_marker(m)
        except OSError:
            continue
        try:
            out.update(i.staging for i in _items(fd) or [])
        finally:
            os.close(fd)
    return out
