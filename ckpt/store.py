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
import functools
import hashlib
import json
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from . import fsutil
from .errors import (
    BusyError,
    CkptError,
    CommitUnknown,
    ConflictError,
    IntegrityError,
    ManifestError,
    ModelNotFound,
    TaskNotFound,
    UsageError,
    WorkspaceNotFound,
)
from .layout import CHECKPOINT_DIR, CLAIM_FILE, TASK_FILE, WORKSPACE_FILE, Incoming
from .manifest import (
    COLUMNS,
    FORMAT,
    Checkpoint,
    TaskHeader,
    TaskState,
    dumps,
    parse_task,
    parse_toml,
    salvage_task,
    task_bytes,
    workspace_doc,
)
from .metrics import check_modes
from .model_sources import Source, store_sources
from .models import MODEL_FILE, Model, ModelIndex, check_case_twin
from .names import case_twin, check_task_name, check_title
from .storage import Blob, PreconditionFailed, Storage, open_storage
from .store_log import FOLD_EVERY, LOG_DIR, log_key, log_prefix, number_of, parse_record, record_bytes
from .store_segments import HINT, SEGMENT_DIR, decode, encode, id_of, merge, plan, segment_key, segment_prefix
from .task import CachedRows, Task, TaskSummary
from .timeutil import now_iso, parse_iso
from .trash_entry import ENTRY_ID, STALE_AFTER, STALE_PENDING, put_once
from .trash_models import drop_model
from .workspace import Workspace

if TYPE_CHECKING:
    from .finders import Found
    from .importer import Unknown
    from .trash_results import Repair
    from .verify import Stored

T = TypeVar("T")
MOVING_FILE = ".moving"  # in a model folder while a rename copies it (see _claim_source)
NUMBERS_DIR = "numbers"  # tasks/<task>/numbers/<n>: the claim of checkpoint number n (empty objects)
COMMIT_TRIES = 100
COMMIT_IDS = 8  # the ids of the last commits kept in a manifest (see StoreTask.update)
MANIFEST_CACHE_VERSION = 5  # 5: segments (ckpt.store_segments)
LEASE = 600.0  # seconds a title claim holds without being renewed (see Lease)
TASKS_IN_FLIGHT = 128  # manifests `tasks` reads at once (each a GET, or a 304 when cached)
HOLD = 1.0  # seconds a task handle reuses its last read of the manifest before revalidating it


def unsupported(what: str) -> UsageError:
    """The error of a command that object-storage workspaces do not have yet (exit 2)."""
    return UsageError(f"{what} is not supported on s3:// workspaces yet", hint="see docs/s3.md")


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept (`CKPT_CACHE`, else ~/.cache/ckpt)."""
    root = os.environ.get("CKPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckpt"
    )
    return Path(root)


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
        if policy is not None:  # made, then its policy recorded (ckpt.policy), as in a folder
            return super().create_task(
                name,
                arch=arch,
                arch_kwargs=arch_kwargs,
                exist_ok=exist_ok,
                settings=settings,
                metric_modes=metric_modes,
                source=source,
                policy=policy,
            )
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

    def orphan_task_folders(self) -> list[str]:
        return []  # a bucket has no folders: a prefix without task.toml is reported by tasks() as an error

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
        repairs, mended = _bad_records(self, name, error, dry_run, drop_bad)
        self._tasks.pop(name, None)
        return repairs, mended

    def leftovers(self, *, dry_run: bool, stale_after: float | None = None) -> list[Repair]:
        """The store's step of doctor: model folders claimed without a record, unfinished multipart uploads."""
        return _unclaimed_models(self, dry_run) + _abort_stale_uploads(self, dry_run)

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
        lease = _take_title(self, title)
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
        return _move_model(self, model, new)

    def make_model(self, task: Task, cp: Checkpoint, title: str, copy: bool) -> Model:
        """The store's step of promote: claim the title, copy on the server, write model.toml last (every
        copy in a bucket is one: `copy` changes nothing)."""
        return _make_model(self, task, cp, title)


class StoreTask(Task):
    """A task in object storage: its manifest is task.toml, committed with If-Match (see `update`), and the
    segment objects it names (ckpt.store_segments), with a log of saves beside it (ckpt.store_log)."""

    ws: StoreWorkspace

    def __init__(self, ws: StoreWorkspace, name: str):
        self.ws = ws
        self.name = name
        self.folder = Path("tasks") / name
        self.manifest = self.folder / TASK_FILE
        self.key = f"tasks/{name}/{TASK_FILE}"
        self._manifest: TaskState | None = None  # task.toml and its segments, as read or committed (with `_etag`)
        self._members: dict[str, list[int]] = {}  # the numbers each segment of `_manifest` holds
        self._gone: set[str] = set()  # retired segments this handle deleted (see update)
        self._state: TaskState | None = None  # the manifest with the log records it has not folded (see reload)
        self._etag = ""
        self._read_at = 0.0
        self._log: dict[int, Checkpoint] = {}  # log records read (a log object never changes)
        self._pending: list[int] = []  # the numbers in `_state` that are only in log objects
        self._stale: list[str] = []  # log objects already folded into the manifest (to delete)

    @property
    def storage(self) -> Storage:
        return self.ws.storage

    def reload(self) -> TaskState:
        """Read the manifest and its log: a GET (a 304 without a body when unchanged), a LIST of the log and the
        records not seen yet (concurrently); raises TaskNotFound, ManifestError."""
        manifest = self._read_manifest()
        self._state = self._merge(manifest)
        self._read_at = time.monotonic()
        return self._state

    def _merge(self, manifest: TaskState) -> TaskState:
        """`manifest` with the records of the log objects it has not folded (see ckpt.store_log)."""
        prefix = log_prefix(self.name)
        listed = {n: b.key for b in self.storage.list_prefix(prefix) if (n := number_of(b.key, prefix)) is not None}
        folded = set(manifest.header.folded) | manifest.checkpoints.keys()
        pending = sorted(n for n in listed if n not in folded)
        if pending and not self._log:
            self._log = _load_log_cache(self._log_cache_file(), self.name)
        unseen = [n for n in pending if n not in self._log]
        for n, data in zip(unseen, self.storage.get_many([listed[n] for n in unseen]), strict=True):
            if data is not None:  # else a fold took it in after this manifest was read: the next read has it
                self._log[n] = parse_record(data, listed[n], self.name, n)
        self._pending = [n for n in pending if n in self._log]
        if unseen:
            _save_log_cache(self._log_cache_file(), [self._log[n] for n in self._pending])
        self._stale = [listed[n] for n in sorted(listed) if n in folded]
        if not self._pending:
            return manifest
        cps = {**manifest.checkpoints, **{n: self._log[n] for n in self._pending}}
        return TaskState(replace(manifest.header), cps)

    def _read_manifest(self) -> TaskState:
        """task.toml (a GET, or a 304 when unchanged) with the records of the segments it names: those this
        machine has not read yet fetched concurrently (a segment never changes). A segment found missing was
        replaced by a commit after this root was read: the root is read again (twice at most)."""
        if self._manifest is None:
            self._manifest, self._etag, self._members = _load_manifest_cache(self._cache_file())
        for attempt in range(3):
            try:
                if self._manifest is not None and not attempt:
                    got = self.storage.get_if_changed(self.key, self._etag)
                    if got is None:
                        return self._manifest
                    data, etag = got
                else:
                    data, etag = self.storage.get(self.key)
            except FileNotFoundError:
                self._state = self._manifest = None
                raise TaskNotFound(f"task '{self.name}' does not exist", hint="see: ckpt tasks") from None
            if not data.strip():
                raise ManifestError(f"task manifest {self.ws.url}/{self.key} is empty")
            root = parse_task(data, self.manifest, self.name)
            if root.header.name != self.name:
                raise ManifestError(f"{self.key}: 'name' is {root.header.name!r} but the folder is '{self.name}'")
            missing, parts = self._segments(root)
            if missing is None:
                state = TaskState(root.header, merge(root.checkpoints, parts, self.manifest))
                self._manifest, self._etag, self._members = state, etag, {s: list(p) for s, p in parts.items()}
                _save_manifest_cache(self._cache_file(), state, etag, self._members)
                return state
        raise ManifestError(f"{missing}: missing (task.toml names it)", path=missing, hint=HINT)

    def _segments(self, root: TaskState) -> tuple[str | None, dict[str, dict[int, Checkpoint]]]:
        """(None, the records of each segment `root` names), or (the key of one that is missing, {})."""
        parts: dict[str, dict[int, Checkpoint]] = {}
        need = []
        had = self._manifest.checkpoints if self._manifest is not None else {}  # the last read's, by number
        for e in root.header.segments:
            known = self._members.get(e[3])
            if known is not None and all(n in had for n in known):
                parts[e[3]] = {n: had[n] for n in known}
            elif len(cached := _load_log_cache(self._segment_cache_file(e[3]), self.name)) == e[2]:
                parts[e[3]] = cached
            else:
                need.append(e)
        keys = [segment_key(self.name, e[3]) for e in need]
        for e, key, data in zip(need, keys, self.storage.get_many(keys), strict=True):
            if data is None:
                return key, {}
            parts[e[3]] = decode(data, key, self.name, e)
            _save_log_cache(self._segment_cache_file(e[3]), list(parts[e[3]].values()))
        return None, parts

    def _segment_cache_file(self, sid: str) -> Path:
        digest = hashlib.sha256(f"{self.ws.url}/{segment_key(self.name, sid)}".encode()).hexdigest()[:32]
        return cache_dir() / "segments" / f"{digest}.json"

    def stray_segments(self, stale_after: float) -> list[str]:
        """The segment objects task.toml does not name that may go: those its last commit replaced, and others
        older than `stale_after` seconds (a younger one may be a commit's still running on another machine)."""
        header = self.state().header
        named = {e[3] for e in header.segments}
        prefix, now = segment_prefix(self.name), time.time()
        out = []
        for b in self.storage.list_prefix(prefix):
            sid = id_of(b.key, prefix)
            if sid is not None and sid not in named and (sid in header.retired or now - b.modified >= stale_after):
                out.append(b.key)
        return out

    def _cache_file(self) -> Path:
        digest = hashlib.sha256(f"{self.ws.url}/{self.key}".encode()).hexdigest()[:32]
        return cache_dir() / "manifests" / f"{digest}.json"

    def _log_cache_file(self) -> Path:
        return self._cache_file().with_suffix(".log.json")

    def state(self) -> TaskState:
        """The manifest as it is now. Within one command (`HOLD` seconds) the last read is reused; after that
        it is revalidated with a conditional GET, so a long-lived handle sees other machines' saves."""
        if self._state is not None and time.monotonic() - self._read_at < HOLD:
            return self._state
        return self.reload()

    def refresh_cache(self) -> None:
        pass

    def wait(self) -> None:
        """As a folder task's `wait`; then the next read revalidates the manifest (a 304 when unchanged), so that
        what the background policy moved to the trash is seen at once, not after HOLD."""
        super().wait()
        self._state = None

    def summary(self) -> TaskSummary:
        st = self.state()
        latest = max(st.checkpoints, default=None)
        return TaskSummary(
            name=self.name,
            status=st.header.status,
            checkpoints=len(st.checkpoints),
            size=sum(cp.size for cp in st.checkpoints.values()),
            created=st.header.created,
            latest=latest,
            latest_metrics=dict(st.checkpoints[latest].metrics) if latest is not None else {},
        )

    def update(self, change: Callable[[TaskState], T]) -> T:
        """Apply `change` to a copy of the latest manifest (its log folded in) and commit it with If-Match; on a
        lost race, read and apply again.

        The commit folds the log: it names the log records it took in (`folded`), after deleting those an
        earlier fold named; once it landed they are deleted too (best effort: the next commit does it). The
        records go into segments as ckpt.store_segments.plan lays them out: a new segment is created first
        (If-None-Match), and the segments the commit replaced are named in `retired` and deleted once it
        landed, again by the next commit before it drops the names; a commit that did not land deletes its
        new segment.

        `change` mutates the state it is given and may raise to abandon the commit. Each commit carries its
        own id (kept among the header's last `COMMIT_IDS`): when a request fails or answers 412, the manifest
        is read again and a commit found there had landed (its response was lost, or a retry of it met its
        own write). A commit that did not land leaves nothing behind, not even in this handle. Raises
        BusyError after COMMIT_TRIES lost races.
        """
        for attempt in range(COMMIT_TRIES):
            current = self.reload() if attempt or self._state is None else self.state()
            pending, stale, base = list(self._pending), list(self._stale), self._manifest
            assert base is not None
            state = TaskState(replace(current.header), dict(current.checkpoints))
            result = change(state)
            if stale:  # folded by an earlier commit that named them: deleted before that name goes
                self.storage.delete(stale)
            retired = [s for s in base.header.retired if s not in self._gone]
            if retired:  # replaced by an earlier commit that named them: deleted before that name goes
                self.storage.delete([segment_key(self.name, s) for s in retired])
            layout = plan(base.header.segments, self._members, base.checkpoints, state.checkpoints)
            new_key = segment_key(self.name, layout.new[0]) if layout.new else None
            if layout.new and new_key:
                data = encode(self.name, layout.new[0], (state.checkpoints[n] for n in layout.new[1]))
                try:
                    put_once(self.storage, new_key, data, if_none_match=True)
                except BaseException:
                    self._forget(new_key)
                    raise
            commit = secrets.token_hex(8)
            state.header.commits = [*state.header.commits, commit][-COMMIT_IDS:]
            state.header.folded = pending
            state.header.log = state.header.status == "running"
            state.header.segments, state.header.retired = layout.segments, layout.retired
            state.header.last_number = state.max_number
            root = TaskState(state.header, {n: state.checkpoints[n] for n in layout.tail})
            try:
                etag = self.storage.put(self.key, task_bytes(root), if_match=self._etag)
            except PreconditionFailed:
                if self._landed(commit):
                    return result
                self._forget(new_key)
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                continue
            except Exception:
                if self._landed(commit):
                    return result
                self._forget(new_key)
                raise
            self._etag, self._manifest, self._state, self._read_at = etag, state, state, time.monotonic()
            self._members = layout.members
            self._pending, self._stale = [], [log_key(self.name, n) for n in pending]
            if layout.new:
                _save_log_cache(self._segment_cache_file(layout.new[0]), [state.checkpoints[n] for n in layout.new[1]])
            _save_manifest_cache(self._cache_file(), state, etag, self._members)
            if pending:
                with contextlib.suppress(Exception):
                    self.storage.delete(self._stale)
                    self._stale = []
            self._gone = set()
            if layout.retired:
                with contextlib.suppress(Exception):
                    self.storage.delete([segment_key(self.name, s) for s in layout.retired])
                    self._gone = set(layout.retired)
            return result
        raise BusyError(f"task '{self.name}' changed {COMMIT_TRIES} times while committing; try again")

    def _forget(self, key: str | None) -> None:
        """Delete the new segment of a commit known not to have landed (best effort: doctor deletes it later)."""
        if key is not None:
            with contextlib.suppress(Exception):
                self.storage.delete([key])

    def _landed(self, commit: str) -> bool:
        """Whether commit `commit` is in the manifest now (read again); raises CommitUnknown when it cannot be
        read: then neither the caller nor anyone may assume either way."""
        self._state = self._manifest = None
        try:
            return commit in self.reload().header.commits
        except Exception:
            raise CommitUnknown(
                f"the commit to task '{self.name}' may or may not have landed (the store did not answer)",
                hint=f"see: ckpt list {self.name}; run: ckpt doctor",
            ) from None

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None, *, settle: bool = True) -> Iterator[None]:
        """Nothing: object storage has no locks, and every change here commits with If-Match instead (a
        lost race reads again and retries), so an operation written for both stores runs unlocked here."""
        yield

    def unknown_files(self) -> tuple[list[Unknown], list[Unknown]]:
        return _unknown_objects(self.ws, self)

    def forget_read(self) -> None:
        self._state = self._manifest = None

    def adopt(self, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
        """The store's step of `scan --add` (see _adopt_objects)."""
        return _adopt_objects(self, candidates)

    def leftovers(self, *, dry_run: bool) -> tuple[list[Repair], set[str]]:
        """The store's step of doctor for what this task's saves left (see _task_leftovers)."""
        return _task_leftovers(self, dry_run)

    def discard_if_empty(self) -> bool:
        """An object-store task a failed import created is left as it is (not yet done here)."""
        return False

    def pending_markers(self) -> list[Path]:
        return []

    def _markers(self) -> tuple[list[Path], list[Path]]:
        return [], []  # no trash or import markers in object storage

    def recover_imports(self, *, dry_run: bool = False) -> list[Repair]:
        return []

    def linked(self, cps: list[Checkpoint]) -> list[tuple[Checkpoint, str]]:
        return []  # object storage has no symlinks

    def keep_rows(
        self,
        form: str,
        cps: list[Checkpoint],
        starts: list[int],
        text: bytes,
        linked: list[tuple[Checkpoint, str]],
    ) -> None:
        pass  # the manifest is revalidated by ETag; its local copy is the cache here

    def rows_before_appends(self, form: str) -> CachedRows | None:
        return None

    def cached_rows(self, form: str) -> CachedRows | None:
        return None

    def local_path(self, cp: Checkpoint) -> Path:
        """The checkpoint downloaded into the local cache (by sha256: downloaded once), for reading."""
        return download_cached(self.storage, _key(self.path_of(cp)), cp.sha256, cp.file, cp.size)

    # -- writing --

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
        if self.state().header.status != "running":
            raise self._not_running()
        tmpdir = Path(tempfile.mkdtemp(prefix="ckpt-upload-"))
        try:
            tmp, size, digest = fsutil.write_new_file(tmpdir, "checkpoint" + ext, produce)
            cp = Checkpoint(0, "", size, digest, now_iso(), step, epoch, metrics, original_name, self.name)
            number, _ = self._upload_numbered(cp, ext, lambda key: self.storage.upload(key, tmp))
        finally:
            fsutil.remove_tree(tmpdir)
        return number

    def _not_running(self) -> ConflictError:
        status = self.state().header.status
        return ConflictError(f"task '{self.name}' is {status}; it takes no new checkpoints", hint="create a new task")

    def _upload_numbered(
        self, cp: Checkpoint, ext: str, put: Callable[[str], object], *, unique: bool = False
    ) -> tuple[int, Checkpoint]:
        """Claim the next free number, upload the bytes under it, then commit the record (If-Match).

        With `unique`, a record of the same sha256 and size committed meanwhile (another import or scan of
        the same bytes) wins: the upload is deleted and _Duplicate raised."""
        number = self._claim_number()
        file = f"{CHECKPOINT_DIR}/{number:06d}{ext}"
        made = replace(cp, number=number, file=file)

        def add(state: TaskState) -> None:
            if state.header.status != "running":
                raise self._not_running()
            if number in state.checkpoints:  # a workspace copied in without its claims
                raise ConflictError(f"checkpoint {number} of task '{self.name}' exists; save again")
            if unique and any((c.sha256, c.size) == (cp.sha256, cp.size) for c in state.checkpoints.values()):
                raise _Duplicate
            state.checkpoints[number] = made

        try:
            # the number is ours alone (its claim is never deleted), so a plain upload overwrites nothing recorded
            put(f"tasks/{self.name}/{file}")
            st = self.state()
            if unique or not st.header.log or st.header.status != "running" or len(self._pending) + 1 >= FOLD_EVERY:
                self.update(add)  # opens the log, or folds it (an import's duplicate check stays atomic)
            else:
                if number in st.checkpoints:
                    raise ConflictError(f"checkpoint {number} of task '{self.name}' exists; save again")
                self._append(made)
        except BaseException as e:
            # the upload goes only when its record is known not to be committed; when that cannot be learned
            # it stays, unrecorded (doctor deletes it once stale): never a record without its object
            if not isinstance(e, CommitUnknown):
                with contextlib.suppress(Exception):
                    if number not in self.reload().checkpoints:
                        self.storage.delete(_keys_of(self.ws, f"tasks/{self.name}/{file}"))
            raise
        return number, made

    def _append(self, cp: Checkpoint) -> None:
        """Record `cp` in its own log object (If-None-Match). A failed or lost request, or a retried one that
        met its own write (412), is recognised as landed when the object holds these bytes."""
        key, data = log_key(self.name, cp.number), record_bytes(cp)
        try:
            self.storage.put(key, data, if_none_match=True)
        except Exception:
            try:
                landed = self.storage.get(key)[0] == data
            except FileNotFoundError:
                landed = False
            except Exception:
                raise CommitUnknown(
                    f"the record of checkpoint {cp.number} of task '{self.name}' may or may not have landed "
                    "(the store did not answer)",
                    hint=f"see: ckpt list {self.name}; run: ckpt doctor",
                ) from None
            if not landed:
                raise
        self._log[cp.number] = cp
        self._pending.append(cp.number)
        _save_log_cache(self._log_cache_file(), [self._log[n] for n in self._pending])
        if self._state is not None:
            self._state = TaskState(self._state.header, {**self._state.checkpoints, cp.number: cp})

    def _claim_number(self) -> int:
        """A checkpoint number no writer ever had: `numbers/<n>` created with If-None-Match.

        Claims are tiny objects that stay when a checkpoint goes to the trash, so a number is never reused
        even by a writer that read the manifest before the checkpoint was recorded and trashed.
        """
        number = self.state().max_number + 1
        while True:
            try:
                self.storage.put(f"tasks/{self.name}/{NUMBERS_DIR}/{number:06d}", b"", if_none_match=True)
                return number
            except PreconditionFailed:
                number += 1  # claimed by another writer (or by one that crashed): never reuse it

    def add_existing(self, items: list[Incoming], *, mode: str = "link", unique: bool = False) -> list[Checkpoint]:
        """Upload local files and folders (import into a remote workspace): each claims its number, is uploaded
        (a folder as one object per file under `checkpoints/<n>/`), then its record is committed. With "move",
        the local source is deleted once its record is committed, never before."""
        if mode not in ("link", "copy", "move"):
            raise UsageError(f"unknown mode {mode!r}", hint="use link, copy or move")
        added: list[Checkpoint] = []
        if self.state().header.status != "running":
            raise self._not_running()
        have = {(cp.sha256, cp.size) for cp in self.state().checkpoints.values()} if unique else set()
        for item in items:
            if (item.sha256, item.size) in have:
                continue
            if item.is_dir:
                ext = ""
            else:
                ext = os.path.splitext(item.original_name)[1]
                ext = ext if 1 < len(ext) <= 20 and ext[1:].replace("_", "").isalnum() else ""
            cp = Checkpoint(
                0,
                "",
                item.size,
                item.sha256,
                item.created or now_iso(),
                item.step,
                item.epoch,
                dict(item.metrics),
                item.original_name,
                self.name,
            )
            upload = functools.partial(self._upload_tree if item.is_dir else self._upload_new, item.source)
            try:
                _, made = self._upload_numbered(cp, ext, upload, unique=unique)
            except _Duplicate:
                continue
            added.append(made)
            have.add((made.sha256, made.size))
            if mode == "move":  # the record is committed: only now may the source go
                fsutil.remove_tree(item.source)
        return added

    def _upload_new(self, source: Path, key: str) -> None:
        self.storage.upload(key, source)

    def _upload_tree(self, source: Path, key: str) -> None:
        for rel, _ in fsutil.tree_files(source):
            self.storage.upload(f"{key}/{rel}", source / rel)

    def set_status_locked(self, status: str) -> TaskHeader:
        return self.set_status(status)

    def _rewrite(self, state: TaskState) -> None:
        raise unsupported("rewriting a manifest without a conditional commit")

    def note_import(self, metric_modes: dict[str, str], source: dict[str, str] | None) -> None:
        if replace(self.state().header).note_import(metric_modes, source):
            self.update(lambda state: state.header.note_import(metric_modes, source))

    def set_policy(self, policy: dict[str, Any] | None) -> None:
        def change(state: TaskState) -> None:
            state.header.policy = dict(policy) if policy else None

        self.update(change)

    def set_status(self, status: str) -> TaskHeader:
        def change(state: TaskState) -> TaskHeader:
            state.header.status = status
            state.header.finished = now_iso() if status in ("finished", "failed") else None
            return state.header

        return self.update(change)


def _load_manifest_cache(path: Path) -> tuple[TaskState | None, str, dict[str, list[int]]]:
    """The parsed manifest (with its segments' records), its ETag and the numbers each segment holds from the
    local cache, or (None, "", {}): parsing 10,000 records of TOML takes 1.5 s, loading them as JSON columns a
    tenth of that, and a 304 confirms they are current."""
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("v") != MANIFEST_CACHE_VERSION:
            return None, "", {}
        cols = [raw["checkpoints"][k] for k in COLUMNS]
        task = raw["header"]["name"]
        cps = dict(zip(cols[0], map(Checkpoint, *cols, repeat(task, len(cols[0]))), strict=True))
        header = TaskHeader(**raw["header"])
        header.segments = [(a, b, c, str(d)) for a, b, c, d in header.segments]
        members = {str(k): [int(n) for n in v] for k, v in raw["members"].items()}
        if set(members) != {e[3] for e in header.segments} or not all(n in cps for v in members.values() for n in v):
            return None, "", {}
        return TaskState(header, cps), str(raw["etag"]), members
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "", {}


def _save_manifest_cache(path: Path, state: TaskState, etag: str, members: dict[str, list[int]]) -> None:
    cps = state.checkpoints.values()
    doc = {
        "v": MANIFEST_CACHE_VERSION,
        "etag": etag,
        "header": state.header.to_json(),
        "checkpoints": {k: [getattr(cp, k) for cp in cps] for k in COLUMNS},
        "members": members,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_nosync(path, json.dumps(doc, separators=(",", ":")).encode())
    except (OSError, ValueError, TypeError):
        pass  # only a cache


def _load_log_cache(path: Path, task: str) -> dict[int, Checkpoint]:
    """The log records kept by `_save_log_cache` (a log object never changes: no revalidation needed)."""
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("v") != MANIFEST_CACHE_VERSION:
            return {}
        rows = [dict(zip(COLUMNS, row, strict=True)) for row in raw["records"]]
        return {int(r["number"]): Checkpoint(**r, task=task) for r in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _save_log_cache(path: Path, records: list[Checkpoint]) -> None:
    doc = {"v": MANIFEST_CACHE_VERSION, "records": [[getattr(cp, k) for k in COLUMNS] for cp in records]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_nosync(path, json.dumps(doc, separators=(",", ":")).encode())
    except (OSError, ValueError, TypeError):
        pass  # only a cache


def download_cached(storage: Storage, key: str, sha256: str, name: str, size: int | None = None) -> Path:
    """`key` in the local cache under its sha256 (downloaded and verified once, then reused); the local path.

    A folder checkpoint (the objects under `key/`) is downloaded as a folder and checked by its tree digest.
    Beside a verified copy lies its stamp (`<copy>.ok`: the size, mtime and inode of each of its files when it
    was verified); a copy whose files no longer match their stamp (changed on this machine, even at the same
    size), or has none, is downloaded again. `size` is the recorded size, checked too."""
    folder = cache_dir() / "objects" / sha256[:2]
    dest = folder / f"{sha256}{os.path.splitext(name)[1]}"
    stamp = dest.with_name(dest.name + ".ok")
    if dest.is_file() or dest.is_dir():
        try:
            held = stamp.read_text()
        except OSError:
            held = ""
        if held and held == _stamp(dest) and (size is None or _cached_size(dest) == size):
            return dest
        if dest.is_dir():
            fsutil.remove_tree(dest)
        else:
            fsutil.remove_file(dest)
    folder.mkdir(parents=True, exist_ok=True)
    inside = [b.key for b in storage.list_prefix(key + "/")] if not os.path.splitext(name)[1] else []
    if inside:
        _download_tree(storage, key, inside, sha256, dest)
    else:
        tmp = fsutil.temp_path(folder, dest.name)
        try:
            storage.download(key, tmp)
            if fsutil.sha256_file(tmp) != sha256:
                raise IntegrityError(f"{storage.url}/{key} does not match its recorded sha256", hint="run: ckpt verify")
            os.replace(tmp, dest)
        except FileNotFoundError:
            raise IntegrityError(f"{storage.url}/{key} is missing", hint="run: ckpt verify") from None
        finally:
            fsutil.remove_file(tmp)
    fsutil.atomic_write_nosync(stamp, _stamp(dest).encode())
    return dest


def _stamp(path: Path) -> str:
    """What a verified copy looked like: each file's relative name, size, mtime and inode ('' if unreadable)."""
    try:
        if path.is_dir():
            files = [(rel, path / rel) for rel, _ in fsutil.tree_files(path)]
        else:
            files = [("", path)]
        lines = []
        for rel, p in files:
            st = os.stat(p, follow_symlinks=False)
            lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\n")
        return "".join(lines)
    except (OSError, CkptError):
        return ""


def _cached_size(path: Path) -> int:
    try:
        return sum(n for _, n in fsutil.tree_files(path)) if path.is_dir() else path.stat().st_size
    except (OSError, CkptError):
        return -1


def _download_tree(storage: Storage, key: str, keys: list[str], sha256: str, dest: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for k in keys:
            target = tmp / k[len(key) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(k, target)
        digest = fsutil.tree_digest([(k[len(key) + 1 :], fsutil.sha256_file(tmp / k[len(key) + 1 :])) for k in keys])
        if digest != sha256:
            raise IntegrityError(f"{storage.url}/{key}/ does not match its recorded sha256", hint="run: ckpt verify")
        with contextlib.suppress(OSError):  # another process finished the same download first: keep its copy
            os.rename(tmp, dest)
    except FileNotFoundError:
        raise IntegrityError(f"{storage.url}/{key}/ is missing", hint="run: ckpt verify") from None
    finally:
        fsutil.remove_tree(tmp)
    return dest


class _Duplicate(Exception):
    pass


# --- models --------------------------------------------------------------------------------------------


class StoreModelIndex(ModelIndex):
    ws: StoreWorkspace

    def _keys(self) -> set[str]:
        return {b.key for b in self.ws.storage.list_prefix("models/")}

    def titles(self) -> list[str]:
        suffix = "/" + MODEL_FILE
        keys = self._keys()
        return sorted(k[len("models/") : -len(suffix)] for k in keys if k.endswith(suffix) and k.count("/") == 2)

    def names(self) -> list[str]:
        return self.ws.storage.children("models/")

    def __getitem__(self, title: str) -> Model:
        check_title(title)
        folder = Path("models") / title
        try:
            data, _ = self.ws.storage.get(f"models/{title}/{MODEL_FILE}")
        except FileNotFoundError:
            raise ModelNotFound(f"model '{title}' does not exist", hint="see: ckpt models") from None
        return Model.from_doc(title, parse_toml(data, folder / MODEL_FILE), folder)

    def __contains__(self, title: object) -> bool:
        return isinstance(title, str) and title in self.titles()

    def read_all(self) -> tuple[list[Model], list[CkptError]]:
        # one LIST, then every model.toml at once (several GETs in flight), not one round trip after another
        titles = self.titles()
        models: list[Model] = []
        errors: list[CkptError] = []
        for title, data in zip(
            titles, self.ws.storage.get_many([f"models/{t}/{MODEL_FILE}" for t in titles]), strict=True
        ):
            folder = Path("models") / title
            try:
                if data is None:
                    raise ModelNotFound(f"model '{title}' does not exist", hint="see: ckpt models")
                models.append(Model.from_doc(title, parse_toml(data, folder / MODEL_FILE), folder))
            except CkptError as e:
                errors.append(e)
        return models, errors

    def sources(self) -> dict[str, Source]:
        # the LIST of models/ gives each model.toml's ETag: only models changed since this machine last
        # looked are read (model_sources); the rest come from the local cache
        suffix = "/" + MODEL_FILE
        etags = {
            b.key[len("models/") : -len(suffix)]: b.etag
            for b in self.ws.storage.list_prefix("models/")
            if b.key.endswith(suffix) and b.key.count("/") == 2
        }
        digest = hashlib.sha256(self.ws.url.encode()).hexdigest()[:32]
        return store_sources(etags, cache_dir() / "models" / f"{digest}.json", self._fetch)

    def _fetch(self, titles: list[str]) -> list[tuple[Source, bool]]:
        out: list[tuple[Source, bool]] = []
        for title, data in zip(
            titles, self.ws.storage.get_many([f"models/{t}/{MODEL_FILE}" for t in titles]), strict=True
        ):
            folder = Path("models") / title
            try:
                m = Model.from_doc(title, parse_toml(data, folder / MODEL_FILE), folder) if data is not None else None
            except CkptError:
                m = None
            out.append(((m.task, m.checkpoint) if m is not None else None, data is not None))
        return out


class Lease:
    """The claim of a model title: `models/<title>/.claim`, created with If-None-Match, holding the time it was
    last renewed and its holder's token. A running promote (or rename, or model restore) renews it before
    each step; one not renewed for LEASE seconds with no model.toml beside it was left by a process that
    died (or lost the response to its claim), and the next claim of the title takes it over (If-Match on
    the expired claim, so of two takers one wins) and clears what it left."""

    def __init__(self, ws: StoreWorkspace, title: str, token: str | None = None):
        self.storage = ws.storage
        self.title = title
        self.key = f"models/{title}/{CLAIM_FILE}"
        self.token = token or secrets.token_hex(8)
        self.etag = ""

    def _body(self) -> bytes:
        return f"{now_iso()}\n{self.token}\n".encode()

    def take(self) -> Lease:
        """Claim the title; raises ConflictError when another holds it (a model, or a claim not yet expired)."""
        taken = ConflictError(
            f"model '{self.title}' already exists", hint="choose another --title, or see: ckpt models"
        )
        body = self._body()
        try:
            self.etag = put_once(self.storage, self.key, body, if_none_match=True)
            return self
        except PreconditionFailed:
            pass
        try:
            held, etag = self.storage.get(self.key)
        except FileNotFoundError:  # freed meanwhile: one more try
            try:
                self.etag = put_once(self.storage, self.key, body, if_none_match=True)
                return self
            except PreconditionFailed:
                raise taken from None
        holder = _claim_lines(held)
        if holder[1] != self.token and (
            _age(holder[0]) < LEASE or self.storage.head(f"models/{self.title}/{MODEL_FILE}") is not None
        ):
            raise taken
        try:  # expired (or this holder's own, from an interrupted restore): taken over
            self.etag = put_once(self.storage, self.key, body, if_match=etag)
        except PreconditionFailed:
            raise taken from None
        if holder[1] != self.token:  # what the dead holder copied is no model: it goes
            left = [b.key for b in self.storage.list_prefix(f"models/{self.title}/") if b.key != self.key]
            self.storage.delete(left)
        return self

    def renew(self) -> None:
        """Renew the lease (If-Match); raises LeaseLost when it expired and another command took the title."""
        try:
            self.etag = put_once(self.storage, self.key, self._body(), if_match=self.etag)
        except PreconditionFailed:
            raise LeaseLost(
                f"the claim of model title '{self.title}' expired and another command took it (this one ran "
                f"longer than the {LEASE:.0f} s lease without renewing it); nothing of the other one was touched",
                hint="run the command again",
            ) from None


class LeaseLost(ConflictError):
    pass


def _claim_lines(data: bytes) -> tuple[str, str]:
    """(time of the last renewal, holder's token) of a claim's bytes; an older ckpt's claim has no token."""
    lines = data.decode("utf-8", "replace").splitlines() + ["", ""]
    return lines[0].strip(), lines[1].strip()


def _make_model(ws: StoreWorkspace, task: Task, cp: Checkpoint, title: str) -> Model:
    check_case_twin(ws, title)
    # the title is claimed first (If-None-Match), so a losing racer never touches the winner's objects;
    # the weights are copied on the server, and model.toml comes last: a model never names missing weights
    lease = _take_title(ws, title)
    src = _key(task.path_of(cp))
    name = PurePosixPath(cp.file).name
    try:
        blobs = [b for b in ws.storage.list_prefix(src) if b.key == src or b.key.startswith(src + "/")]
        if not blobs:
            raise IntegrityError(
                f"checkpoint {cp.number} of task '{task.name}' is missing its file {src}", hint="run: ckpt verify"
            )
        try:
            for b in blobs:
                lease.renew()
                ws.storage.copy(b.key, f"models/{title}/{name}{b.key[len(src) :]}")
        except FileNotFoundError:  # trashed between the listing and the copy
            raise IntegrityError(
                f"checkpoint {cp.number} of task '{task.name}' was moved away meanwhile",
                hint=f"see: ckpt list {task.name}",
            ) from None
        model = Model(
            title=title,
            task=task.name,
            checkpoint=cp.number,
            file=name,
            sha256=cp.sha256,
            size=cp.size,
            created=now_iso(),
            storage="copy",
            step=cp.step,
            epoch=cp.epoch,
            metrics=dict(cp.metrics),
            folder=Path("models") / title,
        )
        lease.renew()
        put_once(ws.storage, f"models/{title}/{MODEL_FILE}", dumps(model.to_doc()), if_none_match=True)
    except LeaseLost:
        raise  # the title is another command's now: nothing of it is touched
    except BaseException:
        with contextlib.suppress(Exception):
            ws.storage.delete([b.key for b in ws.storage.list_prefix(f"models/{title}/")])
        raise
    return model


def _objects(ws: StoreWorkspace, task: Task) -> dict[str, list[str]]:
    """The object keys of each checkpoint file of `task` (a folder checkpoint has several), from one LIST."""
    out: dict[str, list[str]] = {}
    base = f"tasks/{task.name}/"
    for b in ws.storage.list_prefix(base + CHECKPOINT_DIR + "/"):
        rel = b.key[len(base) :]
        parts = rel.split("/")
        out.setdefault("/".join(parts[:2]), []).append(b.key)
    return out


def _age(created: str) -> float:
    """Seconds since the ISO time `created` (0 when unreadable: treated as young)."""
    try:
        return (datetime.now(UTC) - parse_iso(created)).total_seconds()
    except ValueError:
        return 0.0


def _keys_of(ws: StoreWorkspace, key: str) -> list[str]:
    return [b.key for b in ws.storage.list_prefix(key) if b.key == key or b.key.startswith(key + "/")]


# --- verify --------------------------------------------------------------------------------------------


# --- models remove and rename --------------------------------------------------------------------------


def _model_keys(ws: StoreWorkspace, title: str) -> tuple[list[Blob], str | None]:
    """The objects of model folder `title` other than its claim, and the claim's key (None when absent)."""
    folder = f"models/{title}/"
    blobs = ws.storage.list_prefix(folder)
    claim = folder + CLAIM_FILE
    return [b for b in blobs if b.key != claim], claim if any(b.key == claim for b in blobs) else None


def _move_model(ws: StoreWorkspace, model: Model, new: str) -> Model:
    old = model.title
    # the source is claimed first (If-None-Match on its `.moving`): of two renames of one model one wins, and
    # the other never copies it under a second title
    moving = _claim_source(ws, old)
    try:
        lease = _take_title(ws, new, hint="choose another title")
        # the new title is claimed, its weights copied on the server and its record written; only then does the
        # old one go (record first): a crash between leaves both titles, each whole
        renamed = replace(model, title=new, folder=Path("models") / new)
        blobs, _ = _model_keys(ws, old)
        folder = f"models/{old}/"
        try:
            ws.storage.copy_many(
                [
                    (b.key, f"models/{new}/{b.key[len(folder) :]}")
                    for b in blobs
                    if b.key not in (folder + MODEL_FILE, moving)
                ]
            )
            lease.renew()
            put_once(ws.storage, f"models/{new}/{MODEL_FILE}", dumps(renamed.to_doc()), if_none_match=True)
        except LeaseLost:
            raise
        except BaseException as e:
            with contextlib.suppress(Exception):
                ws.storage.delete([b.key for b in ws.storage.list_prefix(f"models/{new}/")])
            if isinstance(e, FileNotFoundError):  # removed by another machine meanwhile
                raise ModelNotFound(
                    f"model '{old}' was removed or renamed meanwhile", hint="see: ckpt models"
                ) from None
            raise
    except BaseException:
        with contextlib.suppress(Exception):
            ws.storage.delete([moving])  # the source is free again
        raise
    drop_model(ws, old, [b.key for b in blobs if b.key != moving] + [moving])
    return renamed


def _claim_source(ws: StoreWorkspace, title: str) -> str:
    """Claim model `title` for a rename: `models/<title>/.moving`, created with If-None-Match and holding the
    time. One a rename left when it died is taken over (If-Match) once older than LEASE. Its key."""
    key = f"models/{title}/{MOVING_FILE}"
    busy = ConflictError(f"model '{title}' is being renamed by another command", hint="see: ckpt models")
    body = f"{now_iso()}\n".encode()
    try:
        put_once(ws.storage, key, body, if_none_match=True)
        return key
    except PreconditionFailed:
        pass
    try:
        held, etag = ws.storage.get(key)
    except FileNotFoundError:
        raise busy from None
    if _age(held.decode("utf-8", "replace").strip()) < LEASE:
        raise busy
    try:
        put_once(ws.storage, key, body, if_match=etag)
    except PreconditionFailed:
        raise busy from None
    return key


def _take_title(ws: StoreWorkspace, title: str, hint: str | None = None) -> Lease:
    """The lease of a new title, checked again for case twins once held: two commands making `case` and
    `CASE` at once both see the other's claim then, and neither goes on (ConflictError; nothing is left).
    `hint` replaces the one of the "already exists" error."""
    try:
        lease = Lease(ws, title).take()
    except ConflictError as e:
        if hint is None:
            raise
        raise ConflictError(f"model '{title}' already exists", hint=hint) from e
    try:
        check_case_twin(ws, title)
    except ConflictError:
        with contextlib.suppress(Exception):
            ws.storage.delete([lease.key])
        raise
    return lease


# --- du, scan, doctor ----------------------------------------------------------------------------------


def _adopt_objects(task: StoreTask, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
    """A bucket's `Task.adopt`: each candidate claims a number, is copied under it on the server, is recorded,
    and only then is the original deleted. An object under a number a save, import or scan claimed and never
    recorded is not taken in: it is the upload of a command that failed or stopped (doctor deletes it once
    stale)."""
    ws = task.ws
    claimed = {b.key.rsplit("/", 1)[1] for b in ws.storage.list_prefix(f"tasks/{task.name}/{NUMBERS_DIR}/")}
    candidates = [u for u in candidates if _claimed_number(task, u.rel, claimed) is None]
    made: list[Checkpoint] = []
    added: set[str] = set()
    for c, u in _found_of_objects(ws, task, candidates):
        try:
            made.append(_adopt(ws, task, c, u))
        except _Duplicate:
            # added by another scan meanwhile, or by this scan run before and stopped before it deleted the
            # original: a record made from this very object (same name, size and bytes) lets it go
            digest = _digest_of(ws, u)
            if any(
                (cp.original_name, cp.size, cp.sha256) == (c.name, u.size, digest)
                for cp in task.reload().checkpoints.values()
            ):
                ws.storage.delete([u.rel] if u.kind == "file" else _keys_of(ws, u.rel))
                added.add(u.rel)
            continue
        added.add(u.rel)
    return made, added


def _claimed_number(task: Task, rel: str, claimed: set[str]) -> str | None:
    """The claimed number `rel` (a key of the workspace) is stored under, when it is `checkpoints/<n>[.ext]`."""
    if not rel.startswith(f"tasks/{task.name}/{CHECKPOINT_DIR}/"):
        return None
    stem = PurePosixPath(rel).name.partition(".")[0]
    return stem if stem.isdigit() and stem in claimed else None


def _digest_of(ws: StoreWorkspace, u: Unknown) -> str:
    if u.kind == "file":
        return ws.storage.sha256(u.rel)
    keys = [b.key for b in ws.storage.list_prefix(u.rel + "/")]
    return fsutil.tree_digest([(k[len(u.rel) + 1 :], ws.storage.sha256(k)) for k in keys])


def _unknown_objects(ws: StoreWorkspace, task: Task) -> tuple[list[Unknown], list[Unknown]]:
    from .finders import FILE_SUFFIXES
    from .importer import Unknown

    base = f"tasks/{task.name}/"
    known = {cp.file for cp in task.checkpoints}
    groups: dict[str, list[Blob]] = {}
    for b in ws.storage.list_prefix(base):
        rel = b.key[len(base) :]
        parts = rel.split("/")
        if rel == TASK_FILE or parts[0] in (NUMBERS_DIR, LOG_DIR, SEGMENT_DIR):
            continue
        top = "/".join(parts[:2]) if parts[0] == CHECKPOINT_DIR and len(parts) > 1 else parts[0]
        if top not in known:
            groups.setdefault(top, []).append(b)
    unknown: list[Unknown] = []
    temporary: list[Unknown] = []
    for top in sorted(groups, key=lambda t: (t.startswith(CHECKPOINT_DIR + "/"), t)):  # as the local scan
        blobs = groups[top]
        key = base + top
        name = PurePosixPath(top).name
        modified = datetime.fromtimestamp(max(b.modified for b in blobs), UTC).isoformat(timespec="microseconds")
        if [b.key for b in blobs] == [key]:
            addable = PurePosixPath(name).suffix in FILE_SUFFIXES and not name.startswith(".")
            u = Unknown(Path(key), key, "file", blobs[0].size, modified, addable)
        else:
            inside = [b.key[len(key) + 1 :] for b in blobs]
            u = Unknown(Path(key), key, "dir", sum(b.size for b in blobs), modified, _weights_in(inside) is not None)
        (temporary if name.startswith(".") else unknown).append(u)
    return unknown, temporary


def _weights_in(names: list[str]) -> str | None:
    """The weights file of a folder checkpoint among its files' relative names (as formats.weights_file)."""
    top = [n for n in names if "/" not in n]
    if ".metadata" in top or any(n.endswith("/.metadata") and n.count("/") == 1 for n in names):
        return ".metadata"  # a DCP folder (ckpt.layouts): its tensors are in the .distcp files beside it
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "mp_rank_00_model_states.pt"):
        if name in top:
            return name
    for suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        found = sorted(n for n in top if n.endswith(suffix) and not n.startswith("optimizer"))
        if found:
            return found[0]
    return None


def _found_of_objects(ws: StoreWorkspace, task: Task, candidates: list[Unknown]) -> list[tuple[Found, Unknown]]:
    """What each object's name says (as the local scan reads file names), in the order they will be numbered."""
    from .finders import HF_DIR, Found, order_by_plain_name
    from .import_names import hf_metrics, parse_lightning_name, parse_plain_name
    from .layouts import step_epoch

    pairs: dict[int, Unknown] = {}
    found: list[Found] = []
    base = f"tasks/{task.name}/"
    for u in candidates:
        name, leaf = u.rel[len(base) :], PurePosixPath(u.rel).name
        mtime = parse_iso(u.modified).timestamp()
        if u.kind == "dir":
            c = Found(Path(u.rel), name, is_dir=True, mtime=mtime)
            c.step, c.epoch = step_epoch(leaf)  # what a DCP or DeepSpeed step folder's name records
            m = HF_DIR.fullmatch(leaf)
            if m:
                try:
                    state = json.loads(ws.storage.get(f"{u.rel}/trainer_state.json")[0])
                except (FileNotFoundError, ValueError):
                    state = {}
                c.step = int(m.group(1))
                c.epoch, c.metrics = hf_metrics(state if isinstance(state, dict) else {}, c.step)
        elif "=" in leaf:
            epoch, step, metrics = parse_lightning_name(leaf)
            c = Found(Path(u.rel), name, epoch=epoch, step=step, metrics=metrics, mtime=mtime, size=u.size)
        else:
            epoch, step = parse_plain_name(leaf)
            c = Found(Path(u.rel), name, epoch=epoch, step=step, mtime=mtime, size=u.size)
        pairs[id(c)] = u
        found.append(c)
    order_by_plain_name(found)
    return [(c, pairs[id(c)]) for c in found]


def _adopt(ws: StoreWorkspace, task: StoreTask, c: Found, u: Unknown) -> Checkpoint:
    """Number object (or folder) `u` of the task: copied on the server under a claimed number, recorded, and
    only then the original deleted (a crash before leaves it where it was, and the copy unrecorded)."""
    keys = [u.rel] if u.kind == "file" else [b.key for b in ws.storage.list_prefix(u.rel + "/")]
    if u.kind == "file":
        digest, size, ext = ws.storage.sha256(u.rel), u.size, os.path.splitext(u.rel)[1]
    else:
        files = [(k[len(u.rel) + 1 :], ws.storage.sha256(k)) for k in keys]
        digest, size, ext = fsutil.tree_digest(files), u.size, ""
    cp = Checkpoint(0, "", size, digest, now_iso(), c.step, c.epoch, dict(c.metrics), c.name, task.name)

    def copy(dst: str) -> None:
        ws.storage.copy_many([(k, dst + k[len(u.rel) :]) for k in keys])

    _, made = task._upload_numbered(cp, ext, copy, unique=True)
    ws.storage.delete(keys)
    return made


def _unclaimed_models(ws: StoreWorkspace, dry_run: bool) -> list[Repair]:
    """Model folders with a claim but no record: a promote or rename interrupted after its claim."""
    from .trash_results import Repair

    repairs: list[Repair] = []
    folders: dict[str, set[str]] = {}
    for b in ws.storage.list_prefix("models/"):
        title, _, rest = b.key[len("models/") :].partition("/")
        folders.setdefault(title, set()).add(rest)
    for title, names in sorted(folders.items()):
        if MODEL_FILE in names:
            continue
        rel = f"models/{title}"
        if CLAIM_FILE in names and _age(_claim_lines(ws.storage.get(f"{rel}/{CLAIM_FILE}")[0])[0]) < LEASE:
            repairs.append(Repair(rel, "a model folder without model.toml", "left alone: it may be in use"))
            continue
        what = "an interrupted promote (a model folder without model.toml)"
        repairs.append(Repair(rel, what, "would delete it" if dry_run else "deleted"))
        if not dry_run:
            drop_model(ws, title, [f"{rel}/{n}" for n in names if n != CLAIM_FILE])
    return repairs


def _abort_stale_uploads(ws: StoreWorkspace, dry_run: bool) -> list[Repair]:
    """Multipart uploads a crashed save (or import) began and never finished: their parts are stored, and
    billed, until aborted. One younger than an hour may be a save running on another machine."""
    from .trash_results import Repair

    repairs: list[Repair] = []
    for key, upload_id, age in ws.storage.incomplete_uploads(""):
        what = "an unfinished multipart upload (a save that stopped)"
        if age < STALE_AFTER:
            repairs.append(Repair(key, what, "left alone: less than an hour old, it may still be running"))
        elif dry_run:
            repairs.append(Repair(key, what, "would abort it"))
        else:
            ws.storage.abort_upload(key, upload_id)
            repairs.append(Repair(key, what, "aborted"))
    return repairs


def _bad_records(
    ws: StoreWorkspace, name: str, error: ManifestError, dry_run: bool, drop: bool
) -> tuple[list[Repair], bool]:
    """A manifest refused for records it must not hold (see manifest.salvage_task): each reported, dropped with
    `drop` (committed with If-Match); and whether it parses now."""
    from .trash_results import Repair

    key = f"tasks/{name}/{TASK_FILE}"
    try:
        data, etag = ws.storage.get(key)
        state, dropped = salvage_task(data, Path(key), name)
    except (FileNotFoundError, ManifestError):
        dropped = []
    if not dropped:
        return [Repair(key, str(error), "left alone")], False
    if drop and not dry_run:
        try:
            ws.storage.put(key, task_bytes(state), if_match=etag)
        except PreconditionFailed:
            return [Repair(key, str(error), "left alone: it changed meanwhile; run ckpt doctor again")], False
        action = "dropped the record (its number is not reused); its file, if any, is reported below"
    elif drop:
        action = "would drop the record"
    else:
        action = "left alone: drop such records with: ckpt doctor --drop-bad-records"
    return [
        Repair(key, f"{'checkpoint ' + str(n) if n is not None else 'a record'} of task '{name}': {why}", action)
        for n, why in dropped
    ], drop and not dry_run


def _task_leftovers(task: StoreTask, dry_run: bool) -> tuple[list[Repair], set[str]]:
    """What saves left in a task: records in the log of a finished task (folded in), and objects under a number
    a save or import claimed and never recorded (deleted once stale); and the objects dealt with."""
    from .trash_results import Repair

    ws = task.ws
    repairs: list[Repair] = []
    state = task.state()
    if state.header.status != "running" and (task._pending or state.header.log):
        # a save that raced `finish` left its record in the log of a finished task: fold it (format 1 again)
        if not dry_run:
            task.update(lambda st: None)
        problem = f"task '{task.name}' is {state.header.status} with {len(task._pending)} records in its log"
        repairs.append(Repair(task.key, problem, "would fold them in" if dry_run else "folded them in"))
    strays = task.stray_segments(STALE_PENDING)  # a commit's that did not land, or replaced by one that did
    for key in strays:
        what = f"a segment of task '{task.name}' its manifest does not name"
        repairs.append(Repair(key, what, "would delete it" if dry_run else "deleted"))
    if strays and not dry_run:
        ws.storage.delete(strays)
    claimed = {b.key.rsplit("/", 1)[1] for b in ws.storage.list_prefix(f"tasks/{task.name}/{NUMBERS_DIR}/")}
    orphans: list[str] = []
    dealt: set[str] = set()
    for u in _unknown_objects(ws, task)[0]:
        if _claimed_number(task, u.rel, claimed) is not None and _age(u.modified) >= STALE_PENDING:
            # under a number a save (import, scan --add) claimed, never recorded: one that stopped before its
            # commit. The same while it is still running on another machine: only a stale one goes
            what = f"an object of task '{task.name}' a save or import stopped before recording"
            repairs.append(Repair(u.rel, what, "would delete it" if dry_run else "deleted"))
            orphans += [u.rel] if u.kind == "file" else _keys_of(ws, u.rel)
            dealt.add(u.rel)
    if orphans and not dry_run:
        ws.storage.delete(orphans)
    return repairs, dealt
