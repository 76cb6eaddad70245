"""The workspace of any store: opening one by path or URL, and what every store does alike over the steps each
gives (`FolderWorkspace` in ckpt.workspace, `StoreWorkspace` in ckpt.store)."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import fsutil
from .errors import (
    CkptError,
    ManifestError,
    UsageError,
    WorkspaceNotFound,
)
from .manifest import (
    Checkpoint,
)
from .storage import Storage, is_url
from .task_base import Task, TaskSummary

if TYPE_CHECKING:
    from .models import Model, ModelIndex
    from .trash_results import Repair
    from .verify import Stored

from .layout import WORKSPACE_FILE

T = TypeVar("T")


def find_workspace(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> Path:
    """Where the workspace is: `explicit`, else `CKPT_WORKSPACE`, else the nearest `ckpt.toml` upwards.

    Raises WorkspaceNotFound when none is found.
    """
    chosen = explicit if explicit not in (None, "") else os.environ.get("CKPT_WORKSPACE") or None
    if chosen is not None:
        root = fsutil.user_path(chosen)
        if not (root / WORKSPACE_FILE).is_file():
            raise WorkspaceNotFound(
                f"'{root}' is not a ckpt workspace (no {WORKSPACE_FILE})",
                path=root,
                hint=f"run: ckpt init {root}",
            )
        return root.resolve()
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / WORKSPACE_FILE).is_file():
            return folder
    raise WorkspaceNotFound(
        f"no ckpt workspace here or above ({here})",
        path=here,
        hint="run: ckpt init, or pass --workspace/-w or set CKPT_WORKSPACE",
    )


class Workspace(ABC):
    """A ckpt workspace: a folder with `ckpt.toml` at its root, or a URL (`s3://bucket/prefix`, see ckpt.store)."""

    remote = False  # True for a workspace in object storage (ckpt.store.StoreWorkspace); informational only

    storage: Storage  # the primitives every operation runs over (a folder's FolderStorage, a bucket's Storage)

    def __init__(self, root: Path, settings: dict[str, Any] | None = None, metric_modes: dict[str, str] | None = None):
        self.root = root
        self.settings = settings or {}
        # ckpt.toml's [metrics]: the workspace's default direction per metric (see ckpt.metrics)
        self.metric_modes = metric_modes or {}
        self._tasks: dict[str, Task] = {}

    # How a workspace named by a URL is made or opened: (url, create) -> the workspace. Set once by the package
    # (ckpt/__init__.py), which knows both stores; this module knows only the folder (no import of ckpt.store).
    url_opener: ClassVar[Callable[[str, bool], Workspace] | None] = None

    @classmethod
    def _url(cls, url: str, create: bool) -> Workspace:
        opener = Workspace.url_opener
        if opener is None:  # pragma: no cover (ckpt/__init__.py sets it whenever ckpt.workspace is imported)
            raise UsageError(f"cannot open {url!r}: import ckpt first")
        return opener(url, create)

    # How a folder is made or opened: (path, create) -> the workspace. Set once by the package, as url_opener is.
    folder_opener: ClassVar[Callable[[str | os.PathLike[str] | None, bool], Workspace] | None] = None

    @classmethod
    def init(cls, path: str | os.PathLike[str] = ".") -> Workspace:
        """Create a workspace at `path` (the folder may exist) and return it; an existing one is opened.

        `path` may be a URL (`s3://bucket/prefix`): the workspace is then made in object storage.
        """
        if is_url(path):
            return cls._url(str(path), True)
        return cls._folder(path, True)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Workspace:
        """Open the workspace at `path` (or found as find_workspace does); raises WorkspaceNotFound, ManifestError.

        `path` (or `CKPT_WORKSPACE`) may be a URL such as `s3://bucket/prefix` (needs the `s3` extra).
        """
        chosen = path if path not in (None, "") else os.environ.get("CKPT_WORKSPACE") or None
        if is_url(chosen):
            return cls._url(str(chosen), False)
        return cls._folder(path, False)

    @classmethod
    def _folder(cls, path: str | os.PathLike[str] | None, create: bool) -> Workspace:
        opener = Workspace.folder_opener
        if opener is None:  # pragma: no cover (ckpt/__init__.py sets it whenever ckpt is imported)
            raise UsageError(f"cannot open {path!r}: import ckpt first")
        return opener(path, create)

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    def promote(
        self,
        task: str,
        number: int | None = None,
        *,
        title: str | None = None,
        best: str | None = None,
        mode: str | None = None,
        minimize: bool = False,
        copy: bool = False,
    ) -> Model:
        """Make model `title` (default `TASK-N`) from checkpoint `number` of `task`, or the best by metric `best`
        (`mode` "min"/"max" or `minimize`; else the direction the task, the workspace or the name gives).
        Promoting the same checkpoint under its title again returns the existing model."""
        from .models import promote

        return promote(self, task, number, title=title, best=best, mode=mode, minimize=minimize, copy=copy).model

    def models_of(self, task: str) -> dict[int, list[str]]:
        """Titles of the models made from each checkpoint number of `task`."""
        from .models import models_by_checkpoint

        return models_by_checkpoint(self, task)

    def forget_task(self, name: str) -> None:
        """Drop the handle of task `name` (it was removed): the next `task(name)` looks again."""
        self._tasks.pop(name, None)

    # -- the steps each store gives --

    @property
    @abstractmethod
    def location(self) -> str: ...

    @abstractmethod
    def model_local_path(self, model: Model) -> Path: ...

    @abstractmethod
    def holds(self, path: Path) -> bool: ...

    @abstractmethod
    def rel(self, path: Path) -> str: ...

    def create_task(
        self,
        name: str,
        *,
        arch: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        settings: Mapping[str, Any] | None = None,
        metric_modes: Mapping[str, str] | None = None,
        source: Mapping[str, str] | None = None,
        policy: Any = None,
    ) -> Task:
        """Create task `name` and return it. With `exist_ok`, an existing task is returned instead.

        `arch` is the network's factory as "package.module:factory", `arch_kwargs` its keyword
        arguments (JSON-serialisable; None is kept); `metric_modes` says which way each metric is better
        ("min" or "max"); `source` is where an import's files come from ({"path", "how"}); `policy` is
        the task's retention policy (ckpt.policy: `{"keep_last": 3, "keep_best": 2, "metric": "val_loss"}`),
        applied in the background after each save (also to an existing task, with `exist_ok`). Raises
        UsageError for a bad name, ConflictError when it exists (without `exist_ok`).
        """
        if policy is not None:
            from .policy import rules_of, set_policy

            rules_of(policy)  # a malformed policy is refused before the task is made
        task = self.make_task(
            name,
            arch=arch,
            arch_kwargs=arch_kwargs,
            exist_ok=exist_ok,
            settings=settings,
            metric_modes=metric_modes,
            source=source,
        )
        if policy is not None:
            set_policy(self, name, policy)
        return task

    @abstractmethod
    def make_task(
        self,
        name: str,
        *,
        arch: str | None,
        arch_kwargs: Mapping[str, Any] | None,
        exist_ok: bool,
        settings: Mapping[str, Any] | None,
        metric_modes: Mapping[str, str] | None,
        source: Mapping[str, str] | None,
    ) -> Task:
        """The store's step of `create_task`: the task made (its manifest written), or the existing one."""

    @abstractmethod
    def task(self, name: str) -> Task: ...

    @abstractmethod
    def task_names(self) -> list[str]: ...

    @abstractmethod
    def orphan_task_folders(self) -> list[str]: ...

    @abstractmethod
    def remove_unfinished_task(self, name: str, *, dry_run: bool) -> bool:
        """Remove task folder `name` when it is only what a task creation that stopped before its manifest
        leaves (on a dry run: say so); whether it was (or would be)."""

    @abstractmethod
    def linked_task_folders(self) -> list[CkptError]: ...

    @abstractmethod
    def tasks(self) -> tuple[list[TaskSummary], list[CkptError]]: ...

    @abstractmethod
    def tasks_rendered(self, form: str, render: Callable[[TaskSummary], str]) -> tuple[list[str], list[CkptError]]: ...

    @property
    @abstractmethod
    def models(self) -> ModelIndex: ...

    @abstractmethod
    def read_settings(self) -> dict[str, Any]: ...

    @abstractmethod
    def update_settings(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]: ...

    @abstractmethod
    def usage(self, prefixes: list[str]) -> tuple[list[int], int]: ...

    @abstractmethod
    def stored_files(self, rels: list[str]) -> list[list[Stored] | str | None]: ...

    @abstractmethod
    def hash_files(self, handles: list[Any], total: int, done: Callable[[int], None]) -> list[str | OSError]: ...

    @abstractmethod
    def trash_entry_ids(self) -> tuple[list[str], list[CkptError]]: ...

    @abstractmethod
    def trash_leftovers(self) -> list[Path]: ...

    @abstractmethod
    def mend(self, name: str, error: ManifestError, *, dry_run: bool, drop_bad: bool) -> tuple[list[Repair], bool]: ...

    @abstractmethod
    def leftovers(self, *, dry_run: bool, stale_after: float | None = None) -> list[Repair]: ...

    @abstractmethod
    def exclusive(self, what: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def title_lease(
        self, title: str, token: str, taken: CkptError
    ) -> contextlib.AbstractContextManager[Callable[[], None]]: ...

    @abstractmethod
    def model_folder(self, title: str) -> Path: ...

    @abstractmethod
    def model_staging(self, title: str) -> contextlib.AbstractContextManager[Path]: ...

    @abstractmethod
    def add_model(self, task: str, number: int, title: str, staged: Path, doc: bytes) -> None: ...

    @abstractmethod
    def make_model(self, task: Task, cp: Checkpoint, title: str, copy: bool) -> Model: ...

    @abstractmethod
    def move_model(self, model: Model, new: str) -> Model: ...
