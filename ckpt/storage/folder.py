"""`Storage` on a local folder: the workspace's own files under the key space the trash and doctor share.

Keys are paths relative to the workspace root. What a bucket does with a conditional request, a folder does
with the file system: `put(if_none_match=True)` links a finished temporary file into place (never a torn
file under the key), `put(if_match=…)` compares and replaces under a lock (an ETag here is inode, mtime and
size: every replace makes a new inode), and `transfer` renames (the store can) where a bucket copies.
Nothing here follows a symlink: a key whose path goes through one is refused (SymlinkError), and listings
skip links. Deletes remove the folders they empty, up to the workspace's own (`tasks/<task>/checkpoints`,
`models`, `trash`...), so that a deleted model or entry leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .. import fsutil, hashing, locks, placing
from ..errors import ConflictError, IntegrityError, SymlinkError
from .base import Blob, PreconditionFailed, Storage

LOCK = ".lock"  # in trash/: conditional writes (entries) compare and replace under it; `locked` holds it


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class FolderStorage(Storage):
    can_lock = True  # a task's lock is held for a whole operation: a pending change seen under it is dead
    can_rename = True  # transfer renames: the source is gone once moved

    def __init__(self, root: Path):
        self.root = root
        self.url = str(root)
        self._holder: int | None = None  # the thread that holds `locked`

    def path(self, key: str) -> Path:
        """The file of `key`; SymlinkError when a folder on its way is a symlink."""
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a key of this workspace: {key!r}")
        parent = key.rpartition("/")[0]
        if parent:
            fsutil.refuse_links(self.root, parent)
        return self.root / key

    # -- reading --

    def get(self, key: str) -> tuple[bytes, str]:
        try:
            fd = fsutil.open_own(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FileNotFoundError(key)
            chunks = [os.read(fd, st.st_size + 1)]
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
            return b"".join(chunks), _etag(st)
        finally:
            os.close(fd)

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        data, now = self.get(key)
        return None if now == etag else (data, now)

    def head(self, key: str) -> Blob | None:
        try:
            st = os.lstat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return _blob(key, st)

    def claim(self, key: str, data: bytes = b"") -> bool:
        """Create `key` if nothing is there (O_EXCL; its bytes are not fsynced: only its name counts, a marker's),
        durable in its folder; False when it exists."""
        path = self.path(key)
        try:
            fsutil.make_file_new(path, data)
        except ConflictError:
            return False
        fsutil.fsync_dir(path.parent)
        return True

    def exists(self, key: str) -> bool:
        """Whether `key` is a file or a folder (a folder checkpoint), not a symlink."""
        try:
            mode = os.lstat(self.path(key)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    def why_missing(self, key: str) -> str:
        folder = self.root
        parts = key.split("/")
        for part in parts[:-1]:
            folder = folder / part
            if fsutil.is_symlink(folder):
                return f"skipped: {part}/ is a symlink; ckpt never moves files through links"
        try:
            mode = os.lstat(folder / parts[-1]).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return "skipped: its file is missing (see: ckpt doctor)"
        if stat.S_ISLNK(mode):
            return "skipped: its file is a symlink; ckpt never follows, moves or deletes through links"
        if stat.S_ISDIR(mode):
            return "skipped: its folder holds no file"
        return "skipped: its file is not a regular file or folder"

    def sha256(self, key: str) -> str:
        return hashing.sha256_file(self.path(key))

    def children(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self.path(prefix.rstrip("/"))) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_prefix(self, prefix: str) -> list[Blob]:
        """Every regular file under folder `prefix` (which ends with '/'; else the file `prefix` itself, or the
        files under it), in key order; links are skipped, never followed."""
        base = prefix.rstrip("/")
        path = self.path(base)
        try:
            top = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        if stat.S_ISREG(top.st_mode) and not prefix.endswith("/"):
            return [_blob(base, top)]
        if not stat.S_ISDIR(top.st_mode):
            if prefix.endswith("/") and stat.S_ISLNK(top.st_mode):
                raise SymlinkError(
                    f"'{base}' is a symlink; ckpt never reads, moves or deletes through links; nothing was changed",
                    path=path,
                    hint="replace the link by the folder it points to (or remove it), then run: ckpt doctor",
                )
            if prefix.endswith("/"):
                raise IntegrityError(
                    f"'{base}' is not a folder (ckpt keeps files in it); nothing was changed",
                    path=path,
                    hint="move it aside and run: ckpt doctor",
                )
            return []
        out: list[Blob] = []
        # strings and scandir, not Path objects: this runs once per file of a task, thousands of times
        folders = [(os.fspath(path), base)]
        while folders:
            folder, key = folders.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    folders.append((e.path, f"{key}/{e.name}"))
                elif e.is_file(follow_symlinks=False):
                    try:
                        out.append(_blob(f"{key}/{e.name}", e.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
        out.sort(key=lambda b: b.key)
        return out

    # -- writing --

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        try:
            return self._put(key, data, if_match=if_match, if_none_match=if_none_match)
        except OSError as e:
            if e.filename is not None or isinstance(e, (FileNotFoundError, FileExistsError)):
                raise
            # a full disk or an I/O error while writing names no file: the message says which one
            raise OSError(e.errno, e.strerror, str(self.root / key)) from None

    def _put(self, key: str, data: bytes, *, if_match: str | None, if_none_match: bool) -> str:
        path = self.path(key)
        fsutil.make_dirs_durably(path.parent)  # a new entry's folder is on disk before anything goes in it
        if if_none_match:
            # a finished temporary file linked into place: the key never holds torn bytes, and never replaces
            tmp = fsutil.temp_path(path.parent, path.name)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    placing.link_new(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(f"'{key}' exists already") from None
            finally:
                with contextlib.suppress(OSError):  # what is left is a temp file doctor removes once stale
                    fsutil.remove_file(tmp)
            fsutil.fsync_dir(path.parent)
            return _etag(os.lstat(path))
        if if_match is None:
            fsutil.atomic_write(path, data)
            return _etag(os.lstat(path))
        with self.locked():
            try:
                now = _etag(os.lstat(path))
            except FileNotFoundError:
                now = ""
            if now != if_match:
                raise PreconditionFailed(f"'{key}' changed")
            fsutil.atomic_write(path, data)
            return _etag(os.lstat(path))

    @contextlib.contextmanager
    def locked(self, what: str = "the trash", timeout: float | None = None) -> Iterator[None]:
        """Hold `trash/.lock` (re-entrant in one thread: a conditional write inside an operation that holds
        it); raises BusyError after `timeout`."""
        if self._holder == threading.get_ident():
            yield
            return
        fsutil.refuse_links(self.root, "trash")
        folder = self.root / "trash"
        fsutil.make_dirs(folder)
        with locks.locked(folder / LOCK, what, timeout):
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    def upload(self, key: str, source: Path, *, if_none_match: bool = False) -> str:
        path = self.path(key)
        fsutil.make_dirs(path.parent)
        placing.copy_new(source, path)
        return _etag(os.lstat(path))

    def download(self, key: str, dest: Path) -> None:
        placing.copy_new(self.path(key), dest)

    def copy(self, src: str, dst: str) -> None:
        """A hard link where the file system has them, else a copy; never replaces `dst`."""
        s, d = self.path(src), self.path(dst)
        fsutil.make_dirs(d.parent)
        try:
            placing.link_new(s, d)
        except FileNotFoundError:
            raise FileNotFoundError(src) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOTSUP):
                raise
            placing.copy_new(s, d)

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
        """Rename each `src/name` (a file or a whole folder; "" names `src` itself) to `dst/name`, never
        replacing (PreconditionFailed); the folders touched are synced once at the end. Nothing stays behind:
        returns []. FileNotFoundError names a source that is gone. (`exclude` names bookkeeping a folder does
        not have.)"""
        if not names:
            return []
        fsutil.refuse_links(self.root, src)
        fsutil.refuse_links(self.root, dst)
        s, d = self.root / src, self.root / dst
        try:
            if names == [""]:
                fsutil.make_dirs_durably(d.parent)
                fsutil.move_noreplace(s, d)
                fsutil.fsync_dir(s.parent)
                fsutil.fsync_dir(d.parent)
            elif into_new:
                # a folder this operation just made: nothing else names files in it, so plain renames through
                # folders opened once (fsutil.Mover) cannot replace anything; a thousand files in a few ms
                for parent in sorted({n.rpartition("/")[0] for n in names}):
                    fsutil.make_dirs_durably(d / parent)
                with fsutil.Mover(s, d) as mover:
                    mover.move_all(names)
                    mover.sync()
            else:
                touched: set[Path] = set()
                for name in names:
                    fsutil.refuse_links(s, name)
                    fsutil.make_dirs(d / name.rpartition("/")[0])
                    fsutil.move_noreplace(s / name, d / name)
                    touched |= {(s / name).parent, (d / name).parent}
                for folder in sorted(touched):
                    fsutil.fsync_dir(folder)
        except FileNotFoundError as e:
            raise FileNotFoundError(e.filename or src) from None
        except ConflictError as e:
            raise PreconditionFailed(str(e)) from None
        return []

    def delete(self, keys: list[str]) -> None:
        """Remove the files `keys` (missing ones are ignored; a folder key removes its tree, never following a
        link), then the folders that are left empty, up to the workspace's own."""
        parents: set[Path] = set()
        for key in keys:
            path = self.path(key)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                fsutil.remove_tree(path)
            else:
                fsutil.remove_file(path)
            parents.add(path.parent)
        for folder in sorted(parents, key=lambda p: -len(p.parts)):
            self._prune(folder)

    def _prune(self, folder: Path) -> None:
        while folder != self.root and not _kept(folder.relative_to(self.root).parts):
            if not fsutil.remove_empty_dirs(folder):  # with the empty folders in it (a restored entry's)
                return
            folder = folder.parent


def _kept(parts: tuple[str, ...]) -> bool:
    """The workspace's own folders, never removed for being empty: the top ones, a task's and its checkpoints/."""
    return len(parts) <= 1 or (
        parts[0] == "tasks" and (len(parts) == 2 or (len(parts) == 3 and parts[2] == "checkpoints"))
    )


def _blob(key: str, st: os.stat_result) -> Blob:
    return Blob(key, st.st_size, _etag(st), st.st_mtime, (st.st_dev, st.st_ino), st.st_nlink)
