"""The workspace and its tasks: the library that training scripts call, and the core the CLI uses."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, overload

from . import fsutil
from .errors import (
    CheckpointNotFound,
    CkptError,
    ConflictError,
    IntegrityError,
    ManifestError,
    TaskNotFound,
    UsageError,
    WorkspaceNotFound,
)
from .manifest import (
    FORMAT,
    STATUSES,
    Checkpoint,
    TaskHeader,
    TaskState,
    dumps,
    read_toml,
    record_bytes,
    task_bytes,
    workspace_doc,
)
from .metrics import Direction, check_modes, direction
from .names import case_twin, check_task_name
from .row_caches import RowCache, SummaryCache, TaskRowsCache
from .storage import Storage, is_url
from .storage.folder import FolderStorage
from .task_reader import TaskReader
from .timeutil import now_iso

if TYPE_CHECKING:
    from .background import PendingSave
    from .importer import Unknown
    from .models import Model, ModelIndex
    from .staging import Marker
    from .trash_results import Repair
    from .verify import Stored

from .layout import (  # noqa: F401 (re-exported: where tests and older callers find them)
    CACHE_FILE,
    CHECKPOINT_DIR,
    CREATE_LOCK_FILE,
    IMPORT_MARKER_PREFIX,
    LIST_CACHE_FILE,
    LOCK_FILE,
    PENDING_PREFIX,
    SETTINGS_LOCK,
    STAGING_PREFIX,
    SUMMARY_CACHE_FILE,
    TASK_FILE,
    TASK_ROWS_CACHE_FILE,
    WORKSPACE_FILE,
    Incoming,
)

T = TypeVar("T")


def find_workspace(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> Path:
    """Where the workspace is: `explicit`, else `CKPT_WORKSPACE`, else the nearest `ckpt.toml` upwards.

    Raises WorkspaceNotFound when none is found.
    """
    chosen = explicit if explicit not in (None, "") else os.environ.get("CKPT_WORKSPACE") or None
    if chosen is not None:
        root = Path(chosen).expanduser()
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


@dataclass(slots=True)
class TaskSummary:
    """One row of `ckpt tasks`. Every field comes from the task manifest alone: Workspace.tasks caches them."""

    name: str
    status: str
    checkpoints: int
    size: int
    created: str
    latest: int | None
    latest_metrics: dict[str, float] = field(default_factory=dict)


_SUMMARY_FIELDS = tuple(f.name for f in fields(TaskSummary))


def _valid_summary(row: dict[str, Any], name: str) -> bool:
    """Whether a cached summary row holds what a summary of task `name` may (a cache is other people's input)."""
    if set(row) != set(_SUMMARY_FIELDS) or row["name"] != name or row["status"] not in STATUSES:
        return False
    metrics = row["latest_metrics"]
    return (
        type(row["checkpoints"]) is int
        and type(row["size"]) is int
        and type(row["created"]) is str
        and (row["latest"] is None or type(row["latest"]) is int)
        and type(metrics) is dict
        and all(type(v) in (int, float) for v in metrics.values())
    )


@dataclass(slots=True)
class CachedRows:
    """What `Task.keep_rows` kept: the text of every checkpoint's row, and which ones are reached through a symlink."""

    text: memoryview
    linked: list[tuple[int, str]]
    raw_index: memoryview

    def index(self) -> tuple[list[int], list[int]] | None:
        """(numbers, starts): the checkpoint numbers (ascending) and where each one's row starts in `text`."""
        return RowCache.parse_index(self.raw_index)


# a folder whose mtime is this recent may change again within the same timestamp (coarse clocks, FAT's 2 s):
# its scan is not kept
SETTLED_NS = 2_000_000_000


class Workspace:
    """A ckpt workspace: a folder with `ckpt.toml` at its root, or a URL (`s3://bucket/prefix`, see ckpt.store)."""

    remote = False  # True for a workspace in object storage (ckpt.store.StoreWorkspace); informational only

    def __init__(self, root: Path, settings: dict[str, Any] | None = None, metric_modes: dict[str, str] | None = None):
        self.root = root
        self.storage: Storage = FolderStorage(root)  # the primitives the trash operations use (ckpt.trash)
        self.settings = settings or {}
        # ckpt.toml's [metrics]: the workspace's default direction per metric (see ckpt.metrics)
        self.metric_modes = metric_modes or {}
        self._tasks: dict[str, Task] = {}

    # -- opening --

    # How a workspace named by a URL is made or opened: (url, create) -> the workspace. Set once by the package
    # (ckpt/__init__.py), which knows both stores; this module knows only the folder (no import of ckpt.store).
    url_opener: ClassVar[Callable[[str, bool], Workspace] | None] = None

    @classmethod
    def _url(cls, url: str, create: bool) -> Workspace:
        opener = Workspace.url_opener
        if opener is None:  # pragma: no cover (ckpt/__init__.py sets it whenever ckpt.workspace is imported)
            raise UsageError(f"cannot open {url!r}: import ckpt first")
        return opener(url, create)

    @classmethod
    def init(cls, path: str | os.PathLike[str] = ".") -> Workspace:
        """Create a workspace at `path` (the folder may exist) and return it; an existing one is opened.

        `path` may be a URL (`s3://bucket/prefix`): the workspace is then made in object storage.
        """
        if is_url(path):
            return cls._url(str(path), True)
        root = Path(path).expanduser()
        if (root / WORKSPACE_FILE).exists():
            return cls.open(root)
        if root.exists() and not root.is_dir():
            raise ConflictError(f"'{root}' exists and is not a folder", path=root)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("tasks", "models", "trash"):
            (root / sub).mkdir(exist_ok=True)
        # the workspace file comes last: a folder is a workspace only once its layout exists
        fsutil.atomic_write(root / WORKSPACE_FILE, dumps({"format": FORMAT, "settings": {}}))
        return cls.open(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Workspace:
        """Open the workspace at `path` (or found as find_workspace does); raises WorkspaceNotFound, ManifestError.

        `path` (or `CKPT_WORKSPACE`) may be a URL such as `s3://bucket/prefix` (needs the `s3` extra).
        """
        chosen = path if path not in (None, "") else os.environ.get("CKPT_WORKSPACE") or None
        if is_url(chosen):
            return cls._url(str(chosen), False)
        root = find_workspace(path)
        for own in (WORKSPACE_FILE, "tasks", "models", "trash"):
            fsutil.refuse_links(root, own)  # before anything is read or made through one
        settings, modes = workspace_doc(read_toml(root / WORKSPACE_FILE, "workspace"), root / WORKSPACE_FILE)
        for sub in ("tasks", "models", "trash"):
            (root / sub).mkdir(exist_ok=True)
        return cls(root, settings, modes)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @property
    def location(self) -> str:
        """Where the workspace is, as a user would name it: an absolute folder or a URL."""
        return str(self.root.resolve())

    def model_local_path(self, model: Model) -> Path:
        """A local path to the model's weights, for reading (object storage: downloaded to a cache)."""
        return model.path

    def holds(self, path: Path) -> bool:
        """Whether local `path` is inside this workspace."""
        return path.resolve().is_relative_to(self.root.resolve())

    # -- paths --

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    def rel(self, path: Path) -> str:
        """`path` relative to the workspace root, with forward slashes, as text (pathtext: a name may not be UTF-8)."""
        from .pathtext import escape_path  # here: `import ckpt` need not pay for it

        try:
            return escape_path(path.relative_to(self.root).as_posix())
        except ValueError:
            return escape_path(path)

    # -- tasks --

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
            task = self.create_task(
                name,
                arch=arch,
                arch_kwargs=arch_kwargs,
                exist_ok=exist_ok,
                settings=settings,
                metric_modes=metric_modes,
                source=source,
            )
            set_policy(self, name, policy)
            return task
        check_task_name(name)
        if arch is not None and (not isinstance(arch, str) or ":" not in arch):
            raise UsageError(f"invalid architecture {arch!r}", hint="use 'package.module:factory'")
        folder = self.tasks_dir / name
        if (folder / TASK_FILE).exists():
            if exist_ok:
                return self.task(name)
            raise ConflictError(f"task '{name}' already exists", path=folder, hint=f"see: ckpt list {name}")
        self._refuse_case_twin(name)  # before anything is written; again under the creation lock below
        header = TaskHeader(
            name=name,
            status="running",
            created=now_iso(),
            arch=arch,
            arch_kwargs=dict(arch_kwargs) if arch_kwargs is not None else None,
            settings=dict(settings or {}),
            metric_modes=check_modes(metric_modes),
            source=dict(source) if source else None,
        )
        try:
            import json

            json.dumps(header.arch_kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"architecture keyword arguments are not JSON-serialisable: {e}") from None
        fsutil.refuse_links(self.root, f"tasks/{name}/{CHECKPOINT_DIR}")
        fsutil.make_dirs(self.tasks_dir)
        # one creation at a time in the workspace: two processes creating `A` and `a` must not both pass
        # the case check before either folder exists
        with fsutil.locked(self.tasks_dir / CREATE_LOCK_FILE, "task creation"):
            self._refuse_case_twin(name)
            (folder / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            with fsutil.locked(folder / LOCK_FILE, f"task '{name}'"):
                if (folder / TASK_FILE).exists():
                    if exist_ok:
                        return self.task(name)
                    raise ConflictError(f"task '{name}' already exists", path=folder)
                fsutil.atomic_write(folder / TASK_FILE, task_bytes(TaskState(header, {})))
        return self.task(name)

    def _refuse_case_twin(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            twin = case_twin(name, os.listdir(self.tasks_dir))
            if twin is not None:
                raise ConflictError(
                    f"task '{name}' differs from task '{twin}' only in case",
                    path=self.tasks_dir / name,
                    hint="names must stay distinct on case-insensitive file systems; choose another name",
                )

    def task(self, name: str) -> Task:
        """The task called `name`; raises TaskNotFound."""
        check_task_name(name)
        if name in self._tasks:
            return self._tasks[name]
        folder = self.tasks_dir / name
        t = Task(self, name)
        t.refuse_links()  # tasks/, the task folder, checkpoints/, its manifest, caches and lock: before any is read
        manifest = folder / TASK_FILE
        if not os.path.lexists(manifest) or os.path.isdir(manifest):  # a FIFO or device: refused when it is read
            if folder.is_dir() and (folder / CHECKPOINT_DIR).is_dir():
                raise ManifestError(
                    f"task manifest {self.rel(folder / TASK_FILE)} is missing", path=folder, hint="run: ckpt doctor"
                )
            raise TaskNotFound(f"task '{name}' does not exist", path=folder, hint="see: ckpt tasks")
        self._tasks[name] = t
        return t

    def task_names(self) -> list[str]:
        """Names of the task folders that hold a manifest (`task` refuses one that is a link), sorted; a task folder
        that is a link is not one of them (see `linked_task_folders`)."""
        folder = str(self.tasks_dir)
        return [
            name
            for name, linked in self._task_folders()
            if not linked and os.path.lexists(os.path.join(folder, name, TASK_FILE))
        ]

    def orphan_task_folders(self) -> list[str]:
        """Names of the folders in tasks/ without a manifest (a crash or a hand deletion): no task, but their
        checkpoint files are there; `ckpt doctor --recreate-manifests` makes them tasks again."""
        folder = str(self.tasks_dir)
        return [
            name
            for name, linked in self._task_folders()
            if not linked and not os.path.lexists(os.path.join(folder, name, TASK_FILE))
        ]

    def linked_task_folders(self) -> list[CkptError]:
        """A SymlinkError for each symlink in tasks/ where a task folder would be: reported, never followed."""
        errors: list[CkptError] = []
        for name, linked in self._task_folders():
            if linked:
                try:
                    fsutil.refuse_links(self.root, f"tasks/{name}")
                except CkptError as e:
                    errors.append(e)
        return errors

    def _task_folders(self) -> list[tuple[str, bool]]:
        """(name, is a symlink) of the folders and symlinks in tasks/ not hidden, sorted by name; the folders holding
        a manifest are tasks (a symlink is reported, never followed)."""
        try:
            with os.scandir(self.tasks_dir) as it:
                names = [
                    (e.name, e.is_symlink())
                    for e in it
                    if not e.name.startswith(".") and (e.is_symlink() or e.is_dir(follow_symlinks=False))
                ]
        except FileNotFoundError:
            return []
        names.sort()
        return names

    def tasks(self) -> tuple[list[TaskSummary], list[CkptError]]:
        """A summary of every task, and the errors of tasks that could not be read."""
        names = self.task_names()
        summaries, errors = self._summaries(names, names)
        return [s for s in summaries if s is not None], errors + self.linked_task_folders()

    def tasks_rendered(self, form: str, render: Callable[[TaskSummary], str]) -> tuple[list[str], list[CkptError]]:
        """`render` of the summary of every task, in `tasks` order, and the errors of tasks that could not be read.

        The text is kept in tasks/.tasks.rows.cache.json and used again while one `stat` of the task's manifest
        is what it was (see row_caches.TaskRowsCache); `form` names how `render` renders: a change must change it.
        """
        folder = str(self.tasks_dir)  # plain strings joined by hand: os.path.join is half the time of a stat
        cache = TaskRowsCache(self.tasks_dir / TASK_ROWS_CACHE_FILE, form)
        names: list[str] = []
        texts: list[str | None] = []
        missed: list[tuple[int, os.stat_result]] = []
        for name, linked in self._task_folders():
            try:
                st = os.lstat(f"{folder}/{name}/{TASK_FILE}" if not linked else f"{folder}/{name}")
            except (OSError, ValueError):
                continue  # no manifest: not a task (task_names' os.path.lexists)
            text = None if linked or stat.S_ISLNK(st.st_mode) else cache.get(name, st)
            if text is None:
                missed.append((len(names), st))
            names.append(name)
            texts.append(text)
        errors: list[CkptError] = []
        if missed:
            summaries, errors = self._summaries([names[i] for i, _ in missed], names)
            settled = time.time_ns() - SETTLED_NS
            for (i, st), summary in zip(missed, summaries, strict=True):
                if summary is None:
                    cache.drop(names[i])
                    continue
                texts[i] = text = render(summary)
                # a manifest changed less than 2 s before its stat could change again with the same ctime
                if st.st_ctime_ns <= settled:
                    cache.put(names[i], st, text)
                else:
                    cache.drop(names[i])
        cache.save(names)
        return [t for t in texts if t is not None], errors

    def _summaries(self, names: list[str], tasks: list[str]) -> tuple[list[TaskSummary | None], list[CkptError]]:
        """The summary of each task of `names` (None for one that could not be read) and the errors; `tasks` are
        all the tasks there are (the summary cache forgets the others)."""
        rows: list[TaskSummary | None] = []
        errors: list[CkptError] = []
        # one derived file instead of 1,000 per-task caches: ckpt tasks stays within its start-up time
        cache = SummaryCache(self.tasks_dir / SUMMARY_CACHE_FILE, _SUMMARY_FIELDS)
        folder = str(self.tasks_dir)  # plain strings: 1,000 tasks' Path objects cost a visible part of the time
        for name in names:
            hit = cache.get(name, os.path.join(folder, name, TASK_FILE))
            if hit is not None and _valid_summary(hit, name):
                rows.append(TaskSummary(**hit))
                continue
            try:
                task = self.task(name)
                summary = task.summary()
            except CkptError as e:
                errors.append(e)
                rows.append(None)
                continue
            rows.append(summary)
            cache.put(name, task._reader, {k: getattr(summary, k) for k in _SUMMARY_FIELDS})
        cache.save(tasks)
        return rows, errors

    # -- models (see models.py) --

    @property
    def models(self) -> ModelIndex:
        """Every model of the workspace: iterable, `len()`, and indexable by title."""
        from .models import ModelIndex

        return ModelIndex(self)

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

    def read_settings(self) -> dict[str, Any]:
        """`ckpt.toml` as read now (checked as `open` checks it)."""
        path = self.root / WORKSPACE_FILE
        doc = read_toml(path, "workspace")
        workspace_doc(doc, path)
        return doc

    def update_settings(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply `change` to `ckpt.toml` and write it back whole (temporary file, fsync, rename) under the
        workspace's lock, one change at a time; everything else in the file is kept. The new document."""
        path = self.root / WORKSPACE_FILE
        fsutil.refuse_links(self.root, WORKSPACE_FILE)
        with fsutil.locked(self.tasks_dir / SETTINGS_LOCK, "the workspace's ckpt.toml"):
            doc = read_toml(path, "workspace")
            change(doc)
            workspace_doc(doc, path)  # never write what the next open would refuse
            fsutil.atomic_write(path, dumps(doc))
        return doc

    def usage(self, prefixes: list[str]) -> tuple[list[int], int]:
        """Bytes on disk under each of `prefixes`, each inode counted once, in the order given; and the bytes
        of the rest of the workspace. A file that vanishes while walked (a save or a trash at the same
        time) counts 0."""
        seen: set[object] = set()
        sizes = [self._usage(self.root / p, seen) for p in prefixes]
        return sizes, self._usage(self.root, seen)

    @staticmethod
    def _usage(path: Path, seen: set[object]) -> int:
        try:
            return fsutil.disk_usage(path, seen)
        except OSError:
            return 0

    def stored_files(self, rels: list[str]) -> list[list[Stored] | str | None]:
        """The store's step of verify: the files under each path (a file, or a folder's files in sorted order),
        keyed by inode; None where nothing is, a note where the path cannot be read (a symlink)."""
        from .verify import Stored

        out: list[list[Stored] | str | None] = []
        for rel in rels:
            path = self.root / rel
            if not os.path.lexists(path):
                out.append(None)
                continue
            if fsutil.is_symlink(path):
                out.append("is a symlink")
                continue
            try:
                entries = [(r, path / r) for r, _ in fsutil.tree_files(path)] if path.is_dir() else [("", path)]
                files = []
                for name, p in entries:
                    st = os.stat(p, follow_symlinks=False)
                    files.append(Stored(name, st.st_size, (st.st_dev, st.st_ino), p))
            except (CkptError, OSError) as e:
                out.append(str(e))
                continue
            out.append(files)
        return out

    def hash_files(self, handles: list[Any], total: int, done: Callable[[int], None]) -> list[str | OSError]:
        """The store's step of verify: the sha256 of each file, on all cores; `done(i)` as each is hashed."""
        return fsutil.sha256_many(handles, workers=fsutil.hash_workers(total), done=done)

    def trash_entry_ids(self) -> tuple[list[str], list[CkptError]]:
        """The folders under trash/ named as entries, oldest first, and an error for each that is a symlink
        (reported, never followed: emptying removes the link only, restoring refuses it)."""
        from .trash_entry import ENTRY_ID

        try:
            with os.scandir(self.trash_dir) as it:
                found = [
                    (e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in it if ENTRY_ID.fullmatch(e.name)
                ]
        except FileNotFoundError:
            return [], []
        links: list[CkptError] = [
            IntegrityError(
                f"trash entry '{name}' is a symlink; ckpt does not follow it",
                path=self.trash_dir / name / "entry.toml",
                hint=f"remove the link {self.rel(self.trash_dir / name)} by hand",
            )
            for name in sorted(n for n, link, _ in found if link)
        ]
        return sorted(n for n, _, d in found if d), links

    def trash_leftovers(self) -> list[Path]:
        """What an older ckpt's interrupted `trash empty` left to delete: folders renamed aside (`.deleting-*`)."""
        from .trash_entry import DELETING_PREFIX

        try:
            with os.scandir(self.trash_dir) as it:
                return sorted(Path(e.path) for e in it if e.name.startswith(DELETING_PREFIX))
        except FileNotFoundError:
            return []

    def mend(self, name: str, error: ManifestError, *, dry_run: bool, drop_bad: bool) -> tuple[list[Repair], bool]:
        """The store's step of doctor for task `name`'s manifest that does not parse (see ckpt.mend): what it
        found, and whether the manifest parses now."""
        from .mend import mend_manifest

        task = self._tasks.get(name) or Task(self, name)
        return mend_manifest(task, error, dry_run=dry_run, drop_bad=drop_bad)

    def leftovers(self, *, dry_run: bool, stale_after: float | None = None) -> list[Repair]:
        """The store's step of doctor: a promote's staging folders and temporary files, once stale."""
        from .mend import folder_leftovers
        from .trash_entry import STALE_AFTER

        return folder_leftovers(self, dry_run=dry_run, stale_after=STALE_AFTER if stale_after is None else stale_after)

    @contextlib.contextmanager
    def exclusive(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the workspace's lock of `what` (one name: "the trash") for a multi-step change of models and
        trash entries; raises BusyError. A store without locks holds nothing (its commits are conditional)."""
        with self.storage.locked(what, timeout):  # type: ignore[attr-defined]
            yield

    @contextlib.contextmanager
    def title_lease(self, title: str, token: str, taken: CkptError) -> Iterator[Callable[[], None]]:
        """Hold model title `title` for a change that makes it (a model restore); yields the lease's renewal
        (nothing to renew on a folder: the claim is a lock). Raises ConflictError for a case twin."""
        from .models import title_claim

        with title_claim(self, title):
            yield lambda: None

    def model_folder(self, title: str) -> Path:
        """Where model `title`'s folder is (a `Model`'s `folder`)."""
        return self.models_dir / title

    @contextlib.contextmanager
    def model_staging(self, title: str) -> Iterator[Path]:
        """A new folder to build model `title` in, beside models/ (so that `add_model` renames it into place);
        removed afterwards with whatever is left in it."""
        fsutil.refuse_links(self.root, "models")
        self.models_dir.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".staging-{title}-", dir=self.models_dir))
        os.chmod(tmp, fsutil.DIR_MODE)  # the model's folder: as mkdir (promote) makes them, not mkdtemp's 0700
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def add_model(self, task: str, number: int, title: str, staged: Path, doc: bytes) -> None:
        """The store's step of `export --as-model`: the files built in `staged` become model `title` with `doc`
        as its model.toml, whole or not at all, while checkpoint `number` of `task` is still there;
        ConflictError when the title exists, CheckpointNotFound when the checkpoint was trashed."""
        from .models import add_folder_model

        add_folder_model(self, task, number, title, staged, doc)

    def make_model(self, task: Task, cp: Checkpoint, title: str, copy: bool) -> Model:
        """The store's step of promote: model `title` of checkpoint `cp`, whole or not at all (a folder built
        aside and renamed into place); ConflictError when the title exists."""
        from .models import make_folder_model

        return make_folder_model(self, task, cp, title, copy)

    def move_model(self, model: Model, new: str) -> Model:
        """The store's step of rename: model `model` under title `new`, whole under one title at every moment."""
        from .models import move_folder_model

        return move_folder_model(self, model, new)

    def models_of(self, task: str) -> dict[int, list[str]]:
        """Titles of the models made from each checkpoint number of `task`."""
        from .models import models_by_checkpoint

        return models_by_checkpoint(self, task)


class Task:
    """One training run in a workspace: its manifest and its checkpoint files."""

    def __init__(self, ws: Workspace, name: str):
        self.ws = ws
        self.name = name
        self.folder = ws.tasks_dir / name
        self.manifest = self.folder / TASK_FILE
        self._reader = TaskReader(self.manifest, self.folder / CACHE_FILE, name)
        self._marks: dict[str, list[Any] | None] | None = None  # what the last `linked` depended on
        self._marks_of: list[Checkpoint] | None = None  # ... and the checkpoints it was given
        self._holder: int | None = None  # the thread that holds the task's lock through this handle (see lock)

    def __repr__(self) -> str:
        return f"Task({self.name!r})"

    def refuse_links(self) -> None:
        """Raise SymlinkError when `tasks/`, the task folder, `checkpoints/`, or one of the task's own files is a link.

        Checked when the task is opened and again before every change (under `lock`), so that nothing is read or
        written through one (a link there may lead out of the workspace).
        """
        fsutil.refuse_links(self.ws.root, f"tasks/{self.name}/{CHECKPOINT_DIR}")
        for own in (TASK_FILE, LOCK_FILE, CACHE_FILE, LIST_CACHE_FILE):
            fsutil.refuse_links(self.folder, own, f"tasks/{self.name}")

    # -- reading --

    def state(self) -> TaskState:
        """The manifest as it is now (re-reading only what changed)."""
        try:
            state = self._reader.read()
        except ManifestError as e:
            if e.hint is None:
                e.hint = "see: ckpt doctor --dry-run"  # it cuts off a record a crash left incomplete
            raise
        if state.header.name != self.name:
            raise ManifestError(
                f"{self.manifest}: 'name' is {state.header.name!r} but the folder is '{self.name}'", path=self.manifest
            )
        return state

    def refresh_cache(self) -> None:
        self._reader.save_cache()

    @property
    def header(self) -> TaskHeader:
        return self.state().header

    def direction(self, metric: str, flag: str | None = None, flags: str = "--min or --max") -> Direction:
        """Which way `metric` is better for this task: the flag, the task, the workspace, the name (ckpt.metrics).

        Raises UsageError when none of them says.
        """
        header = self.header
        detail = ""
        if header.source and metric in header.metric_modes:
            detail = f"recorded by import from {header.source.get('path', 'elsewhere')}"
        return direction(
            metric,
            flag=flag,
            task_modes=header.metric_modes,
            task_detail=detail,
            workspace_modes=self.ws.metric_modes,
            flags=flags,
        )

    @property
    def status(self) -> str:
        return self.header.status

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The task's checkpoints in number order."""
        cps = self.state().checkpoints
        return [cps[n] for n in sorted(cps)]

    def checkpoint(self, number: int) -> Checkpoint:
        """Checkpoint `number`; raises CheckpointNotFound naming the numbers the task has."""
        cps = self.state().checkpoints
        if number in cps:
            return cps[number]
        if cps:
            have = f"it has {ranges(sorted(cps))}"
        else:
            have = "it has none"
        raise CheckpointNotFound(
            f"task '{self.name}' has no checkpoint {number} ({have})", hint=f"see: ckpt list {self.name}"
        )

    def latest(self) -> Checkpoint | None:
        """The checkpoint with the highest number, or None."""
        cps = self.state().checkpoints
        return cps[max(cps)] if cps else None

    def path_of(self, cp: Checkpoint) -> Path:
        return self.folder / cp.file

    def local_path(self, cp: Checkpoint) -> Path:
        """A local path to the checkpoint's file, for reading (object storage: downloaded to a cache)."""
        return self.path_of(cp)

    def linked(self, cps: list[Checkpoint]) -> list[tuple[Checkpoint, str]]:
        """The checkpoints of `cps` reached through a symlink, with the linked part; one scandir per folder."""
        folders: dict[str, tuple[str | None, set[str]]] = {}
        marks: dict[str, list[Any] | None] = {}
        out: list[tuple[Checkpoint, str]] = []
        for cp in cps:
            parent, _, name = cp.file.rpartition("/")
            if parent not in folders:
                through = fsutil.symlink_on_path(self.folder, parent) if parent else None
                names: set[str] = set()
                # the mark is taken before the scan: a change during or after it gives the folder a newer mtime
                marks[parent] = self._folder_mark(parent, through, settled=True)
                if through is None:
                    with contextlib.suppress(OSError), os.scandir(self.folder / parent) as it:
                        names = {e.name for e in it if e.is_symlink()}
                folders[parent] = (through, names)
            through, names = folders[parent]
            if through is not None:
                out.append((cp, through + "/"))
            elif name in names:
                out.append((cp, cp.file))
        self._marks, self._marks_of = marks, cps
        return out

    def _folder_mark(self, parent: str, through: str | None, settled: bool = False) -> list[Any] | None:
        """What `linked` found for folder `parent` depends on: its symlinked part, else its inode and mtime.

        Making, removing or replacing an entry changes a folder's mtime, so an unchanged folder has the same
        symlinks. With `settled`, None for a folder changed too recently to tell a later change apart.
        """
        if through is not None:
            return ["link", through]
        try:
            st = os.lstat(self.folder / parent)
        except OSError:
            return ["none"]
        if settled and st.st_mtime_ns > time.time_ns() - SETTLED_NS:
            return None
        return ["dir", st.st_ino, st.st_mtime_ns]

    def keep_rows(
        self,
        form: str,
        cps: list[Checkpoint],
        starts: list[int],
        text: bytes,
        linked: list[tuple[Checkpoint, str]],
    ) -> None:
        """Keep `text`, which holds the row of each of `cps` (every checkpoint, in number order), rendered as
        `form` names, at `starts`, with `linked`, which `linked(cps)` has just returned (the same list), for
        `cached_rows`. It is a derived file next to the manifest; failures are ignored."""
        marks = self._marks
        if not marks or any(m is None for m in marks.values()):
            return
        if cps is not self._marks_of:
            return  # the marks are of other checkpoints' folders
        extra = {"folders": marks, "linked": [[cp.number, link] for cp, link in linked]}
        numbers = [cp.number for cp in cps]
        RowCache(self.folder / LIST_CACHE_FILE).store(self._reader, form, numbers, starts, text, extra)

    def rows_before_appends(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, when the manifest only grew since: the rows of the checkpoints it had
        then, which have not changed (their `linked` is not kept: folders change when files are added)."""
        got = RowCache(self.folder / LIST_CACHE_FILE).load(self.manifest, form, grown=True)
        return None if got is None else CachedRows(got[0], [], got[1])

    def cached_rows(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, while the manifest and the checkpoints' folders are unchanged since;
        else None."""
        got = RowCache(self.folder / LIST_CACHE_FILE).load(self.manifest, form)
        if got is None:
            return None
        text, raw_index, extra = got
        try:
            for parent, mark in extra["folders"].items():
                through = fsutil.symlink_on_path(self.folder, parent) if parent else None
                if self._folder_mark(parent, through) != mark:
                    return None
            linked = [(int(n), str(link)) for n, link in extra["linked"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return CachedRows(text, linked, raw_index)

    def summary(self) -> TaskSummary:
        st = self.state()
        latest = max(st.checkpoints, default=None)
        s = TaskSummary(
            name=self.name,
            status=st.header.status,
            checkpoints=len(st.checkpoints),
            size=sum(cp.size for cp in st.checkpoints.values()),
            created=st.header.created,
            latest=latest,
            latest_metrics=dict(st.checkpoints[latest].metrics) if latest is not None else {},
        )
        self.refresh_cache()
        return s

    # -- writing --

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None, *, settle: bool = True) -> Iterator[None]:
        """Hold this task's lock (every manifest change happens under it); raises BusyError. Re-entrant: an
        operation that holds it may call one that takes it. With `settle`, what an interrupted trash or import
        left (its marker) is finished or undone first."""
        if self._holder == threading.get_ident():
            yield
            return
        self.refuse_links()
        with fsutil.locked(self.folder / LOCK_FILE, f"task '{self.name}'", timeout):
            self._holder = threading.get_ident()
            try:
                pending, importing = self._markers()
                if pending and settle:
                    # an interrupted multi-step change (trash) left a marker: finish or undo it first
                    from .trash import settle_marker

                    for marker in pending:
                        settle_marker(self, marker)
                if importing and settle:
                    self._recover_imports_locked(importing)  # a killed import's staged files (ckpt.staging)
                yield
            finally:
                self._holder = None

    def reload(self) -> TaskState:
        """The manifest as it is now (the caller holds the lock where it needs it not to change)."""
        return self.state()

    def update(self, change: Callable[[TaskState], T]) -> T:
        """Apply `change` to a copy of the manifest and write it, under the lock; `change` mutates the state
        it is given and may raise to abandon the change (nothing is written then)."""
        with self.lock():
            current = self.state()
            state = TaskState(replace(current.header), dict(current.checkpoints))
            result = change(state)
            self._rewrite(state)
            return result

    def settle(self) -> bool:
        """Finish or undo an interrupted trash or restore of this task, if one left a marker; whether one did.

        What `lock()` does before every change, for the commands that only read (`list`, `show`), so that
        they never show a record whose file an interrupted trash left in the trash. Costs one scandir of
        the task folder when there is nothing to do; takes the task's lock (waiting as `lock` does) only
        when there is.
        """
        pending, importing = self._markers()
        if not pending and not importing:
            return False
        if not pending:
            from .staging import abandoned

            if not abandoned(importing):
                return False  # imports that are running: theirs to finish
        with self.lock():
            pass
        return True

    def recover_imports(self, *, dry_run: bool = False) -> list[Repair]:
        """Finish or undo what killed imports left (ckpt.staging), under the task lock; report the staging
        names no marker claims (`ckpt doctor`). With `dry_run`, changes nothing and says what it would do."""
        from .staging import abandoned, claimed_names, leftovers
        from .trash_results import Repair

        repairs: list[Repair] = []
        if dry_run:
            repairs += self._recover_imports_locked(abandoned(self._markers()[1]), dry_run=True)
        else:
            with fsutil.locked(self.folder / LOCK_FILE, f"task '{self.name}'"):
                repairs += self._recover_imports_locked(self._markers()[1])
        for path in leftovers(self.folder / CHECKPOINT_DIR, claimed_names(self._markers()[1])):
            repairs.append(
                Repair(
                    self.ws.rel(path),
                    "an import's staging leftover that no marker names (an older ckpt was killed while importing)",
                    "left alone: it may be the only copy of a file moved in; look at it, then delete it or move it out",
                )
            )
        return repairs

    def _recover_imports_locked(self, markers: list[Path], *, dry_run: bool = False) -> list[Repair]:
        from .staging import recover

        if not markers:
            return []
        try:
            recorded = {cp.file for cp in self.state().checkpoints.values()}
        except ManifestError:
            return []  # a moved file is put back only against a manifest that can be read (doctor mends it first)
        repairs: list[Repair] = []
        for marker in markers:
            repairs += recover(marker, self.folder / CHECKPOINT_DIR, recorded, self.ws.rel, dry_run=dry_run)
        return repairs

    def discard_if_empty(self) -> bool:
        """Remove this task if it holds nothing (no record, no number ever given, no file but ckpt's own):
        what an import that created it and then failed leaves. Whether it was removed."""
        own = {TASK_FILE, CACHE_FILE, LIST_CACHE_FILE, LOCK_FILE, LOCK_FILE + fsutil.HOLDER_SUFFIX, CHECKPOINT_DIR}
        with fsutil.locked(self.ws.tasks_dir / CREATE_LOCK_FILE, "task creation"), self.lock():
            state = self.state()
            if state.checkpoints or state.max_number or set(os.listdir(self.folder)) - own:
                return False
            if os.listdir(self.folder / CHECKPOINT_DIR):
                return False
            # checkpoints/ before the manifest: a folder with the one but not the other is a damaged task, while
            # a folder with neither is no task at all
            os.rmdir(self.folder / CHECKPOINT_DIR)
            fsutil.remove_file(self.manifest)
            for name in (CACHE_FILE, LIST_CACHE_FILE):
                fsutil.remove_file(self.folder / name)
        self.ws._tasks.pop(self.name, None)
        fsutil.remove_file(self.folder / LOCK_FILE)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)
        return True

    def pending_markers(self) -> list[Path]:
        """Markers (`.pending-<entry id>`) of interrupted trash operations on this task."""
        return self._markers()[0]

    def _markers(self) -> tuple[list[Path], list[Path]]:
        """The markers of interrupted trash operations and of imports (running or killed), in one scandir."""
        pending: list[Path] = []
        importing: list[Path] = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.startswith(PENDING_PREFIX):
                        pending.append(Path(e.path))
                    elif e.name.startswith(IMPORT_MARKER_PREFIX):
                        importing.append(Path(e.path))
        except FileNotFoundError:
            pass
        return pending, importing

    @overload
    def save(
        self,
        obj: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        suffix: str | None = None,
        background: Literal[False] = False,
    ) -> int: ...

    @overload
    def save(
        self,
        obj: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        suffix: str | None = None,
        background: Literal[True],
    ) -> PendingSave: ...

    def save(
        self,
        obj: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        suffix: str | None = None,
        background: bool = False,
    ) -> int | PendingSave:
        """Save a checkpoint and return its number (1, 2, 3...).

        `obj` is a state dict (or anything `torch.save` takes), bytes, or a path to an existing file
        (copied; see `save_file`). The file is written under a temporary name, fsynced, and renamed into
        place before its record is appended, so a record never points at a half-written file.

        With `background=True` the tensors are copied to host memory and the call returns a PendingSave
        (`.result()` is the number, known once committed); a worker thread writes and commits, in save
        order (ckpt.background). It first waits for the task's previous background save, and raises that
        one's error if it failed; `wait()` waits for the last.
        """
        if background:
            clean = _check_metrics(metrics)
            _check_int(step, "step")
            _check_int(epoch, "epoch")
            from .background import host_copy, writer_for  # threads only for a background save

            what = f"task '{self.name}'" + (f", step {step}" if step is not None else "")
            return writer_for((self.ws.location, self.name)).save(
                what,
                lambda: obj if isinstance(obj, str | os.PathLike) else host_copy(obj),
                lambda data: self.save(data, step=step, epoch=epoch, metrics=clean, suffix=suffix),
            )
        if isinstance(obj, str | os.PathLike):
            return self.save_file(obj, step=step, epoch=epoch, metrics=metrics)
        clean = _check_metrics(metrics)
        _check_int(step, "step")
        _check_int(epoch, "epoch")
        if isinstance(obj, bytes | bytearray | memoryview):
            data = bytes(obj)

            def produce(w: fsutil.HashingWriter) -> None:
                w.write(data)

            ext = suffix or ".pt"
        else:
            import torch  # only a state dict needs torch

            def produce(w: fsutil.HashingWriter) -> None:
                torch.save(obj, w)  # type: ignore[arg-type]

            ext = suffix or ".pt"
        number = self._commit_new(produce, ext, step, epoch, clean, None)
        _after_save(self, number)  # the retention policy, if any, in the background
        return number

    def unknown_files(self) -> tuple[list[Unknown], list[Unknown]]:
        """What the task folder holds that its manifest does not know: (unknown, ckpt's own temporary names)."""
        from .importer import scan_folder

        found = scan_folder(self.ws, self)
        return found.unknown, found.temporary

    def wait(self) -> None:
        """Wait for this task's background save, if one is outstanding (raise its error if one failed), then
        for the retention policy this process runs after its saves (ckpt.policy)."""
        from .background import writer_for
        from .policy import wait

        writer_for((self.ws.location, self.name)).wait()
        wait(self)

    def save_file(
        self,
        path: str | os.PathLike[str],
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Copy an existing checkpoint file written by someone else into the task; return its number.

        A folder (a DCP step, sharded safetensors, a DeepSpeed global_stepN: docs/formats-checkpoints.md) is
        copied in as one folder checkpoint, as import does.
        """
        src = Path(path)
        if src.is_dir() and not src.is_symlink():
            return self._save_folder(src, step, epoch, metrics)
        if not src.is_file():
            raise CheckpointNotFound(f"'{src}' is not a file", path=src)
        clean = _check_metrics(metrics)
        _check_int(step, "step")
        _check_int(epoch, "epoch")

        def produce(w: fsutil.HashingWriter) -> None:
            with fsutil.open_regular_file(src) as f:  # a FIFO swapped in after is_file() is refused, not waited on
                shutil.copyfileobj(f, w, fsutil.CHUNK)  # type: ignore[misc]

        number = self._commit_new(produce, src.suffix or ".pt", step, epoch, clean, src.name)
        _after_save(self, number)
        return number

    def _save_folder(self, src: Path, step: int | None, epoch: int | None, metrics: Mapping[str, float] | None) -> int:
        clean = _check_metrics(metrics)
        _check_int(step, "step")
        _check_int(epoch, "epoch")
        files = fsutil.tree_files(src)
        if not files:
            raise CheckpointNotFound(f"'{src}' is an empty folder", path=src)
        digests = fsutil.sha256_many([src / rel for rel, _ in files])
        for d in digests:
            if isinstance(d, CkptError):
                raise d
            if isinstance(d, OSError):
                raise CkptError(f"cannot read '{d.filename}': {d.strerror}", path=d.filename)
        entries = [(rel, size, str(d)) for (rel, size), d in zip(files, digests, strict=True)]
        item = Incoming(
            source=src,
            original_name=src.name,
            size=sum(size for _, size in files),
            sha256=fsutil.tree_digest([(rel, d) for rel, _, d in entries]),
            step=step,
            epoch=epoch,
            metrics=dict(clean),
            files=entries,
            is_dir=True,
            dev=os.stat(src).st_dev,
        )
        return self.add_existing([item], mode="copy")[0].number

    def _commit_new(
        self,
        produce: Callable[[fsutil.HashingWriter], None],
        ext: str,
        step: int | None,
        epoch: int | None,
        metrics: dict[str, float],
        original_name: str | None,
    ) -> int:
        if not ext.startswith(".") or "/" in ext or "\\" in ext or len(ext) > 20:
            raise UsageError(f"invalid file suffix {ext!r}")
        cdir = self.folder / CHECKPOINT_DIR
        self.refuse_links()  # the file is written into checkpoints/ before the lock is taken
        cdir.mkdir(exist_ok=True)
        # the bytes are written and fsynced outside the lock, so a slow save never blocks other commands
        tmp, size, digest = fsutil.write_new_file(cdir, "checkpoint" + ext, produce)
        try:
            with self.lock():
                state = self.state()
                if state.header.status != "running":
                    raise ConflictError(
                        f"task '{self.name}' is {state.header.status}; it takes no new checkpoints",
                        hint="create a new task",
                    )
                number = state.max_number + 1
                while True:
                    target = cdir / f"{number:06d}{ext}"
                    try:
                        fsutil.move_noreplace(tmp, target)
                        break
                    except ConflictError:
                        number += 1  # a file without a record (a crash after the rename): never reuse its number
                fsutil.fsync_dir(cdir)
                cp = Checkpoint(
                    number=number,
                    file=f"{CHECKPOINT_DIR}/{target.name}",
                    size=size,
                    sha256=digest,
                    created=now_iso(),
                    step=step,
                    epoch=epoch,
                    metrics=metrics,
                    original_name=original_name,
                    task=self.name,
                )
                # the record is appended only once the file is complete and in place
                data = record_bytes(cp)
                size = os.stat(self.manifest).st_size
                try:
                    after = fsutil.append_durably(self.manifest, data)
                except BaseException:
                    # an interrupt (Ctrl-C, SIGTERM) after the record landed: it names the file, which stays
                    if os.stat(self.manifest).st_size != size + len(data):
                        fsutil.remove_file(target)  # no record names it (the append was undone): nothing is left
                    raise
                self._reader.note_append(cp, data, after)
        finally:
            fsutil.remove_file(tmp)
        return number

    def add_existing(self, items: list[Incoming], *, mode: str = "link", unique: bool = False) -> list[Checkpoint]:
        """Add files or folders that already exist (import, scan --add) as new checkpoints, in order.

        With `unique`, an item whose sha256 and size a record already has (checked under the lock, so two
        imports at once do not both add it) is left out.

        `mode` is "link" (hard link, else reflink, else copy), "copy" or "move"; the source is never
        modified except by "move". Each item's size and sha256 are known (hashed by the caller); a copy
        that does not match them raises IntegrityError. Returns the new records. Raises ConflictError
        when the task is not running, BusyError when its lock is taken.

        Whatever is staged is named first in a marker (ckpt.staging), so that a kill at any point leaves
        each source in its place, recorded, or where the next lock of the task (or `ckpt doctor`) puts it back.
        """
        if mode not in ("link", "copy", "move"):
            raise UsageError(f"unknown mode {mode!r}", hint="use link, copy or move")
        if not items:
            return []
        cdir = self.folder / CHECKPOINT_DIR
        self.refuse_links()  # files are staged in checkpoints/ before the lock is taken
        fsutil.make_dirs(cdir)
        # copying happens outside the lock, under temporary names, as in _commit_new; a file that can be
        # hard-linked is linked straight to its numbered name under the lock (a link is never half-made)
        cdev = os.stat(cdir).st_dev
        plan = [
            (item, None if mode == "link" and not item.is_dir and item.dev == cdev else cdir / _staging_name())
            for item in items
        ]
        marker = self._stage_marker(plan, mode == "move")
        staged: list[tuple[Incoming, Path, str]] = []
        added: list[Checkpoint] = []
        stuck = False
        try:
            for item, tmp in plan:
                if tmp is None:
                    staged.append((item, item.source, "direct"))
                    continue
                if item.source.is_dir():
                    listed = [(r, n) for r, n, _ in item.files] if item.files is not None else None
                    how = fsutil.place_tree_new(item.source, tmp, mode, listed)
                else:
                    how = fsutil.place_new(item.source, tmp, mode)
                staged.append((item, tmp, how))
                if how == "copy":
                    _check_copy(item, tmp)
            with self.lock():
                state = self.state()
                if state.header.status != "running":
                    raise ConflictError(
                        f"task '{self.name}' is {state.header.status}; it takes no new checkpoints",
                        hint="import into a new task with --task",
                    )
                if unique:
                    have = {(cp.sha256, cp.size) for cp in state.checkpoints.values()}
                    for x in [x for x in staged if (x[0].sha256, x[0].size) in have]:
                        staged.remove(x)
                        _unstage(x)
                        stuck |= x[2] == "move" and os.path.lexists(x[1])  # not put back: the marker stays
                number = state.max_number
                placed: list[Checkpoint] = []
                renamed: list[tuple[str, str | Path]] = []
                committed = -1  # the manifest's size once the records are in it
                try:
                    self._place_locked(staged, cdir, number, placed, renamed)
                    fsutil.fsync_dir(cdir)
                    # records are appended (in one write) only once every file is in place; a crash between
                    # leaves numbered files without records, which `ckpt scan TASK --add` takes back in
                    chunks = [_record_bytes_fast(cp) for cp in placed]
                    blob = b"".join(chunks)
                    committed = os.stat(self.manifest).st_size + len(blob)
                    after = fsutil.append_durably(self.manifest, blob)
                except BaseException:
                    if os.stat(self.manifest).st_size == committed:
                        raise  # an interrupt after the records landed: they name the files, which stay
                    for target, back in reversed(renamed):  # nothing was recorded: back to the staging names
                        with contextlib.suppress(OSError, CkptError):
                            if back == target:
                                os.unlink(target)  # a direct link: the source still has the bytes
                            else:
                                fsutil.move_noreplace(target, back)
                    raise
                for cp, data in zip(placed, chunks, strict=True):
                    self._reader.note_append(cp, data, after)
                added = placed
        finally:
            for item, tmp, how in staged:
                if how == "direct" or not os.path.lexists(tmp):
                    continue
                if how == "move":  # not committed: put the source back (if that fails, the marker stays)
                    try:
                        fsutil.move_noreplace(tmp, item.source)
                    except (OSError, CkptError):
                        stuck = True
                    continue
                fsutil.remove_tree(tmp)
            done = {id(x[0]) for x in staged}
            for item, tmp in plan:  # an item cut off while it was being staged (a folder half copied)
                if tmp is None or id(item) in done or not os.path.lexists(tmp):
                    continue
                if mode == "move" and not os.path.lexists(item.source):
                    try:
                        fsutil.move_noreplace(tmp, item.source)
                    except (OSError, CkptError):
                        stuck = True
                else:
                    fsutil.remove_tree(tmp)
            if marker is not None:
                marker.done(keep=stuck)
        for item, _, how in staged:
            if mode == "move" and how != "move":
                fsutil.remove_tree(item.source)  # moved across file systems: the source goes once committed
        return added

    def _stage_marker(self, plan: list[tuple[Incoming, Path | None]], move: bool) -> Marker | None:
        """The marker naming what `plan` stages (ckpt.staging), written and held; None when nothing is staged."""
        staged = [(item, tmp) for item, tmp in plan if tmp is not None]
        if not staged:
            return None
        from .staging import Marker, StagedItem

        listed = []
        for item, tmp in staged:
            st = os.lstat(item.source) if move else None
            listed.append(StagedItem(tmp.name, item.source, move, st.st_dev if st else -1, st.st_ino if st else -1))
        return Marker.write(self.folder, listed)

    def _place_locked(
        self,
        staged: list[tuple[Incoming, Path, str]],
        cdir: Path,
        number: int,
        placed: list[Checkpoint],
        renamed: list[tuple[str, str | Path]],
    ) -> None:
        """Rename staged files to their numbers (caller holds the lock), filling `placed` and `renamed`."""
        folder = os.fspath(cdir)  # plain strings: a Path per file costs more than its link() on large imports
        for item, tmp, how in staged:
            ext = "" if item.is_dir else _suffix(item.original_name)
            number += 1
            while True:
                name = f"{number:06d}{ext}"
                target = f"{folder}/{name}"
                back: str | Path = tmp
                try:
                    if how == "direct":
                        how = _link_or_copy_locked(item.source, target)
                        back = target  # on failure there is nothing to put back: the new name goes
                    else:
                        how = "staged"
                        renamed.append((target, back))  # first: an interrupt right after the rename still undoes it
                        try:
                            fsutil.move_noreplace(tmp, target)
                        except ConflictError:
                            renamed.pop()
                            raise
                    break
                except ConflictError:
                    number += 1  # a file without a record: never reuse its number
            if how != "staged":
                renamed.append((target, back))
            if how == "copy":  # the link was refused and the copy made under the lock must match the hash
                _check_copy(item, Path(target))
            placed.append(
                Checkpoint(
                    number=number,
                    file=f"{CHECKPOINT_DIR}/{name}",
                    size=item.size,
                    sha256=item.sha256,
                    created=item.created or now_iso(),
                    step=item.step,
                    epoch=item.epoch,
                    metrics=dict(item.metrics),
                    original_name=item.original_name,
                    task=self.name,
                )
            )

    def set_policy(self, policy: dict[str, Any] | None) -> None:
        """Record the task's retention policy (a `[policy]` table made by ckpt.policy), or drop it (None)."""
        with self.lock():
            state = self.state()
            state.header.policy = dict(policy) if policy else None
            self._rewrite(state)

    def _rewrite(self, state: TaskState) -> None:
        """Replace the manifest with `state` (caller holds the lock)."""
        fsutil.atomic_write(self.manifest, task_bytes(state))
        self._reader.forget()

    def adopt(self, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
        """The store's step of `scan --add`: the candidates moved in under new numbers (ckpt.importer), and
        the relative names of those taken in."""
        from .importer import adopt_files

        return adopt_files(self, candidates)

    def forget_read(self) -> None:
        """Read the manifest again next time (it was replaced behind this handle's back)."""
        self._reader.forget()

    def leftovers(self, *, dry_run: bool) -> tuple[list[Repair], set[str]]:
        """The store's step of doctor for what this task's interrupted writes left beyond its marks: nothing on
        a folder (a killed import's are `recover_imports`'); and the files it dealt with."""
        return [], set()

    def set_status_locked(self, status: str) -> TaskHeader:
        """Set the task's status (caller holds the lock)."""
        state = self.state()
        state.header.status = status
        state.header.finished = now_iso() if status in ("finished", "failed") else None
        self._rewrite(state)
        return state.header

    def note_import(self, metric_modes: dict[str, str], source: dict[str, str] | None) -> None:
        """Record in the task's header what an import found (TaskHeader.note_import); the manifest is
        rewritten only when that changes it. Raises BusyError when the task's lock is taken."""
        if not replace(self.header).note_import(metric_modes, source):
            return
        with self.lock():
            state = self.state()
            if state.header.note_import(metric_modes, source):
                self._rewrite(state)

    def finish(self, *, failed: bool = False, title: str | None = None) -> Model | None:
        """Mark the task finished (or failed) and, unless failed, promote its latest checkpoint.

        Returns the model made (None when failed or when the task has no checkpoint). The model's
        title is `title`, else '<task>-<number>'; see models.finish for what happens when it is taken.
        """
        from .models import finish

        return finish(self.ws, self.name, failed=failed, title=title).model


def _after_save(task: Task, number: int) -> None:
    from .policy import after_save  # here: `import ckpt` need not pay for it; a lookup in sys.modules after

    after_save(task, number)


def _check_int(value: object, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{what} must be an integer, got {value!r}")


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str) or not k:
            raise UsageError(f"metric name {k!r} must be a non-empty string")
        if hasattr(v, "item"):
            v = v.item()  # a 0-d tensor or numpy scalar
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UsageError(f"metric '{k}' must be a number, got {type(v).__name__}")
        if isinstance(v, int) and not -(2**63) <= v < 2**63:  # TOML integers are 64-bit
            raise UsageError(f"metric '{k}' is too large an integer for the manifest", hint="pass it as a float")
        out[k] = v
    return out


def ranges(numbers: list[int]) -> str:
    """'1–10' or '1–3, 5, 8–9'."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _staging_name() -> str:
    return f"{STAGING_PREFIX}{os.urandom(6).hex()}"


def _link_or_copy_locked(src: Path, target: str) -> str:
    """Hard-link `src` as `target`; where the link is refused, copy (ConflictError when `target` exists)."""
    try:
        fsutil.link_new(src, target)
        return "direct"
    except FileExistsError:
        raise ConflictError(f"'{target}' already exists", path=target) from None
    except OSError:
        return fsutil.place_new(src, Path(target), "link")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_STRING = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': written as is


def _literal(value: object) -> str | None:
    """The TOML literal tomli-w writes for a plain int, finite float or simple ASCII string; None otherwise."""
    if isinstance(value, str):
        return f'"{value}"' if _PLAIN_STRING.fullmatch(value) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _record_bytes_fast(cp: Checkpoint) -> bytes:
    """record_bytes(cp), byte for byte, without tomli-w's per-character escaping (much faster on imports of
    thousands); anything unusual (quoted keys, escapes, NaN) goes through tomli-w."""
    name = cp.original_name
    if (
        type(cp.number) is not int
        or type(cp.size) is not int
        or (cp.step is not None and type(cp.step) is not int)
        or (cp.epoch is not None and type(cp.epoch) is not int)
        or not _PLAIN_STRING.fullmatch(f"{cp.file}{cp.sha256}{cp.created}{name or ''}")
    ):
        return record_bytes(cp)
    text = f'\n[[checkpoints]]\nnumber = {cp.number}\nfile = "{cp.file}"\n'
    if cp.step is not None:
        text += f"step = {cp.step}\n"
    if cp.epoch is not None:
        text += f"epoch = {cp.epoch}\n"
    text += f'size = {cp.size}\nsha256 = "{cp.sha256}"\ncreated = "{cp.created}"\n'
    if name is not None:
        text += f'original_name = "{name}"\n'
    if cp.metrics:
        text += "\n[checkpoints.metrics]\n"
        for mk, mv in cp.metrics.items():
            lit = _literal(mv)
            if lit is None or not _BARE_KEY.fullmatch(mk):
                return record_bytes(cp)
            text += f"{mk} = {lit}\n"
    return text.encode()


def _unstage(staged: tuple[Incoming, Path, str]) -> None:
    """Undo the staging of an item that turned out to be recorded already."""
    item, tmp, how = staged
    if how == "move":
        with contextlib.suppress(OSError, CkptError):
            fsutil.move_noreplace(tmp, item.source)
    elif how != "direct":
        fsutil.remove_tree(tmp)


def _suffix(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return ext if 1 < len(ext) <= 20 and ext[1:].replace("_", "").isalnum() else ""


def _check_copy(item: Incoming, copied: Path) -> None:
    """A copy must hold the bytes that were hashed: the source may have changed in between."""
    if copied.is_dir():
        files = fsutil.tree_files(copied)
        digests = fsutil.sha256_many([copied / rel for rel, _ in files])
        pairs = [(rel, d) for (rel, _), d in zip(files, digests, strict=True) if isinstance(d, str)]
        ok = len(pairs) == len(files) and fsutil.tree_digest(pairs) == item.sha256
    else:
        ok = fsutil.sha256_file(copied) == item.sha256
    if not ok:
        raise IntegrityError(f"'{item.source}' changed while it was being imported", path=item.source)
