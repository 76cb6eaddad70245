"""ckpt: manage the checkpoints training runs leave behind.

import ckpt
ws = ckpt.Workspace.init("runs")
task = ws.create_task("unet-shapes", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2})
n = task.save(model.state_dict(), step=500, epoch=1, metrics={"val_iou": 0.41})
task.finish()
"""

from .background import PendingSave
from .errors import (
    BusyError,
    CheckpointNotFound,
    CkptError,
    ConflictError,
    IntegrityError,
    ManifestError,
    ModelNotFound,
    NotFoundError,
    TaskNotFound,
    UnsafeFileError,
    UsageError,
    WorkspaceNotFound,
)
from .manifest import Checkpoint
from .models import Model
from .task_base import Task, TaskSummary
from .workspace import FolderWorkspace
from .workspace_base import Workspace

__version__ = "0.1.0"


def _open_url(url: str, create: bool) -> Workspace:
    """A workspace in object storage (`s3://bucket/prefix`): made with `create`, else opened. The package is
    where both stores meet: ckpt.workspace_base (the workspace of any store) imports neither ckpt.workspace (the
    folder) nor ckpt.store (the bucket), which build on it; ckpt.store is imported only when a URL is opened."""
    from .store import StoreWorkspace

    return StoreWorkspace.init_url(url) if create else StoreWorkspace.open_url(url)


Workspace.url_opener = _open_url
Workspace.folder_opener = FolderWorkspace.at

__all__ = [
    "BusyError",
    "Checkpoint",
    "CheckpointNotFound",
    "CkptError",
    "ConflictError",
    "IntegrityError",
    "ManifestError",
    "Model",
    "ModelNotFound",
    "NotFoundError",
    "PendingSave",
    "Task",
    "TaskNotFound",
    "TaskSummary",
    "UnsafeFileError",
    "UsageError",
    "Workspace",
    "WorkspaceNotFound",
    "__version__",
]
