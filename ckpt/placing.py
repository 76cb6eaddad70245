"""Putting a checkpoint's files at a new path: hard link, reflink, copy or move, never replacing a file.

The steps they take go through fsutil (looked up there at each call, so that the tests' fault injection
reaches them).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from . import fsutil
from .errors import CkptError, ConflictError


def link_new(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` as `dst`; dst must not exist."""
    os.link(src, dst, follow_symlinks=False)


_FICLONE = 0x40049409


def reflink_new(src: Path, dst: Path) -> bool:
    """Make `dst` a reflink (copy-on-write clone) of `src`; False, with no file left, where unsupported."""
    try:
        import fcntl
    except ImportError:
        return False
    sfd = fsutil.open_regular(src, os.O_NOFOLLOW)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except BaseException:
        os.close(sfd)
        raise
    ok = False
    try:
        fcntl.ioctl(dfd, _FICLONE, sfd)
        os.fsync(dfd)
        ok = True
    except OSError:
        ok = False
    finally:
        os.close(dfd)
        os.close(sfd)
        if not ok:
            # a failed clone leaves an empty file: remove it
            with contextlib.suppress(OSError):
                os.unlink(dst)
    return ok


def copy_new(src: Path, dst: Path) -> str:
    """Copy `src` to a new file `dst` (via a temp name), fsynced; return the copy's sha256."""
    tmp, _, digest = fsutil.write_new_file(dst.parent, dst.name, lambda w: _copy_into(src, w))
    try:
        fsutil.move_noreplace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest


def _copy_into(src: Path, w: fsutil.HashingWriter) -> None:
    with fsutil.open_regular_file(src) as f:
        while chunk := f.read(fsutil.CHUNK):
            w.write(chunk)


def place_new(src: Path, dst: Path, mode: str) -> str:
    """Put file `src` at new path `dst`: "link" (hard link, else reflink, else copy), "copy" or "move".

    Returns how it was stored: "hardlink", "reflink", "copy" or "move". A "move" between file systems
    copies and leaves the source for the caller to remove once the copy is committed ("copy" is returned).
    """
    if mode == "move":
        if _moved(src, dst):
            return "move"
        mode = "copy"
    if mode == "link":
        try:
            link_new(src, dst)
            return "hardlink"
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise ConflictError(f"'{dst}' already exists", path=dst) from None
        if reflink_new(src, dst):
            return "reflink"
    copy_new(src, dst)
    return "copy"


def _moved(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` (never replacing: ConflictError); False, with nothing done, across file systems."""
    try:
        fsutil.move_noreplace(src, dst)
    except ConflictError:
        raise
    except CkptError:
        return False
    return True


def place_tree_new(src: Path, dst: Path, mode: str, files: list[tuple[str, int]] | None = None) -> str:
    """Put folder `src` at new path `dst` file by file (see place_new); returns the weakest storage used."""
    if mode == "move":
        if _moved(src, dst):
            return "move"
        mode = "copy"
    os.mkdir(dst)
    used = {"hardlink"}
    for rel, _ in files if files is not None else fsutil.tree_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        used.add(place_new(src / rel, target, "copy" if mode == "copy" else "link"))
    for kind in ("copy", "reflink", "hardlink"):
        if kind in used:
            return kind
    return "hardlink"  # pragma: no cover
