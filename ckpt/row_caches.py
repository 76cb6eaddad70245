"""The derived caches of `ckpt tasks` and `ckpt list`: rendered rows and summaries, each kept with the
fingerprint (or stat) of the manifest it came from; never the source of truth."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from . import fsutil
from .task_reader import CACHE_VERSION, TaskReader, fingerprint, unchanged

TASK_ROWS_VERSION = 2


class _PerTask:
    """A JSON file `{"v": version, <kind>: what, "tasks": {name: entry}}`: one entry per task of the workspace.

    A file of another version, kind or form is not used; writing it replaces it atomically, and a failure is
    ignored (it is only a cache).
    """

    version = 0
    kind = ""

    def __init__(self, path: Path, what: Any):
        self.path = path
        self.what = what
        self.entries: dict[str, Any] = {}
        self._changed = False
        try:
            raw = json.loads(fsutil.read_own(path))
            if raw.get("v") == self.version and raw.get(self.kind) == what and isinstance(raw["tasks"], dict):
                self.entries = raw["tasks"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def save(self, names: list[str]) -> None:
        """Write the cache, keeping the tasks in `names` only; failures are ignored (it is only a cache)."""
        keep = set(names)
        if set(self.entries) - keep:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
            self._changed = True
        if not self._changed:
            return
        doc = {"v": self.version, self.kind: self.what, "tasks": self.entries}
        try:
            fsutil.atomic_write_nosync(self.path, json.dumps(doc, separators=(",", ":")).encode())
            self._changed = False
        except (OSError, ValueError, TypeError):
            pass


class SummaryCache(_PerTask):
    """`ckpt tasks`'s rows, kept by the fingerprint of the manifest each came from; never the source of truth.

    Reading 1,000 per-task caches costs more than ckpt's start-up, so `Workspace.tasks` keeps every
    task's summary in one file, with the manifest's (inode, size, mtime, last 64 bytes) from the read
    that produced it. A row is used only while its manifest still has that fingerprint: saving appends
    (size and mtime change) and every other change replaces the file (new inode), as TaskReader relies
    on. Each entry is consistent on its own, so concurrent writers, a lost or torn write (it is
    replaced atomically) or a stale copy can only cost a re-read, never a wrong row.
    """

    version = CACHE_VERSION
    kind = "fields"

    def __init__(self, path: Path, fields: tuple[str, ...]):
        super().__init__(path, list(fields))

    def get(self, name: str, manifest: Path | str) -> dict[str, Any] | None:
        """The summary of task `name` when its manifest is unchanged since it was cached, else None."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict):
            return None
        summary = entry.get("row")
        if not isinstance(summary, dict) or not unchanged(manifest, entry):
            return None
        return summary

    def put(self, name: str, reader: TaskReader, summary: dict[str, Any]) -> None:
        """Keep `summary`, which was made from what `reader` last read."""
        mark = fingerprint(reader)
        if mark is None:
            return
        self.entries[name] = {**mark, "row": summary}
        self._changed = True


class TaskRowsCache(_PerTask):
    """Each task's row of `ckpt tasks --json` as rendered text, kept with the `stat` of the manifest it came from;
    never the source of truth.

    An entry is `[inode, size, mtime in ns, ctime in ns, text]`, so one `stat` of a manifest checks it. Every
    change of a file gives it the current time as its ctime, which nothing can set back: the caller keeps only
    rows of manifests unchanged for a while (a later change then gets another ctime even on a coarse clock),
    taking the `stat` before reading the manifest. `form` names how the text was rendered. A stale, foreign or
    damaged entry or file only costs a re-read.
    """

    version = TASK_ROWS_VERSION
    kind = "form"

    def get(self, name: str, st: os.stat_result) -> str | None:
        """The text kept for task `name` when its manifest's `st` is the one it was kept with, else None."""
        entry = self.entries.get(name)
        if type(entry) is not list or len(entry) != 5:
            return None
        ino, size, mtime, ctime, text = entry
        if ino != st.st_ino or size != st.st_size or mtime != st.st_mtime_ns or ctime != st.st_ctime_ns:
            return None
        return text if type(text) is str else None

    def put(self, name: str, st: os.stat_result, text: str) -> None:
        """Keep `text`, rendered from the manifest read after `st` was taken."""
        self.entries[name] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, text]
        self._changed = True

    def drop(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self._changed = True


# --- rendered rows of one task ----------------------------------------------------------------------

ROWS_VERSION = 3


class RowCache:
    """Rendered text of every checkpoint of a task (`ckpt list --json`), kept with the `fingerprint` of the manifest
    it came from; never the source of truth.

    Records are immutable once written, so their text stays right while the manifest is unchanged (and the
    text of the ones it had, while it only grows). The file is the CRC-32 of the rest (8 hex digits and a
    newline), a JSON header line (the fingerprint, the form of the rows, whatever the caller keeps with the
    text), a JSON index line (the checkpoint numbers and where each one's row starts in the text: parsed only
    when asked for), then the text. A stale, foreign, torn or damaged file is not used.
    """

    def __init__(self, path: Path):
        self.path = path

    def load(
        self, manifest: Path, form: str, grown: bool = False
    ) -> tuple[memoryview, memoryview, dict[str, Any]] | None:
        """(text, index, extra) as kept by `store` with the same `form`, when `manifest` is unchanged since (with
        `grown`: or only grew by appended records); else None. `index` is for `parse_index`."""
        try:
            data = fsutil.read_own(self.path)
            view = memoryview(data)
            if data[8:9] != b"\n" or int(data[:8], 16) != zlib.crc32(view[9:]):
                return None
            head_end = data.index(b"\n", 9)
            index_end = data.index(b"\n", head_end + 1)
            header = json.loads(view[9:head_end].tobytes())
            extra = header["extra"]
            if header["v"] != ROWS_VERSION or header["form"] != form or not isinstance(extra, dict):
                return None
            if not unchanged(manifest, header["manifest"], grown):
                return None
            return view[index_end + 1 :], view[head_end + 1 : index_end], extra
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    @staticmethod
    def parse_index(index: memoryview) -> tuple[list[int], list[int]] | None:
        """(numbers, starts) from `load`'s index: ascending numbers and each row's offset; None if malformed."""
        try:
            doc = json.loads(index.tobytes())
            numbers, starts = doc["numbers"], doc["starts"]
            if not isinstance(numbers, list) or not isinstance(starts, list) or len(numbers) != len(starts):
                return None
            if not all(type(n) is int for n in numbers) or not all(map(int.__lt__, numbers, numbers[1:])):
                return None  # numbers are looked up by bisection: ascending integers only
            if not all(type(n) is int for n in starts):
                return None
            return numbers, starts
        except (ValueError, KeyError, TypeError):
            return None

    def store(
        self,
        reader: TaskReader,
        form: str,
        numbers: list[int],
        starts: list[int],
        text: bytes,
        extra: dict[str, Any],
    ) -> None:
        """Keep `text`, holding one row per checkpoint number of `numbers` (ascending) at `starts`, made from what
        `reader` last read; `form` names how the rows were rendered (a change of rendering must change it).
        Failures are ignored (it is only a cache)."""
        mark = fingerprint(reader)
        if mark is None or len(starts) != len(numbers):
            return
        header = {"v": ROWS_VERSION, "manifest": mark, "form": form, "extra": extra}
        index = {"numbers": numbers, "starts": starts}
        try:
            rest = b"\n".join([json.dumps(doc, separators=(",", ":")).encode() for doc in (header, index)] + [text])
            fsutil.atomic_write_nosync(self.path, b"%08x\n" % zlib.crc32(rest) + rest)
        except (OSError, ValueError, TypeError):
            pass
