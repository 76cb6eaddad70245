"""The interface a bucket store implements: a flat key space with conditional writes (see ckpt.storage)."""

from __future__ import annotations

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


class Storage(ABC):
    """A flat key space under the workspace root, with conditional writes.

    Keys are relative to the root and '/'-separated. Writes are whole objects; there is no append,
    rename or lock. `put` with `if_none_match` creates only; with `if_match` replaces only the version
    read (its ETag). Both raise PreconditionFailed when the condition does not hold.
    """

    url: str

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
