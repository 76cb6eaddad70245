"""The file to resume from: a checkpoint's path, checked against its record before it is handed out.

`ckpt latest --path` and the Lightning callback's `resume_path` give a training script a path that it loads
at once; a file that is missing or whose size is not the one recorded would fail there, far from the cause.
In a folder the checkpoint's own file is checked (exists, size); in a bucket, the local cached copy (verified
by sha256 when it was downloaded) is checked for its size, and downloaded again when it changed since.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import fsutil
from .errors import CkptError, IntegrityError

if TYPE_CHECKING:
    from .manifest import Checkpoint
    from .task_base import Task


def _size(path: Path) -> int | None:
    """The bytes of a file, or of every file under a folder; None when it is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if os.path.isdir(path):
        try:
            return sum(size for _, size in fsutil.tree_files(path))
        except (OSError, CkptError):
            return None
    return st.st_size


def resume_path(task: Task, cp: Checkpoint) -> Path:
    """An absolute local path to `cp`'s file whose size is the one recorded; raises IntegrityError (exit 6)."""
    if not task.ws.remote:
        from .readcheck import check_readable

        check_readable(task.ws, task.path_of(cp), task=task.name)  # never a path through a link (exit 6)
        path = Path(os.path.abspath(task.path_of(cp)))
        size = _size(path)
        if size is None:
            raise IntegrityError(
                f"checkpoint {cp.number} of task '{task.name}' is recorded but its file {path} is missing",
                path=path,
                hint=f"run: ckpt verify {task.name}",
            )
        if size != cp.size:
            raise IntegrityError(
                f"the file of checkpoint {cp.number} of task '{task.name}' ({path}) has {size} bytes, "
                f"not the {cp.size} recorded",
                path=path,
                hint=f"run: ckpt verify {task.name}",
            )
        return path
    path = Path(os.path.abspath(task.local_path(cp)))
    if _size(path) != cp.size:  # the cached copy changed since it was downloaded and verified: fetch it again
        fsutil.remove_tree(path)
        path = Path(os.path.abspath(task.local_path(cp)))
        if _size(path) != cp.size:
            raise IntegrityError(
                f"the local copy of checkpoint {cp.number} of task '{task.name}' ({path}) does not have the "
                f"{cp.size} bytes recorded",
                path=path,
                hint="remove the local cache (CKPT_CACHE) and run again",
            )
    return path
