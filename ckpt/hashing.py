"""Hashing checkpoint files: one file, a folder's files as one digest, and many files on all cores."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path

from . import fsutil


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read once."""
    import hashlib

    with os.fdopen(fsutil.open_regular(path), "rb") as f:
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


# --- trees and parallel hashing (import, scan, verify) -----------------------------------------------

# Reads for hashing: 256 KiB, as hashlib.file_digest reads. The buffer stays in the core's L2 cache between
# the read and the hash; 1 MiB and larger buffers measured slower, on one thread and on several.
HASH_BUFFER = 256 << 10


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
    fd = fsutil.open_regular(path)
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
