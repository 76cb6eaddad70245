"""What the callbacks share; imports no training library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConflictError

if TYPE_CHECKING:
    from ..task_base import Task


def refuse_unless_running(task: Task) -> None:
    """Raise ConflictError, before any training, when `task` takes no new checkpoints (finished or failed)."""
    if task.status != "running":
        raise ConflictError(
            f"task '{task.name}' is {task.status}: it takes no new checkpoints, so this run would train and then "
            "fail at its first save",
            hint=f"give the callback a new task name (task=...); '{task.name}' was finished at the end of its "
            "training (or by ckpt finish) and keeps its checkpoints and model",
        )
