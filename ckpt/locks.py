"""The workspace locks: flock(2)-based, with a holder file naming who holds one, and the wait before giving up."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from . import fsutil
from .errors import BusyError

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
    if fsutil.is_symlink(lock_path):  # filelock opens with O_TRUNC: a link would truncate what it points to
        raise fsutil.link_error(lock_path, lock_path.name)
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
