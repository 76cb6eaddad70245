"""Reading a task manifest incrementally, with the JSON cache beside it, and the fingerprints that tell
whether a manifest changed since it was read."""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import CkptError, ManifestError
from .manifest import (
    COLUMNS,
    FORMAT,
    REPAIR_HINT,
    Checkpoint,
    TaskHeader,
    TaskState,
    all_plain,
    check_files,
    parse_task,
    parse_toml,
    record_file_problem,
    records_in,
)

_FINGERPRINT = 64
_HEAD = 128  # the first bytes kept: `format` and `revision` come first in every manifest ckpt writes
_REVISION = b'\nrevision = "'
CACHE_VERSION = 6  # 6: the header may hold a [policy]; an older ckpt must not take it from a cache without one


@dataclass(slots=True)
class _Seen:
    ino: int
    size: int
    tail: bytes  # the last 64 bytes read
    crc: int  # CRC-32 of the first `size` bytes
    head: bytes  # the first 128 bytes (fewer in a smaller file)
    mtime: int = -1  # st_mtime_ns and st_ctime_ns when it was read: a same-size edit in place changes them
    ctime: int = -1

    def appended(self, data: bytes, st: os.stat_result) -> _Seen:
        """What is seen once `data` is appended, `st` being the file's stat after it."""
        tail = (self.tail + data)[-_FINGERPRINT:]
        crc = zlib.crc32(data, self.crc)
        return _Seen(self.ino, self.size + len(data), tail, crc, self.head, st.st_mtime_ns, st.st_ctime_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "ino": self.ino,
            "size": self.size,
            "mtime": self.mtime,
            "ctime": self.ctime,
            "tail": self.tail.hex(),
            "crc": self.crc,
            "head": self.head.hex(),
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> _Seen:
        """The inverse of `to_json`; raises KeyError, TypeError or ValueError for anything else."""
        ino, size, crc, mtime, ctime = (doc[k] for k in ("ino", "size", "crc", "mtime", "ctime"))
        if any(type(v) is not int for v in (ino, size, crc, mtime, ctime)):
            raise TypeError("not an integer")
        return _Seen(ino, size, bytes.fromhex(doc["tail"]), crc, bytes.fromhex(doc["head"]), mtime, ctime)


def _same_prefix(fd: int, seen: _Seen) -> bool:
    """Whether the open manifest's first `seen.size` bytes are still those `seen` describes (same inode assumed).

    A manifest that ckpt wrote whole has a random `revision` near its start, new at every such write, and
    appends never touch it: the same first bytes and the same last bytes mean the same file, checked in
    two small reads. A manifest without one (written by another tool) is checked by the CRC-32 of all
    those bytes.
    """
    if len(seen.head) > seen.size or len(seen.tail) > seen.size:
        return False  # not what a read of `size` bytes gives (a damaged or lying cache)
    if os.pread(fd, len(seen.head), 0) != seen.head:
        return False
    if os.pread(fd, len(seen.tail), seen.size - len(seen.tail)) != seen.tail:
        return False
    if _REVISION in seen.head:
        return True
    prefix = TaskReader._read_from(fd, 0, seen.size)
    return len(prefix) == seen.size and zlib.crc32(prefix) == seen.crc


class TaskReader:
    """Reads a task manifest, re-parsing only what was appended since the last read.

    Saving appends `[[checkpoints]]` tables, and every other change replaces the file, so a file with
    the same inode whose bytes up to the size we saw are unchanged only grew: parsing the appended
    bytes alone is enough. The inode and the last bytes alone do not show "unchanged": a replacement
    often gets the inode number its predecessor freed, and a manifest rewritten with other records of
    the same total length ends with the same latest record (a trash and a restore in turn did this,
    and the stale state went into the next rewrite: records lost). So every whole write carries a
    new random `revision`, and `_same_prefix` compares the first bytes too. The JSON cache next to
    the manifest holds the same state between processes; it is never the source of truth.
    """

    def __init__(self, manifest: Path, cache: Path | None, task: str):
        self.manifest = manifest
        self.cache = cache
        self.task = task
        self.state: TaskState | None = None
        self._seen: _Seen | None = None
        self._changed = False

    def read(self, use_cache: bool = True) -> TaskState:
        try:
            fd = fsutil.open_own(self.manifest)
        except FileNotFoundError:
            raise ManifestError(f"task manifest {self.manifest} is missing", path=self.manifest) from None
        except CkptError:
            raise  # a FIFO or device in its place (NotRegularFile is an OSError too)
        except OSError as e:
            raise ManifestError(f"cannot read {self.manifest}: {e.strerror}", path=self.manifest) from None
        try:
            st = os.fstat(fd)
            if self.state is None and use_cache and self.cache is not None:
                self._load_cache()
            seen = self._seen
            if self.state is not None and seen is not None and seen.ino == st.st_ino and st.st_size >= seen.size:
                # the same size with another mtime or ctime is an edit in place (or a touch): read it all again
                edited = st.st_size == seen.size and (st.st_mtime_ns, st.st_ctime_ns) != (seen.mtime, seen.ctime)
                if not edited and _same_prefix(fd, seen):
                    if st.st_size == seen.size:
                        return self.state
                    grown = self._read_from(fd, seen.size)
                    self._extend(grown, st)
                    return self.state
            data = self._read_from(fd, 0)
        finally:
            os.close(fd)
        if not data.strip():
            raise ManifestError(f"task manifest {self.manifest} is empty", path=self.manifest)
        self.state = None  # a manifest that does not parse leaves nothing of an older read behind
        self._seen = None
        state = parse_task(data, self.manifest, self.task)
        self.state = state
        self._seen = _Seen(
            st.st_ino, len(data), data[-_FINGERPRINT:], zlib.crc32(data), data[:_HEAD], st.st_mtime_ns, st.st_ctime_ns
        )
        self._changed = True
        return state

    @staticmethod
    def _read_from(fd: int, offset: int, end: int | None = None) -> bytes:
        """The bytes from `offset` to the end of the file (or to `end`)."""
        chunks = []
        while end is None or offset < end:
            b = os.pread(fd, 1 << 20 if end is None else min(1 << 20, end - offset), offset)
            if not b:
                break
            chunks.append(b)
            offset += len(b)
        return b"".join(chunks)

    def _extend(self, grown: bytes, st: os.stat_result) -> None:
        assert self.state is not None and self._seen is not None
        doc = parse_toml(grown, self.manifest)
        if set(doc) - {"checkpoints"}:
            # something other than appended checkpoints: read it all again
            self.state = None
            self._seen = None
            self.read(use_cache=False)
            return
        new = records_in(doc, self.manifest, self.task)
        for n in new:
            if n in self.state.checkpoints:
                raise ManifestError(
                    f"{self.manifest}: checkpoint {n} is recorded twice", path=self.manifest, hint=REPAIR_HINT
                )
        merged = {**self.state.checkpoints, **new}
        check_files(merged.values(), self.manifest)  # before anything is kept: a refused read changes nothing
        self.state.checkpoints = merged
        self._seen = self._seen.appended(grown, st)  # the same inode (read() checked), grown by `grown`
        self._changed = True

    def note_append(self, cp: Checkpoint, appended: bytes, st: os.stat_result) -> None:
        """Record that this process appended `appended` (the record of `cp`) to the manifest it last read; `st` is
        the manifest's stat after the append (fsutil.append_durably's)."""
        assert self.state is not None and self._seen is not None
        self.state.checkpoints[cp.number] = cp
        self._seen = self._seen.appended(appended, st)
        self._changed = True

    def forget(self) -> None:
        self.state = None
        self._seen = None

    # -- the JSON cache --

    def _load_cache(self) -> None:
        assert self.cache is not None
        self._changed = False
        # the cache is other people's input as much as the manifest: every value is checked as a manifest's
        # would be, and read() then checks its key against the manifest; a cache failing either is not used
        # (and is rewritten by the next save_cache)
        try:
            raw = json.loads(fsutil.read_own(self.cache))
            if raw.get("v") != CACHE_VERSION:
                return
            cols = raw["checkpoints"]
            # columns load several times faster than one object per checkpoint (benchmarks/README.md)
            columns = [cols[k] for k in COLUMNS]
            if any(not isinstance(c, list) or len(c) != len(columns[0]) for c in columns) or not _valid_columns(
                columns
            ):
                return
            numbers = columns[0]
            made = map(Checkpoint, *columns, repeat(self.task, len(numbers)))
            cps = dict(zip(numbers, made, strict=True))
            if len(cps) != len(numbers):
                return
            files = columns[1]
            if len(set(files)) != len(files) or not all_plain(files):  # else: distinct plain names, all valid
                if any(record_file_problem(f) is not None for f in files):
                    raise ManifestError(f"{self.cache}: a record's file is not allowed", path=self.cache)
                check_files(cps.values(), self.cache)
            seen = _Seen.from_json(raw)
            header = _header_from_json(raw["header"], self.cache)
            if header.name != self.task:
                return
            self.state = TaskState(header, cps)
            self._seen = seen
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ManifestError):
            self.state = None
            self._seen = None
            if not isinstance(sys.exc_info()[1], FileNotFoundError):
                fsutil.remove_file(self.cache)  # dropped: the next save_cache writes it again from the manifest

    def save_cache(self) -> None:
        """Write the cache if this reader learned something new; failures are ignored (it is only a cache)."""
        if self.cache is None or self.state is None or self._seen is None or not self._changed:
            return
        cps = self.state.checkpoints.values()
        doc = {
            "v": CACHE_VERSION,
            **self._seen.to_json(),
            "header": self.state.header.to_json(),
            "checkpoints": {k: list(map(attrgetter(k), cps)) for k in COLUMNS},
        }
        try:
            fsutil.atomic_write_nosync(self.cache, json.dumps(doc, separators=(",", ":")).encode())
            self._changed = False
        except (OSError, TypeError, ValueError):  # TOML-only values (a datetime in arch kwargs) have no JSON
            pass


def _valid_columns(columns: list[list[Any]]) -> bool:
    """Whether the cache's columns hold what a manifest's records may: each value typed as Checkpoint.from_record
    takes it (the files are checked by the caller)."""
    numbers, files, sizes, shas, created, steps, epochs, metrics, names = columns
    if not numbers:
        return True
    # sets of types, made by map() in C: a tenth of the time of a test per value
    int_, str_, none = {int}, {str}, {int, str, type(None)}
    return (
        set(map(type, numbers)) == int_
        and min(numbers) >= 1
        and set(map(type, files)) == str_  # their paths: _load_cache, with the check of two records of one file
        and set(map(type, sizes)) == int_
        and set(map(type, shas)) == str_
        and set(map(type, created)) == str_
        and set(map(type, steps)) <= none - str_
        and set(map(type, epochs)) <= none - str_
        and set(map(type, names)) <= none - int_
        and set(map(type, metrics)) == {dict}
        and set(map(type, chain.from_iterable(map(dict.values, metrics)))) <= {int, float}
    )


def _header_from_json(h: Any, path: Path) -> TaskHeader:
    """A TaskHeader from its `to_json` form, checked as `TaskHeader.from_doc` checks a manifest's."""
    if not isinstance(h, dict):
        raise ManifestError(f"{path}: the header is not an object", path=path)
    doc = {k: v for k, v in h.items() if v is not None and k not in ("arch", "arch_kwargs")}
    if h.get("arch") is not None:
        doc["arch"] = {"factory": h["arch"]}
        if h.get("arch_kwargs") is not None:
            doc["arch"]["kwargs"] = h["arch_kwargs"]
    return TaskHeader.from_doc({**doc, "format": FORMAT}, path)


# --- fingerprints of what a reader read -------------------------------------------------------------


def fingerprint(reader: TaskReader) -> dict[str, Any] | None:
    """The manifest's (inode, size, mtime in ns, first 128 and last 64 bytes, CRC-32) as `reader` last read it;
    None when it changed since.

    Saving appends (size and mtime change) and every other change replaces the file, as TaskReader relies
    on; the mtime also catches a file rewritten in place to the same size, and the first bytes (the
    manifest's `revision`, else the CRC-32) a replacement that got the same inode number, size and last
    bytes (see `_same_prefix`).
    """
    seen = reader._seen
    if seen is None:
        return None
    try:
        st = os.lstat(reader.manifest)
    except OSError:
        return None
    if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (seen.ino, seen.size, seen.mtime, seen.ctime):
        return None  # changed since it was read
    return seen.to_json()


def unchanged(manifest: Path | str, mark: dict[str, Any], grown: bool = False) -> bool:
    """Whether `manifest` still has the `fingerprint` `mark`; False for a malformed mark or a read error.

    With `grown`, also True when the file only grew since (records appended), as TaskReader reads it.
    """
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        seen = _Seen.from_json(mark)
        if grown:
            if st.st_ino != seen.ino or st.st_size < seen.size:
                return False
        elif (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (seen.ino, seen.size, seen.mtime, seen.ctime):
            return False
        return _same_prefix(fd, seen)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    finally:
        os.close(fd)
