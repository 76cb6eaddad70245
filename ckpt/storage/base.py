"""The interface a bucket store implements: a flat key space with conditional writes (see ckpt.storage)."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConflictError

SCHEMES = ("s3://",)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location: object) -> bool:
    """Whether `location` is a URL (`scheme://…`) rather than a folder; only `s3://` ones open (open_storage)."""
    return isinstance(location, str) and _URL.match(location) is not None


class PreconditionFailed(ConflictError):
    """A conditional write lost a race: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(slots=True, frozen=True)
class Blob:
    key: str  # relative to the workspace root, '/'-separated
    size: int
    etag: str
    modified: float = 0.0  # seconds since the epoch (LastModified), where the listing gives it
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) on a folder: hard links share one
    links: int = 1  # st_nlink on a folder: the bytes stay on disk while another link holds them


class Storage(ABC):
    """A flat key space under the workspace root, with conditional writes.

    Keys are relative to the root and '/'-separated. Writes are whole objects; there is no append,
    rename or lock. `put` with `if_none_match` creates only; with `if_match` replaces only the version
    read (its ETag). Both raise PreconditionFailed when the condition does not hold.
    """

    url: str
    can_lock = False  # no lock spans an operation: a pending change may be one still running elsewhere
    can_rename = False  # `transfer` copies: the source stays until deleted

    @abstractmethod
    def get(self, key: str) -> tuple[bytes, str]:
        """(bytes, etag) of `key`; raises FileNotFoundError."""

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The bytes of each key (None where it does not exist), several requests in flight where the backend can."""
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self.get(key)[0])
            except FileNotFoundError:
                out.append(None)
        return out

    @abstractmethod
    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        """(bytes, etag) of `key` when its etag is no longer `etag`, else None (a 304: no body sent)."""

    @abstractmethod
    def head(self, key: str) -> Blob | None:
        """Size and etag of `key`, or None when it does not exist."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write `data` at `key` (optionally conditional); return the new etag."""

    @abstractmethod
    def upload(self, key: str, source: Path, *, if_none_match: bool = False) -> str:
        """Upload local file `source` to `key` (multipart when large); return the etag."""

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Download `key` to local file `dest`; raises FileNotFoundError."""

    @abstractmethod
    def sha256(self, key: str) -> str:
        """The sha256 of `key`'s bytes, streamed (they pass through this process once); raises FileNotFoundError."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy `src` to `dst` on the server: no byte passes through this process. Raises FileNotFoundError."""

    def copy_many(self, pairs: list[tuple[str, str]]) -> None:
        """`copy` of each (src, dst), several at a time where the backend can; raises FileNotFoundError."""
        for src, dst in pairs:
            self.copy(src, dst)

    def claim(self, key: str, data: bytes = b"") -> bool:
        """Create `key` holding `data` if nothing is there (If-None-Match); False when something is."""
        try:
            self.put(key, data, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def exists(self, key: str) -> bool:
        """Whether `key` is an object, or a folder of objects (`key/...`)."""
        return self.head(key) is not None or bool(self.list_prefix(key + "/"))

    def why_missing(self, key: str) -> str:
        """Why the file of a checkpoint at `key` is not in a listing (a plan's reason to keep its record)."""
        return "skipped: its file is missing (see: ckpt verify)"

    def transfer(
        self,
        src: str,
        dst: str,
        names: list[str],
        *,
        last: str | None = None,
        into_new: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Put each `src/name` (an object, or a folder of objects; "" names `src` itself) at `dst/name`:
        server-side copies from one listing of their common folder. The sources stay: their keys are
        returned, for the caller to delete once its change committed. Objects named `last` are copied after
        the others (a record that says the rest is in place). FileNotFoundError names a source that is gone.
        Objects named in `exclude` (a store's own bookkeeping, such as a title's claim) stay where they are.
        (`into_new` says `dst` is a folder the caller just made; a store that renames may move faster then.)"""
        if not names:
            return []
        keys = [f"{src}/{n}" if n else src for n in names]
        common = os.path.commonpath(keys) if len(keys) > 1 else keys[0]
        under: dict[str, list[str]] = {}
        for b in self.list_prefix(common):
            parts = b.key.split("/")
            for i in range(1, len(parts) + 1):
                under.setdefault("/".join(parts[:i]), []).append(b.key)
        copies: list[tuple[str, str]] = []
        for key, name in zip(keys, names, strict=True):
            found = under.get(key)
            if not found:
                raise FileNotFoundError(key)
            target = f"{dst}/{name}" if name else dst
            copies += [(k, target + k[len(key) :]) for k in found if k.rsplit("/", 1)[-1] not in exclude]
        self.copy_many([c for c in copies if c[0].rsplit("/", 1)[-1] != last])
        self.copy_many([c for c in copies if c[0].rsplit("/", 1)[-1] == last])
        return [k for k, _ in copies]

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names of the 'folders' right below `prefix` (which ends with '/'): one LIST with a delimiter."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> list[Blob]:
        """Every object whose key starts with `prefix`, in key order (one request per 1,000 keys)."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete `keys` (missing ones are ignored); batched, 1,000 keys a request."""

    def incomplete_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload id, seconds since it began) of each multipart upload under `prefix` that was never
        completed or aborted (a save that stopped halfway); none on a backend without multipart uploads."""
        return []

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort multipart upload `upload_id` of `key`, freeing the parts it stored."""
        raise NotImplementedError
