"""A workspace in a folder (`FolderWorkspace`): its tasks, settings, models and trash on the local disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import fsutil, hashing, locks
from .errors import (
    CkptError,
    ConflictError,
    IntegrityError,
    ManifestError,
    TaskNotFound,
    UsageError,
)
from .manifest import (
    FORMAT,
    STATUSES,
    Checkpoint,
    TaskHeader,
    TaskState,
    dumps,
    read_toml,
    task_bytes,
    workspace_doc,
)
from .metrics import check_modes
from .names import case_twin, check_task_name
from .row_caches import SummaryCache, TaskRowsCache
from .storage.folder import FolderStorage
from .task import FolderTask
from .task_base import Task, TaskSummary
from .task_rows import SETTLED_NS
from .timeutil import now_iso
from .workspace_base import Workspace, find_workspace

if TYPE_CHECKING:
    from .models import Model, ModelIndex
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


class FolderWorkspace(Workspace):
    """A workspace in a folder: `ckpt.toml` at its root, `tasks/`, `models/`, `trash/` beside it."""

    @staticmethod
    def init_folder(path: str | os.PathLike[str]) -> FolderWorkspace:
        """Create a workspace in folder `path` (which may exist) and open it; an existing one is opened."""
        root = fsutil.user_path(path)
        if (root / WORKSPACE_FILE).exists():
            return FolderWorkspace.open_folder(root)
        if root.exists() and not root.is_dir():
            raise ConflictError(f"'{root}' exists and is not a folder", path=root)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("tasks", "models", "trash"):
            (root / sub).mkdir(exist_ok=True)
        # the workspace file comes last: a folder is a workspace only once its layout exists
        fsutil.atomic_write(root / WORKSPACE_FILE, dumps({"format": FORMAT, "settings": {}}))
        return FolderWorkspace.open_folder(root)

    @staticmethod
    def open_folder(path: str | os.PathLike[str] | None) -> FolderWorkspace:
        """Open the workspace in folder `path` (or found as find_workspace does)."""
        root = find_workspace(path)
        for own in (WORKSPACE_FILE, "tasks", "models", "trash"):
            fsutil.refuse_links(root, own)  # before anything is read or made through one
        settings, modes = workspace_doc(read_toml(root / WORKSPACE_FILE, "workspace"), root / WORKSPACE_FILE)
        for sub in ("tasks", "models", "trash"):
            try:
                (root / sub).mkdir(exist_ok=True)
            except FileExistsError:  # something that is not a folder: no command can work around it
                raise IntegrityError(
                    f"'{root / sub}' is not a folder; ckpt keeps its {sub} there",
                    path=root / sub,
                    hint=f"move that file aside (it is not ckpt's), then run the command again: a new {sub}/ is made",
                ) from None
        return FolderWorkspace(root, settings, modes)

    @staticmethod
    def at(path: str | os.PathLike[str] | None, create: bool) -> FolderWorkspace:
        """`Workspace.folder_opener`: the folder at `path`, made first with `create`."""
        if create:
            assert path is not None
            return FolderWorkspace.init_folder(path)
        return FolderWorkspace.open_folder(path)

    def __init__(self, root: Path, settings: dict[str, Any] | None = None, metric_modes: dict[str, str] | None = None):
        super().__init__(root, settings, metric_modes)
        self.storage = FolderStorage(root)

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

    def rel(self, path: Path) -> str:
        """`path` relative to the workspace root, with forward slashes, as text (pathtext: a name may not be UTF-8)."""
        from .pathtext import escape_path  # here: `import ckpt` need not pay for it

        try:
            return escape_path(path.relative_to(self.root).as_posix())
        except ValueError:
            return escape_path(path)

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
        with locks.locked(self.tasks_dir / CREATE_LOCK_FILE, "task creation"):
            self._refuse_case_twin(name)
            (folder / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            with locks.locked(folder / LOCK_FILE, f"task '{name}'"):
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
        t = FolderTask(self, name)
        t.refuse_links()  # tasks/, the task folder, checkpoints/, its manifest, caches and lock: before any is read
        manifest = folder / TASK_FILE
        if not os.path.lexists(manifest) or os.path.isdir(manifest):  # a FIFO or device: refused when it is read
            if folder.is_dir() and (folder / CHECKPOINT_DIR).is_dir() and not self._unfinished_task(name):
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

    def _unfinished_task(self, name: str) -> bool:
        """Whether tasks/<name> holds only what a task creation that stopped before its manifest leaves: the
        task's lock and an empty checkpoints/ (no task: creating it again takes the folder)."""
        folder = self.tasks_dir / name
        try:
            if os.path.lexists(folder / TASK_FILE) or fsutil.is_symlink(folder):
                return False
            names = set(os.listdir(folder))
            if names - {LOCK_FILE, LOCK_FILE + locks.HOLDER_SUFFIX, CHECKPOINT_DIR}:
                return False
            cdir = folder / CHECKPOINT_DIR
            return CHECKPOINT_DIR not in names or (not fsutil.is_symlink(cdir) and not os.listdir(cdir))
        except OSError:
            return False

    def remove_unfinished_task(self, name: str, *, dry_run: bool) -> bool:
        if not self._unfinished_task(name):
            return False
        if dry_run:
            return True
        # every creation runs under this lock, from its first mkdir to its manifest: none is under way
        with locks.locked(self.tasks_dir / CREATE_LOCK_FILE, "task creation"):
            if not self._unfinished_task(name):
                return False
            folder = self.tasks_dir / name
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(folder / CHECKPOINT_DIR)
            for lock_file in (LOCK_FILE + locks.HOLDER_SUFFIX, LOCK_FILE):
                fsutil.remove_file(folder / lock_file)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.forget_task(name)
        return True

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
            assert isinstance(task, FolderTask)  # this workspace's tasks (a bucket's `tasks` is its own)
            rows.append(summary)
            cache.put(name, task.reader, {k: getattr(summary, k) for k in _SUMMARY_FIELDS})
        cache.save(tasks)
        return rows, errors

    @property
    def models(self) -> ModelIndex:
        """Every model of the workspace: iterable, `len()`, and indexable by title."""
        from .models import ModelIndex

        return ModelIndex(self)

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
        with locks.locked(self.tasks_dir / SETTINGS_LOCK, "the workspace's ckpt.toml"):
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
        return hashing.sha256_many(handles, workers=hashing.hash_workers(total), done=done)

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
                f"trash entry '{name}' is a symlink; ckpt does not follow it"
                if link
                else f"trash/{name} is a file, not a trash entry's folder",
                path=self.trash_dir / name / "entry.toml",
                hint=f"remove the link {self.rel(self.trash_dir / name)} by hand"
                if link
                else f"move {self.rel(self.trash_dir / name)} out of trash/ (it is not ckpt's)",
            )
            for name, link, d in sorted(found)
            if link or not d
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

        task = self._tasks.get(name) or FolderTask(self, name)
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
