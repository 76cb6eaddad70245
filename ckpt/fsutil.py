"""The file-system steps of the core, in one small module.

Every file-system call the core makes that changes something goes through here, so that a second
implementation (object storage) can replace it later.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import BusyError, CkptError, ConflictError, IntegrityError, NotRegularFile, SymlinkError, WriteError

if TYPE_CHECKING:
    import ctypes

CHUNK = 4 * 1024 * 1024
DEFAULT_LOCK_TIMEOUT = 30.0
HOLDER_SUFFIX = ".holder"  # next to a lock file: who holds it (pid, host, command), for the BusyError message

_wait: float | None = None  # set by `ckpt --wait SECONDS` (set_lock_timeout); wins over CKPT_LOCK_TIMEOUT


def set_lock_timeout(seconds: float | None) -> None:
    """Make every later lock wait at most `seconds` (None: back to CKPT_LOCK_TIMEOUT, else 30 s)."""
    global _wait
    _wait = None if seconds is None else max(0.0, float(seconds))


def lock_timeout() -> float:
    """Seconds a mutating command waits for a lock: `--wait`, else `CKPT_LOCK_TIMEOUT`, else 30."""
    if _wait is not None:
        return _wait
    raw = os.environ.get("CKPT_LOCK_TIMEOUT")
    if raw:
        try:
            value = float(raw)
            if value == value:  # not NaN
                return max(0.0, value)
        except ValueError:
            pass
    return DEFAULT_LOCK_TIMEOUT


def _write_holder(path: str) -> None:
    import sys
    import time

    argv = [os.path.basename(sys.argv[0]) if sys.argv else "?", *sys.argv[1:]]
    command = " ".join(argv)[:200].replace("\n", " ")
    text = f"{os.getpid()}\n{os.uname().nodename}\n{time.time():.0f}\n{command}\n"
    with contextlib.suppress(OSError):
        # O_NONBLOCK: a FIFO put there must not hang the command (it only names the holder: skipped)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
                os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)


def lock_holder(lock_path: Path) -> str | None:
    """Who holds the lock at `lock_path`, as its holder file says ("pid 12 on host (command), for 3 s"), or None.

    None when the file is missing or unreadable, or names a process of this host that is gone.
    """
    import time

    try:
        fd = os.open(f"{lock_path}{HOLDER_SUFFIX}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            raw = os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b""  # a FIFO: nothing to say
        finally:
            os.close(fd)
        lines = raw.decode("utf-8", "replace").split("\n")
        pid, host, since, command = int(lines[0]), lines[1], float(lines[2]), lines[3]
    except (OSError, ValueError, IndexError):
        return None
    if host == os.uname().nodename:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a stale file: its writer is gone (and so is its lock)
        except OSError:
            pass
    age = max(0.0, time.time() - since)
    return f"pid {pid} on {host} ({command or '?'}), holding it for {age:.0f} s"


@contextlib.contextmanager
def locked(lock_path: Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; raise BusyError (naming the holder if known) after `timeout` s.

    The lock is flock(2)-based: the kernel drops it when its holder dies, so a killed process never
    leaves a workspace locked.
    """
    from filelock import FileLock, Timeout  # imported here: keeps `import ckpt` light

    wait = lock_timeout() if timeout is None else timeout
    if is_symlink(lock_path):  # filelock opens with O_TRUNC: a link would truncate what it points to
        raise _link_error(lock_path, lock_path.name)
    lock = FileLock(str(lock_path), timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        holder = lock_holder(lock_path)
        by = f"by {holder}" if holder else "by another ckpt process"
        raise BusyError(
            f"{what} is locked {by}; gave up after waiting {wait:g} s",
            path=lock_path,
            hint="try again later, or wait longer with --wait SECONDS (or CKPT_LOCK_TIMEOUT)",
        ) from None
    holder_file = f"{lock_path}{HOLDER_SUFFIX}"
    try:
        _write_holder(holder_file)  # inside: an interrupt while it writes still lets the lock go
        yield
    finally:
        try:
            # removed while still held: a later holder's file is never removed by us
            with contextlib.suppress(OSError):
                os.unlink(holder_file)
        finally:  # released even when an interrupt (Ctrl-C, SIGTERM) lands on the unlink: the process lives on
            lock.release()


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


def _link_error(path: str | Path, shown: str) -> SymlinkError:
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
            raise _link_error(path, done)


def _open_own(path: str | Path, flags: int) -> int:
    """os.open of one of the workspace's own files with O_NOFOLLOW; a symlink there raises SymlinkError, and a FIFO,
    device or socket NotRegularFile (opened without blocking, then refused)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(path, os.path.basename(path)) from None
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


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read once."""
    import hashlib

    with os.fdopen(open_regular(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_tree(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file, or of a directory's files in sorted relative-path order."""
    import hashlib

    if not path.is_dir():
        return sha256_file(path), path.stat().st_size
    outer = hashlib.sha256()
    total = 0
    for rel in sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()):
        digest = sha256_file(path / rel)
        total += (path / rel).stat().st_size
        outer.update(f"{digest}  {rel}\n".encode())
    return outer.hexdigest(), total


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
    sfd = open_regular(src, os.O_NOFOLLOW)
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
    tmp, _, digest = write_new_file(dst.parent, dst.name, lambda w: _copy_into(src, w))
    try:
        move_noreplace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest


def _copy_into(src: Path, w: HashingWriter) -> None:
    with open_regular_file(src) as f:
        while chunk := f.read(CHUNK):
            w.write(chunk)


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


# --- trees and parallel hashing (import, scan, verify) -----------------------------------------------

# Reads for hashing: 256 KiB, as hashlib.file_digest reads. The buffer stays in the core's L2 cache between
# the read and the hash; 1 MiB and larger buffers measured slower, on one thread and on several.
HASH_BUFFER = 256 << 10


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


def tree_digest(files: list[tuple[str, str]]) -> str:
    """The sha256 of a directory checkpoint from its files' (relative path, sha256) pairs.

    It is sha256 over the lines `<file sha256>  <relative path>\\n` in sorted path order (the format
    of `sha256sum`'s output), the same digest `hash_tree` gives.
    """
    import hashlib

    outer = hashlib.sha256()
    for rel, digest in sorted(files):
        outer.update(f"{digest}  {rel}\n".encode())
    return outer.hexdigest()


def _sha256_path(path: str | Path, buf: bytearray, view: memoryview) -> str:
    import hashlib

    sha = hashlib.sha256()
    fd = open_regular(path)
    try:
        n = os.readv(fd, [buf])
        if n == len(buf):  # a large file: ask for a larger read-ahead (it may not be in the page cache)
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n:
            sha.update(view[:n])  # hashlib releases the GIL for large updates: threads hash in parallel
            n = os.readv(fd, [buf])
    finally:
        os.close(fd)
    return sha.hexdigest()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def hash_workers(total_bytes: int) -> int | None:
    """Threads for hashing `total_bytes`: one for a few MiB (threads cost more than they save on small
    files), else one per core (None: sha256_many's default)."""
    return 1 if total_bytes < 16 * 2**20 else None


def sha256_many(
    paths: list[Path], workers: int | None = None, done: Callable[[int], None] | None = None
) -> list[str | OSError]:
    """The sha256 of each file in `paths` (or the OSError reading it), hashed on all cores, each read once.

    Each thread takes the next file from a shared counter (no future per file, so thousands of small
    files cost little more than their bytes); give the largest files first for an even finish. `done`
    is called with each file's index once it is hashed (from the hashing threads).
    """
    n = min(workers or usable_cores(), len(paths))
    results: list[str | OSError] = [""] * len(paths)
    counter = itertools.count()

    def work() -> None:
        buf = bytearray(HASH_BUFFER)
        view = memoryview(buf)
        while (i := next(counter)) < len(paths):  # next() on a count is atomic in CPython
            try:
                results[i] = _sha256_path(paths[i], buf, view)
            except OSError as e:
                results[i] = e
            if done is not None:
                done(i)

    if n <= 1:
        work()
        return results
    import threading

    # this thread hashes too, beside n - 1 others: one thread per core in all
    threads = [threading.Thread(target=work, daemon=True) for _ in range(n - 1)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    return results


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
        move_noreplace(src, dst)
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
    for rel, _ in files if files is not None else tree_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        used.add(place_new(src / rel, target, "copy" if mode == "copy" else "link"))
    for kind in ("copy", "reflink", "hardlink"):
        if kind in used:
            return kind
    return "hardlink"  # pragma: no cover
