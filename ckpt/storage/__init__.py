"""Object storage behind a workspace URL (`s3://bucket/prefix`): the few operations the core needs.

A local workspace keeps using `fsutil` (hard links, renames, file locks, appends); a workspace named by
a URL is served by `ckpt.store`, written against `Storage` alone. The backend is chosen from the URL
in `Workspace.open`/`Workspace.init`; no command knows which one it has. Nothing here is imported by
`import ckpt`: s3fs is imported only when an `s3://` URL is opened.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConflictError, UsageError

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


_MOUNTED: dict[str, Storage] = {}


def mount_for_tests(url: str, storage: Storage) -> None:
    """Make `open_storage(url)` return `storage` (tests only: how ckpt.storage.memory is opened by URL)."""
    _MOUNTED[url] = storage


def unmount_for_tests(url: str) -> None:
    _MOUNTED.pop(url, None)


def open_storage(url: str) -> Storage:
    """The storage for workspace URL `url`; raises UsageError for an unknown scheme or a missing extra."""
    if url in _MOUNTED:
        return _MOUNTED[url]
    if url.startswith("s3://"):
        try:
            from .s3 import S3Storage
        except ImportError as e:
            raise UsageError(
                f"s3:// workspaces need s3fs ({e.name} is not installed)", hint="pip install 'ckpt[s3]'"
            ) from None
        return S3Storage(url)
    scheme = url.split("://", 1)[0]
    raise UsageError(
        f"unsupported workspace URL scheme '{scheme}://' in {url!r}",
        hint="ckpt supports a folder or s3://bucket/prefix (lower case; MinIO and other S3 services through "
        "AWS_ENDPOINT_URL)",
    )
