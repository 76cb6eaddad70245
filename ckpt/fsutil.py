"""The file-system steps of the core.

Every file-system call the core makes that changes something goes through here or through the modules
beside it (locks.py: the workspace locks; placing.py: putting a checkpoint's files at a new path;
hashing.py: reading them to hash), so that a second implementation (object storage) can replace it later.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import CkptError, ConflictError, IntegrityError, NotRegularFile, SymlinkError, WriteError

if TYPE_CHECKING:
    import ctypes

CHUNK = 4 * 1024 * 1024


def user_path(path: str | os.PathLike[str]) -> Path:
    """`path` with a leading `~` or `~user` expanded, as a shell does; left as it is when there is no such user
    (`~tilde` is then a name, as bash leaves it)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()  # what mkdir makes; mkdtemp makes 0700: chmod a new folder to this


def temp_path(folder: Path, name: str) -> Path:
    """A fresh temporary name in `folder` for a file that will become `name` (`.name.<rand>.tmp`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; finished files get the usual umask mode
    finally:
        os.close(fd)
    return Path(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temp file in the same folder, write, fsync, os.replace.

    The temporary file is removed when anything fails, so no `*.tmp` is left behind.
    """
    _replace(path, data, sync=True)
    fsync_dir(path.parent)


def _replace(path: Path, data: bytes, sync: bool) -> None:
    tmp = temp_path(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_file_new(path: Path, data: bytes = b"") -> None:
    """Create file `path` with `data`, not fsynced (the caller fsyncs the folder); ConflictError if it exists.

    For marker files, whose name alone carries their meaning: torn or empty bytes after a crash do no harm.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError:
        raise ConflictError(f"'{path}' already exists", path=path) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def append_durably(path: Path, data: bytes) -> os.stat_result:
    """Append `data` to `path` (never through a symlink) in one write and fsync it (the caller holds the lock of
    `path`); the file's stat after it.

    When any of it fails (a full disk: ENOSPC), the file is cut back to its size before, so that no partial
    record is left for every later read to stumble on, and WriteError is raised.
    """
    fd = _open_own(path, os.O_WRONLY | os.O_APPEND)
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException as e:  # also an interrupt between two writes
            try:
                os.ftruncate(fd, before)
                os.fsync(fd)
                undone = "it is as it was before"
            except OSError:
                undone = "its incomplete end is cut off by: ckpt doctor"
            if not isinstance(e, OSError):
                raise
            raise WriteError(
                f"cannot append to '{path}': {e.strerror or e}; {undone}",
                errno=e.errno,
                path=path,
                hint="free space (or fix the cause) and run the command again",
            ) from None
        return os.fstat(fd)
    finally:
        os.close(fd)


# --- the workspace's own paths: never through a link ---------------------------------------------------------


def link_error(path: str | Path, shown: str) -> SymlinkError:
    return SymlinkError(
        f"'{shown}' is a symlink; ckpt never reads or writes the workspace's own files through a link",
        path=path,
        hint="replace the link by the folder or file it points to (or remove it), then run: ckpt doctor",
    )


def refuse_links(root: Path, rel: str, shown_from: str = "") -> None:
    """Raise SymlinkError naming the first part of `rel` below `root` (the last part included) that is a symlink.

    The workspace's own paths (`tasks/`, `models/`, `trash/`, a task or model folder, `checkpoints/`, a manifest,
    entry, cache or lock file) are never followed: a link there may lead out of the workspace. `root` itself may
    be a link. Stops at the first part that does not exist (nothing below it can be a link). The error names the
    part as `shown_from` (where `root` is, relative to the workspace) joined with `rel` up to that part.
    """
    path = os.fspath(root)
    done = shown_from.rstrip("/")
    for part in rel.split("/"):
        if not part:
            continue
        path = f"{path}/{part}"
        done = f"{done}/{part}" if done else part
        try:
            st = os.lstat(path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise link_error(path, done)


def _open_own(path: str | Path, flags: int) -> int:
    """os.open of one of the workspace's own files with O_NOFOLLOW; a symlink there raises SymlinkError, and a FIFO,
    device or socket NotRegularFile (opened without blocking, then refused)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path, os.path.basename(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder: read() raises IsADirectoryError
            refuse_irregular(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own(path: str | Path) -> bytes:
    """The bytes of one of the workspace's own files (a manifest, entry or cache), never through a symlink
    (SymlinkError); OSError as open and read raise them."""
    fd = _open_own(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, os.fstat(fd).st_size + 1)]  # the whole file in one read, as Path.read_bytes
        while chunks[-1]:  # it grew meanwhile, or the file system's size was short
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks) if len(chunks) > 2 else chunks[0]
    finally:
        os.close(fd)


def open_own(path: str | Path) -> int:
    """A read-only descriptor of one of the workspace's own files, never through a symlink (SymlinkError)."""
    return _open_own(path, os.O_RDONLY)


class HashingWriter:
    """Wraps a binary file: counts and sha256-hashes everything written through it."""

    def __init__(self, f: BinaryIO):
        import hashlib  # here, not at the top: commands that only read never hash (its import is 3 ms)

        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:  # torch.save and shutil call this
        self.sha.update(b)
        self.size += len(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def write_new_file(folder: Path, name: str, produce: Callable[[HashingWriter], None]) -> tuple[Path, int, str]:
    """Write a temporary file in `folder` through `produce`, fsync it; return (temp path, size, sha256).

    The caller renames the temp file into place. On failure the temp file is removed.
    """
    tmp = temp_path(folder, name)
    try:
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            produce(w)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp, w.size, w.sha.hexdigest()


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symlink",
}


def refuse_irregular(path: str | os.PathLike[str], mode: int) -> None:
    """Raise NotRegularFile unless `mode` (an lstat's or fstat's st_mode) is a regular file's."""
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise NotRegularFile(
            f"'{os.fsdecode(path)}' is {kind}, not a checkpoint file; reading it could block or never end",
            path=os.fsdecode(path),
            hint="remove it, or move a real file there",
        )


def open_regular(path: str | os.PathLike[str], flags: int = 0) -> int:
    """A read-only fd on `path`, which must be a regular file (symlinks to one are followed unless `flags`
    holds O_NOFOLLOW); raises NotRegularFile (exit 6) for a FIFO, device, socket or folder, at once.

    Opening a FIFO blocks until a writer comes and a device may never end, so the kind is checked with
    stat before opening, and again on the open fd (O_NONBLOCK: a FIFO swapped in between opens at once).
    """
    refuse_irregular(path, os.stat(path, follow_symlinks=not flags & getattr(os, "O_NOFOLLOW", 0)).st_mode)
    fd = os.open(path, os.O_RDONLY | flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        refuse_irregular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """`open_regular` as a buffered binary file object (closed with it)."""
    return os.fdopen(open_regular(path), "rb")


# --- renames that never overwrite -------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc: ctypes.CDLL | None = None


def _renameat2(src: str | Path, dst: str | Path, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD) -> bool:
    """rename(2) with RENAME_NOREPLACE; False when the platform lacks it."""
    global _libc
    import ctypes  # here: its import costs 2 ms, and only writers rename

    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    res = fn(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def move_noreplace(
    src: str | Path, dst: str | Path, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
) -> None:
    """Rename `src` to `dst` inside one file system; raise ConflictError if `dst` exists.

    Never copies: a move between file systems is an error, not a slow copy. With `src_dir_fd` and
    `dst_dir_fd` (folders from `open_folder`), `src` and `dst` are names inside those folders.
    """
    try:
        at_src = _AT_FDCWD if src_dir_fd is None else src_dir_fd
        if _renameat2(src, dst, at_src, _AT_FDCWD if dst_dir_fd is None else dst_dir_fd):
            return
    except FileExistsError:
        raise ConflictError(f"'{dst}' already exists", path=dst) from None
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise _cross_device(src, dst) from None
        raise
    # Fallback without RENAME_NOREPLACE: callers hold the lock for this folder, so check-then-rename is safe.
    try:
        os.lstat(dst, dir_fd=dst_dir_fd)
    except (OSError, ValueError):  # as os.path.lexists: anything but a name that is there
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise ConflictError(f"'{dst}' already exists", path=dst)


def _cross_device(src: str | Path, dst: str | Path) -> CkptError:
    return CkptError(f"cannot move '{src}' to '{dst}': different file systems", path=src)


def open_folder(path: str | Path) -> int | None:
    """A descriptor of folder `path` (never through a symlink) for `move_noreplace`'s and `os.lstat`'s `dir_fd`,
    or None where the platform has no such calls; close it with `os.close`. Raises OSError."""
    if os.stat not in os.supports_dir_fd or os.rename not in os.supports_dir_fd:
        return None
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def rename_in(name: str, src_dir_fd: int, dst_dir_fd: int) -> None:
    """Rename `name` in one open folder to the same name in another; it replaces what is there (see Mover)."""
    os.rename(name, name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


class Mover:
    """Moves files, by names relative to two folder trees, into a folder just made; each folder is opened once.

    A rename through open folders looks up one name on each side, not two whole paths: about a tenth
    less time for a thousand files. `sync()` makes the renames durable in every folder they touched;
    `close()` closes the folders (use it as a context manager).

    `dst_root` must be a folder this process has just made (a new trash entry's): no other process puts
    names in it, so a plain rename cannot overwrite anything there but what this Mover itself moved, and
    the Mover refuses to move the same name twice. That spares RENAME_NOREPLACE, which Python reaches
    only through ctypes (2 ms to import, and a slower call).
    """

    def __init__(self, src_root: Path, dst_root: Path):
        self.src_root, self.dst_root = src_root, dst_root
        self._folders: dict[str, tuple[int | None, int | None]] = {}
        self._moved: set[str] = set()

    def move(self, rel: str) -> None:
        """Move `src_root/rel` to `dst_root/rel`, making `rel`'s folders under `dst_root` first."""
        parent, _, name = rel.rpartition("/")
        fds = self._folders.get(parent)
        if fds is None:
            make_dirs(self.dst_root / parent)
            src_fd = open_folder(self.src_root / parent)
            dst_fd = None
            if src_fd is not None:
                try:
                    dst_fd = open_folder(self.dst_root / parent)
                except BaseException:
                    os.close(src_fd)
                    raise
            fds = self._folders[parent] = (src_fd, dst_fd)
        src_fd, dst_fd = fds
        if rel in self._moved:
            raise ConflictError(f"'{self.dst_root / rel}' already exists", path=self.dst_root / rel)
        self._moved.add(rel)
        if src_fd is None or dst_fd is None:
            move_noreplace(self.src_root / rel, self.dst_root / rel)
            return
        try:
            rename_in(name, src_fd, dst_fd)
        except OSError as e:
            raise self._error(e, rel) from None

    def move_all(self, rels: Iterable[str]) -> None:
        """`move` each of `rels` in turn; after the first file of each folder, with less work per file."""
        rename = rename_in  # looked up once per call (the tests replace it to inject failures)
        folders, moved = self._folders, self._moved
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            fds = folders.get(parent)
            if fds is None or fds[0] is None or fds[1] is None or rel in moved:
                self.move(rel)  # the first file of its folder, a platform without descriptors, or a repeat
                continue
            moved.add(rel)
            try:
                rename(name, fds[0], fds[1])
            except OSError as e:
                raise self._error(e, rel) from None

    def _error(self, e: OSError, rel: str) -> Exception:
        return _cross_device(self.src_root / rel, self.dst_root / rel) if e.errno == errno.EXDEV else e

    def sync(self) -> None:
        """fsync every folder a move touched, on both sides."""
        for parent, fds in self._folders.items():
            for root, fd in zip((self.src_root, self.dst_root), fds, strict=True):
                if fd is None:
                    fsync_dir(root / parent)
                else:
                    with contextlib.suppress(OSError):
                        os.fsync(fd)

    def close(self) -> None:
        for fds in self._folders.values():
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        self._folders.clear()

    def __enter__(self) -> Mover:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def symlink_on_path(base: Path, rel: str) -> str | None:
    """The first part of `rel` (below `base`, the last part included) that is a symlink, or None.

    lstat alone does not see a linked folder half way (`checkpoints/` -> elsewhere): every part is checked.
    """
    path = base
    for part in rel.split("/"):
        if not part:
            continue
        path = path / part
        if is_symlink(path):
            return part
    return None


def remove_tree(path: Path) -> None:
    """Delete a file or a folder without ever following a symlink (a link is removed, not its target)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux has fd-based rmtree
            raise CkptError("this platform cannot delete folders without following symlinks", path=path)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def make_dirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def make_dirs_durably(path: Path) -> None:
    """Create folder `path` and its missing parents, each new folder's name made durable in its parent (fsync)."""
    missing: list[Path] = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        fsync_dir(d.parent)


def make_dir_new(path: Path) -> None:
    """Create folder `path` (its parent exists); raise ConflictError if anything is there already."""
    try:
        os.mkdir(path)
    except FileExistsError:
        raise ConflictError(f"'{path}' already exists", path=path) from None


def remove_empty_dirs(path: Path) -> bool:
    """Remove folder `path` and its sub-folders bottom-up where empty; never follows a symlink or deletes a file.

    Returns True when `path` is gone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    with os.scandir(path) as it:
        subdirs = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    for sub in subdirs:
        remove_empty_dirs(sub)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def lstat_tree(path: Path) -> list[tuple[Path, os.stat_result]]:
    """(path, lstat) of `path` and everything below it, never following a symlink; [] if it is gone."""
    out: list[tuple[Path, os.stat_result]] = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return out
    out.append((path, st))
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(path) as it:
                children = [Path(e.path) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return out
        for child in children:
            out.extend(lstat_tree(child))
    return out


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def disk_usage(path: Path, seen: set[object]) -> int:
    """Bytes allocated under `path` (like `du -B1`, files only), counting each inode once via `seen`."""
    total = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    if stat.S_ISDIR(st.st_mode):
        total += st.st_blocks * 512
        with os.scandir(path) as it:
            for entry in it:
                total += disk_usage(Path(entry.path), seen)
    else:
        total += st.st_blocks * 512
    return total


def atomic_write_nosync(path: Path, data: bytes) -> None:
    """Replace `path` atomically without fsync: for derived caches, which may be lost but never torn."""
    _replace(path, data, sync=False)


def tree_files(path: Path) -> list[tuple[str, int]]:
    """(relative posix path, size) of every file under folder `path`, sorted; symlinks are refused."""
    out: list[tuple[str, int]] = []

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as it:
            for e in it:
                rel = f"{prefix}{e.name}"
                if e.is_symlink():
                    raise IntegrityError(  # exit 6, as for a checkpoint file that is a link
                        f"'{e.path}' is a symlink; ckpt does not follow links in checkpoints",
                        path=e.path,
                        hint="replace the link with the file it points at",
                    )
                if e.is_dir(follow_symlinks=False):
                    walk(Path(e.path), rel + "/")
                elif e.is_file(follow_symlinks=False):
                    out.append((rel, e.stat(follow_symlinks=False).st_size))

    walk(path, "")
    out.sort()
    return out
