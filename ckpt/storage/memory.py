"""`Storage` in memory, with fault injection: the third store, for tests only.

It keeps S3's semantics where they matter to the crash protocol: whole-object writes, ETags (the md5 of the
bytes), `put` with If-Match / If-None-Match raising PreconditionFailed, server-side copies, idempotent deletes,
listings in key order. A `Fault` makes the k-th primitive call (counted over every method, or over one method)
go wrong in one of these ways:

- "fail": raise ConnectionError before doing anything (an HTTP 500, a refused connection);
- "lose": do it, then raise ConnectionError (the response was lost: the caller cannot tell it landed);
- "retry": do it, then do it again and answer with the second attempt (a client's automatic retry of a
  request whose first response was lost: a conditional write then answers 412);
- "kill_before" / "kill_after": raise `Killed` (a BaseException) before or after doing it, and refuse every
  later call with `Killed`, as a dead process would make none: no except/finally cleanup reaches the store.
  `revive()` starts the next "process".

It is opened as `memory://NAME` only where a test mounted it (`mount`); users' URLs with that scheme are
refused like any other scheme but s3://.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import mount_for_tests, unmount_for_tests
from .base import Blob, PreconditionFailed, Storage

T = TypeVar("T")
KINDS = ("fail", "lose", "retry", "kill_before", "kill_after")


class Killed(BaseException):
    """The process was killed at a primitive call (not an Exception: `except Exception` does not catch it)."""


@dataclass
class Fault:
    at: int  # the 1-based number of the call it strikes (of `method`'s calls when set, else of all calls)
    kind: str  # one of KINDS
    method: str | None = None


class MemoryStorage(Storage):
    def __init__(self, url: str = "memory://test"):
        self.url = url
        self.objects: dict[str, tuple[bytes, str, float]] = {}  # key -> (bytes, etag, modified)
        self.calls: list[str] = []  # the method of every primitive call made, in order
        self.fault: Fault | None = None
        self.dead = False
        self.struck: Fault | None = None  # the fault once it struck

    # -- fault injection --

    def revive(self) -> None:
        """A new process: calls are served again, the fault (struck or not) is cleared."""
        self.dead = False
        self.fault = None

    def _call(self, method: str, do: Callable[[], T]) -> T:
        if self.dead:
            raise Killed(f"{method}: the process is dead")
        self.calls.append(method)
        f = self.fault
        count = len(self.calls) if f is None or f.method is None else self.calls.count(f.method)
        if f is None or (f.method is not None and f.method != method) or count != f.at:
            return do()
        self.struck, self.fault = f, None
        if f.kind == "fail":
            raise ConnectionError(f"{method}: injected failure")
        if f.kind == "kill_before":
            self.dead = True
            raise Killed(f"{method}: killed before")
        result = do()
        if f.kind == "lose":
            raise ConnectionError(f"{method}: injected lost response")
        if f.kind == "kill_after":
            self.dead = True
            raise Killed(f"{method}: killed after")
        if f.kind == "retry":
            return do()
        return result

    # -- the primitives --

    def _write(self, key: str, data: bytes) -> str:
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        self.objects[key] = (bytes(data), etag, time.time())
        return etag

    def _read(self, key: str) -> tuple[bytes, str, float]:
        try:
            return self.objects[key]
        except KeyError:
            raise FileNotFoundError(f"{self.url}/{key}") from None

    def get(self, key: str) -> tuple[bytes, str]:
        def do() -> tuple[bytes, str]:
            data, etag, _ = self._read(key)
            return data, etag

        return self._call("get", do)

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        def do() -> tuple[bytes, str] | None:
            data, now, _ = self._read(key)
            return None if now == etag else (data, now)

        return self._call("get", do)

    def head(self, key: str) -> Blob | None:
        def do() -> Blob | None:
            got = self.objects.get(key)
            return None if got is None else Blob(key, len(got[0]), got[1], got[2])

        return self._call("head", do)

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        def do() -> str:
            got = self.objects.get(key)
            if if_none_match and got is not None:
                raise PreconditionFailed(f"{self.url}/{key} exists already")
            if if_match is not None and (got is None or got[1] != if_match):
                raise PreconditionFailed(f"{self.url}/{key} changed")
            return self._write(key, data)

        return self._call("put", do)

    def upload(self, key: str, source: Path, *, if_none_match: bool = False) -> str:
        data = source.read_bytes()

        def do() -> str:
            if if_none_match and key in self.objects:
                raise PreconditionFailed(f"{self.url}/{key} exists already")
            return self._write(key, data)

        return self._call("upload", do)

    def download(self, key: str, dest: Path) -> None:
        def do() -> None:
            dest.write_bytes(self._read(key)[0])

        self._call("download", do)

    def sha256(self, key: str) -> str:
        return self._call("sha256", lambda: hashlib.sha256(self._read(key)[0]).hexdigest())

    def copy(self, src: str, dst: str) -> None:
        def do() -> None:
            self._write(dst, self._read(src)[0])

        self._call("copy", do)

    def children(self, prefix: str) -> list[str]:
        def do() -> list[str]:
            rest = [k[len(prefix) :] for k in self.objects if k.startswith(prefix)]
            return sorted({r.split("/")[0] for r in rest if "/" in r})

        return self._call("list", do)

    def list_prefix(self, prefix: str) -> list[Blob]:
        def do() -> list[Blob]:
            return [Blob(k, len(v[0]), v[1], v[2]) for k, v in sorted(self.objects.items()) if k.startswith(prefix)]

        return self._call("list", do)

    def delete(self, keys: list[str]) -> None:
        def batch(part: list[str]) -> None:
            for k in part:
                self.objects.pop(k, None)

        for i in range(0, len(keys), 1000):  # one call per 1,000 keys, as DeleteObjects
            part = keys[i : i + 1000]
            self._call("delete", functools.partial(batch, part))


@contextmanager
def mounted(storage: MemoryStorage) -> Iterator[MemoryStorage]:
    """Make `storage.url` (memory://NAME) open this storage, for the duration of a test."""
    mount_for_tests(storage.url, storage)
    try:
        yield storage
    finally:
        unmount_for_tests(storage.url)


def keys(storage: MemoryStorage, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix` (no call counted: for a test's checks)."""
    return {k: v[0] for k, v in sorted(storage.objects.items()) if k.startswith(prefix)}
