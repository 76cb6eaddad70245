"""Workspaces in object storage (`s3://bucket/prefix`): the core of docs/s3.md, written against `Storage` alone.

The layout under the URL is the local one (ckpt.toml, tasks/<task>/task.toml, models/<title>/, trash/<id>/)
with the same TOML formats. There are no locks, renames or appends, so:

- a task manifest is one object, replaced whole with If-Match on the ETag it was read with; a lost race
  re-reads and re-applies the change (`StoreTask.update`), so no update is ever lost;
- a checkpoint's number is claimed by creating its object with If-None-Match, then its record is committed;
- a model's title is claimed by creating `models/<title>/.claim` with If-None-Match before anything else;
- promotion and trash moves are server-side copies: no checkpoint byte passes through the client.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import fsutil
from .errors import BusyError, CkptError, ConflictError, ManifestError, UsageError, WorkspaceNotFound
from .layout import TASK_FILE, WORKSPACE_FILE
from .manifest import FORMAT, Checkpoint, TaskHeader, TaskState, dumps, parse_toml, task_bytes, workspace_doc
from .metrics import check_modes
from .models import MODEL_FILE, Model, ModelIndex
from .names import case_twin, check_task_name
from .storage import PreconditionFailed, Storage, open_storage
from .store_cache import download_cached
from .store_doctor import abort_stale_uploads, bad_records, unclaimed_models
from .store_models import Lease, LeaseLost, StoreModelIndex, make_model, move_model, take_title
from .store_task import COMMIT_TRIES, StoreTask
from .task_base import Task, TaskSummary
from .timeutil import now_iso
from .trash_entry import ENTRY_ID, put_once
from .workspace_base import Workspace

if TYPE_CHECKING:
    from .trash_results import Repair
    from .verify import Stored

TASKS_IN_FLIGHT = 128  # manifests `tasks` reads at once (each a GET, or a 304 when cached)


def _key(path: Path | PurePosixPath) -> str:
    return PurePosixPath(path).as_posix()


class StoreWorkspace(Workspace):
    """A workspace in object storage. Paths (`tasks_dir`, `Task.folder`, `Model.folder`) are keys relative to
    the workspace URL; nothing of it is on the local disk."""

    remote = True

    def __init__(
        self, storage: Storage, settings: dict[str, Any] | None = None, metric_modes: dict[str, str] | None = None
    ):
        super().__init__(Path(), settings, metric_modes)
        self.storage = storage
        self.url = storage.url

    @classmethod
    def init_url(cls, url: str) -> StoreWorkspace:
        storage = open_storage(url)
        if storage.head(WORKSPACE_FILE) is None:
            data = dumps({"format": FORMAT, "settings": {}})
            with contextlib.suppress(PreconditionFailed):  # made by another process meanwhile: open it
                storage.put(WORKSPACE_FILE, data, if_none_match=True)
                # every guarantee rests on conditional writes: a service that ignores them must not be used
                try:
                    storage.put(WORKSPACE_FILE, data, if_none_match=True)
                except PreconditionFailed:
                    pass
                else:
                    storage.delete([WORKSPACE_FILE])
                    raise CkptError(
                        f"{storage.url} ignores conditional writes (If-None-Match); concurrent ckpt commands "
                        "could lose updates there",
                        hint="see docs/s3.md for the services that support them",
                    )
        return cls.open_url(url, storage)

    @classmethod
    def open_url(cls, url: str, storage: Storage | None = None) -> StoreWorkspace:
        storage = storage or open_storage(url)
        try:
            data, _ = storage.get(WORKSPACE_FILE)
        except FileNotFoundError:
            raise WorkspaceNotFound(
                f"'{storage.url}' is not a ckpt workspace (no {WORKSPACE_FILE})", hint=f"run: ckpt init {storage.url}"
            ) from None
        where = Path(WORKSPACE_FILE)
        settings, modes = workspace_doc(parse_toml(data, where), where)
        return cls(storage, settings, modes)

    def __repr__(self) -> str:
        return f"Workspace({self.url!r})"

    @property
    def location(self) -> str:
        return self.url

    def rel(self, path: Path) -> str:
        return _key(path)

    def model_local_path(self, model: Model) -> Path:
        return download_cached(self.storage, _key(model.path), model.sha256, model.file, model.size)

    def holds(self, path: Path) -> bool:
        return False  # a local path is never inside a bucket

    # -- tasks --

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
            json.dumps(header.arch_kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"architecture keyword arguments are not JSON-serialisable: {e}") from None
        twin = case_twin(name, self.task_names())
        if twin is not None:
            raise ConflictError(
                f"task '{name}' differs from task '{twin}' only in case",
                hint="names must stay distinct on case-insensitive file systems; choose another name",
            )
        try:
            self.storage.put(f"tasks/{name}/{TASK_FILE}", task_bytes(TaskState(header, {})), if_none_match=True)
        except PreconditionFailed:
            if not exist_ok:
                raise ConflictError(f"task '{name}' already exists", hint=f"see: ckpt list {name}") from None
        return self.task(name)

    def task(self, name: str) -> Task:
        check_task_name(name)
        if name in self._tasks:
            return self._tasks[name]
        t = StoreTask(self, name)
        t.reload()  # raises TaskNotFound
        self._tasks[name] = t
        return t

    def linked_task_folders(self) -> list[CkptError]:
        return []  # a bucket has no links

    def orphan_task_folders(self) -> list[str]:
        return []  # a bucket has no folders: a prefix without task.toml is reported by tasks() as an error

    def remove_unfinished_task(self, name: str, *, dry_run: bool) -> bool:
        return False  # a task is created in a bucket by one write (its task.toml): none is left half-made

    def task_names(self) -> list[str]:
        # one LIST with a delimiter: the task "folders"; a folder without task.toml is reported by tasks()
        return [n for n in self.storage.children("tasks/") if not n.startswith(".")]

    def tasks(self) -> tuple[list[TaskSummary], list[CkptError]]:
        # every manifest read (or revalidated) at once: one round trip for 100 tasks, not 100 in a row
        def summary(name: str) -> TaskSummary | CkptError:
            try:
                return self.task(name).summary()
            except CkptError as e:
                return e

        names = self.task_names()
        with ThreadPoolExecutor(max(1, min(TASKS_IN_FLIGHT, len(names)))) as pool:
            done = list(pool.map(summary, names))
        return [r for r in done if isinstance(r, TaskSummary)], [r for r in done if isinstance(r, CkptError)]

    def tasks_rendered(self, form: str, render: Callable[[TaskSummary], str]) -> tuple[list[str], list[CkptError]]:
        rows, errors = self.tasks()  # nothing kept: each manifest is read (or revalidated) anyway
        return [render(r) for r in rows], errors

    @property
    def models(self) -> ModelIndex:
        return StoreModelIndex(self)

    def stored_files(self, rels: list[str]) -> list[list[Stored] | str | None]:
        """The store's step of verify: the objects of each key (one, or a folder's in key order); one LIST of
        a task's checkpoints/ and one of models/, whatever their number."""
        from .verify import Stored

        listed: dict[str, dict[str, int]] = {}
        out: list[list[Stored] | str | None] = []
        for rel in rels:
            prefix = "models/" if rel.startswith("models/") else rel.rsplit("/", 1)[0] + "/"
            if prefix not in listed:
                listed[prefix] = {b.key: b.size for b in self.storage.list_prefix(prefix)}
            objects = listed[prefix]
            if rel in objects:
                out.append([Stored("", objects[rel], rel, rel)])
                continue
            inner = sorted((k, n) for k, n in objects.items() if k.startswith(rel + "/"))
            out.append([Stored(k[len(rel) + 1 :], n, k, k) for k, n in inner] or None)
        return out

    def hash_files(self, keys: list[Any], total: int, done: Callable[[int], None]) -> list[str | OSError]:
        """The store's step of verify: the sha256 of each object, streamed through this process once."""
        out: list[str | OSError] = []
        for i, key in enumerate(keys):
            try:
                out.append(self.storage.sha256(key))
            except FileNotFoundError as e:
                out.append(e)
            done(i)
        return out

    def read_settings(self) -> dict[str, Any]:
        """`ckpt.toml` as read now (checked as `open` checks it)."""
        data, _ = self.storage.get(WORKSPACE_FILE)
        doc = parse_toml(data, Path(WORKSPACE_FILE))
        workspace_doc(doc, Path(WORKSPACE_FILE))
        return doc

    def update_settings(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """`ckpt.toml` changed by `change` and written back with If-Match; a lost race reads and applies it again."""
        for attempt in range(COMMIT_TRIES):
            data, etag = self.storage.get(WORKSPACE_FILE)
            doc = parse_toml(data, Path(WORKSPACE_FILE))
            change(doc)
            workspace_doc(doc, Path(WORKSPACE_FILE))
            try:
                self.storage.put(WORKSPACE_FILE, dumps(doc), if_match=etag)
                return doc
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
        raise BusyError(f"{WORKSPACE_FILE} changed {COMMIT_TRIES} times while writing it; try again")

    def usage(self, prefixes: list[str]) -> tuple[list[int], int]:
        """Bytes of the objects under each of `prefixes`, and of the rest: one LIST of the whole workspace
        (a request per 1,000 objects). Objects share nothing, so each counts once, where its key is."""
        sizes = [0] * len(prefixes)
        index = {p + "/": i for i, p in enumerate(prefixes)}
        other = 0
        for b in self.storage.list_prefix(""):
            parts = b.key.split("/")
            i = index.get(parts[0] + "/", index.get("/".join(parts[:2]) + "/")) if len(parts) > 1 else None
            if i is None:
                other += b.size
            else:
                sizes[i] += b.size
        return sizes, other

    def mend(self, name: str, error: ManifestError, *, dry_run: bool, drop_bad: bool) -> tuple[list[Repair], bool]:
        """The store's step of doctor for a manifest that does not parse: records it must not hold."""
        repairs, mended = bad_records(self, name, error, dry_run, drop_bad)
        self._tasks.pop(name, None)
        return repairs, mended

    def leftovers(self, *, dry_run: bool, stale_after: float | None = None) -> list[Repair]:
        """The store's step of doctor: model folders claimed without a record, unfinished multipart uploads."""
        return unclaimed_models(self, dry_run) + abort_stale_uploads(self, dry_run)

    @contextlib.contextmanager
    def exclusive(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Nothing: a bucket has no locks, and every change of a trash entry or model is conditional instead."""
        yield

    @contextlib.contextmanager
    def title_lease(self, title: str, token: str, taken: CkptError) -> Iterator[Callable[[], None]]:
        """The lease of model title `title` (`models/<title>/.claim`, see Lease) under `token`, taken again by
        the same token after an interruption; raises `taken` when another holds it. Yields its renewal."""
        try:
            lease = Lease(self, title, token=token).take()
        except ConflictError:
            raise taken from None
        yield lease.renew

    def trash_entry_ids(self) -> tuple[list[str], list[CkptError]]:
        """The entry ids under trash/ (one LIST with a delimiter); ids sort by creation time."""
        return sorted(i for i in self.storage.children("trash/") if ENTRY_ID.fullmatch(i)), []

    def trash_leftovers(self) -> list[Path]:
        return []  # an interrupted empty leaves an "emptying" entry, not a folder aside

    def model_folder(self, title: str) -> Path:
        return Path("models") / title

    @contextlib.contextmanager
    def model_staging(self, title: str) -> Iterator[Path]:
        """A local temporary folder to build model `title` in (`add_model` uploads it)."""
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-model-{title}-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def add_model(self, task: str, number: int, title: str, staged: Path, doc: bytes) -> None:
        """The store's step of `export --as-model`: the title claimed (a lease), the files of `staged`
        uploaded, `doc` written as model.toml last (a model never lacks its weights); undone on failure."""
        self.task(task).checkpoint(number)
        lease = take_title(self, title)
        try:
            for rel, _ in fsutil.tree_files(staged):
                self.storage.upload(f"models/{title}/{rel}", staged / rel, if_none_match=True)
                lease.renew()
            put_once(self.storage, f"models/{title}/{MODEL_FILE}", doc, if_none_match=True)
        except LeaseLost:
            raise  # the title is another command's now: nothing of it is touched
        except BaseException:
            with contextlib.suppress(Exception):
                self.storage.delete([b.key for b in self.storage.list_prefix(f"models/{title}/")])
            raise

    def move_model(self, model: Model, new: str) -> Model:
        """The store's step of rename: claim `new`, copy on the server, its record, then the old one goes."""
        return move_model(self, model, new)

    def make_model(self, task: Task, cp: Checkpoint, title: str, copy: bool) -> Model:
        """The store's step of promote: claim the title, copy on the server, write model.toml last (every
        copy in a bucket is one: `copy` changes nothing)."""
        return make_model(self, task, cp, title)
