"""The rows `ckpt list` renders for a folder task, kept next to its manifest while nothing they show changed.

A row also shows whether its checkpoint is reached through a symlink: what `linked` found depends on the
checkpoints' folders, so each folder's mark (its inode and mtime, or its linked part) is kept with the rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .layout import LIST_CACHE_FILE
from .manifest import Checkpoint
from .row_caches import RowCache

if TYPE_CHECKING:
    from .task_reader import TaskReader


@dataclass(slots=True)
class CachedRows:
    """What `Task.keep_rows` kept: the text of every checkpoint's row, and which ones are reached through a symlink."""

    text: memoryview
    linked: list[tuple[int, str]]
    raw_index: memoryview

    def index(self) -> tuple[list[int], list[int]] | None:
        """(numbers, starts): the checkpoint numbers (ascending) and where each one's row starts in `text`."""
        return RowCache.parse_index(self.raw_index)


# a folder whose mtime is this recent may change again within the same timestamp (coarse clocks, FAT's 2 s):
# its scan is not kept
SETTLED_NS = 2_000_000_000


class ListRows:
    """The kept rows of one folder task (Task.linked, keep_rows, rows_before_appends and cached_rows)."""

    def __init__(self, folder: Path, manifest: Path, reader: TaskReader):
        self.folder = folder
        self.manifest = manifest
        self.reader = reader
        self.marks: dict[str, list[Any] | None] | None = None  # what the last `linked` depended on
        self.marks_of: list[Checkpoint] | None = None  # ... and the checkpoints it was given

    def linked(self, cps: list[Checkpoint]) -> list[tuple[Checkpoint, str]]:
        """The checkpoints of `cps` reached through a symlink, with the linked part; one scandir per folder."""
        folders: dict[str, tuple[str | None, set[str]]] = {}
        marks: dict[str, list[Any] | None] = {}
        out: list[tuple[Checkpoint, str]] = []
        for cp in cps:
            parent, _, name = cp.file.rpartition("/")
            if parent not in folders:
                through = fsutil.symlink_on_path(self.folder, parent) if parent else None
                names: set[str] = set()
                # the mark is taken before the scan: a change during or after it gives the folder a newer mtime
                marks[parent] = self.folder_mark(parent, through, settled=True)
                if through is None:
                    with contextlib.suppress(OSError), os.scandir(self.folder / parent) as it:
                        names = {e.name for e in it if e.is_symlink()}
                folders[parent] = (through, names)
            through, names = folders[parent]
            if through is not None:
                out.append((cp, through + "/"))
            elif name in names:
                out.append((cp, cp.file))
        self.marks, self.marks_of = marks, cps
        return out

    def folder_mark(self, parent: str, through: str | None, settled: bool = False) -> list[Any] | None:
        """What `linked` found for folder `parent` depends on: its symlinked part, else its inode and mtime.

        Making, removing or replacing an entry changes a folder's mtime, so an unchanged folder has the same
        symlinks. With `settled`, None for a folder changed too recently to tell a later change apart.
        """
        if through is not None:
            return ["link", through]
        try:
            st = os.lstat(self.folder / parent)
        except OSError:
            return ["none"]
        if settled and st.st_mtime_ns > time.time_ns() - SETTLED_NS:
            return None
        return ["dir", st.st_ino, st.st_mtime_ns]

    def keep(
        self,
        form: str,
        cps: list[Checkpoint],
        starts: list[int],
        text: bytes,
        linked: list[tuple[Checkpoint, str]],
    ) -> None:
        """Keep `text`, which holds the row of each of `cps` (every checkpoint, in number order), rendered as
        `form` names, at `starts`, with `linked`, which `linked(cps)` has just returned (the same list), for
        `cached_rows`. It is a derived file next to the manifest; failures are ignored."""
        marks = self.marks
        if not marks or any(m is None for m in marks.values()):
            return
        if cps is not self.marks_of:
            return  # the marks are of other checkpoints' folders
        extra = {"folders": marks, "linked": [[cp.number, link] for cp, link in linked]}
        numbers = [cp.number for cp in cps]
        RowCache(self.folder / LIST_CACHE_FILE).store(self.reader, form, numbers, starts, text, extra)

    def before_appends(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, when the manifest only grew since: the rows of the checkpoints it had
        then, which have not changed (their `linked` is not kept: folders change when files are added)."""
        got = RowCache(self.folder / LIST_CACHE_FILE).load(self.manifest, form, grown=True)
        return None if got is None else CachedRows(got[0], [], got[1])

    def cached(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, while the manifest and the checkpoints' folders are unchanged since;
        else None."""
        got = RowCache(self.folder / LIST_CACHE_FILE).load(self.manifest, form)
        if got is None:
            return None
        text, raw_index, extra = got
        try:
            for parent, mark in extra["folders"].items():
                through = fsutil.symlink_on_path(self.folder, parent) if parent else None
                if self.folder_mark(parent, through) != mark:
                    return None
            linked = [(int(n), str(link)) for n, link in extra["linked"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return CachedRows(text, linked, raw_index)
