"""Object storage behind a workspace URL (`s3://bucket/prefix`): the few operations the core needs.

A local workspace keeps using `fsutil` (hard links, renames, file locks, appends); a workspace named by
a URL is served by `ckpt.store`, written against `Storage` alone. The backend is chosen from the URL
in `Workspace.open`/`Workspace.init`; no command knows which one it has. Nothing here is imported by
`import ckpt`: s3fs is imported only when an `s3://` URL is opened.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import SCHEMES, Blob, PreconditionFailed, Storage, is_url

__all__ = ["SCHEMES", "Blob", "PreconditionFailed", "Storage", "is_url", "open_storage"]

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
