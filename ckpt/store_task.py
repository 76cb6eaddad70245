"""A task in a bucket: its manifest committed with If-Match, the segments and log beside it, and saves by claim."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from . import fsutil
from .errors import BusyError, CommitUnknown, ConflictError, ManifestError, TaskNotFound, UsageError
from .layout import CHECKPOINT_DIR, NUMBERS_DIR, TASK_FILE, Incoming
from .manifest import Checkpoint, TaskHeader, TaskState, parse_task, task_bytes
from .storage import PreconditionFailed, Storage
from .store_cache import (
    cache_dir,
    download_cached,
    load_log_cache,
    load_manifest_cache,
    save_log_cache,
    save_manifest_cache,
)
from .store_doctor import Duplicate, adopt_objects, keys_of, task_leftovers, unknown_objects
from .store_log import FOLD_EVERY, log_key, log_prefix, number_of, parse_record, record_bytes
from .store_segments import HINT, decode, encode, id_of, merge, plan, segment_key, segment_prefix
from .task_base import Task, TaskSummary
from .task_rows import CachedRows
from .timeutil import now_iso
from .trash_entry import put_once

if TYPE_CHECKING:
    from .importer import Unknown
    from .store import StoreWorkspace
    from .trash_results import Repair

T = TypeVar("T")
COMMIT_TRIES = 100
COMMIT_IDS = 8  # the ids of the last commits kept in a manifest (see StoreTask.update)
READ_TRIES = 3  # reads of a task's log and manifest when a fold overtook one (see StoreTask.reload)
HOLD = 1.0  # seconds a task handle reuses its last read of the manifest before revalidating it


def unsupported(what: str) -> UsageError:
    """The error of a command that object-storage workspaces do not have yet (exit 2)."""
    return UsageError(f"{what} is not supported on s3:// workspaces yet", hint="see docs/s3.md")


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

    @property
    def unfolded(self) -> list[int]:
        """The numbers of the records read only from log objects (not folded into the manifest yet)."""
        return self._pending

    def reload(self) -> TaskState:
        """Read the log and the manifest: a LIST of the log, a GET of the manifest (a 304 without a body when
        unchanged), and the log's records not seen yet (concurrently); raises TaskNotFound, ManifestError.

        Another writer's fold may land between these requests and delete the log objects it took in, so the
        log is listed first: an object deleted after the LIST was folded by a commit that landed before, which
        the manifest read after it holds. An object listed but gone by its GET was folded after the manifest
        was read: everything is read again (READ_TRIES times at most; a record is missed only then, and only
        by this read)."""
        for attempt in range(READ_TRIES):
            prefix = log_prefix(self.name)
            listed = {n: b.key for b in self.storage.list_prefix(prefix) if (n := number_of(b.key, prefix)) is not None}
            manifest = self._read_manifest()
            state = self._merge(manifest, listed, last=attempt == READ_TRIES - 1)
            if state is not None:
                break
        assert state is not None
        self._state = state
        self._read_at = time.monotonic()
        return self._state

    def _merge(self, manifest: TaskState, listed: dict[int, str], *, last: bool) -> TaskState | None:
        """`manifest` with the records of the log objects `listed` (number: key) that it has not folded (see
        ckpt.store_log); None when one of them was deleted meanwhile (unless `last`: then it is left out)."""
        folded = set(manifest.header.folded) | manifest.checkpoints.keys()
        pending = sorted(n for n in listed if n not in folded)
        if pending and not self._log:
            self._log = load_log_cache(self._log_cache_file(), self.name)
        unseen = [n for n in pending if n not in self._log]
        vanished = False
        for n, data in zip(unseen, self.storage.get_many([listed[n] for n in unseen]), strict=True):
            if data is None:  # a fold took it in after this manifest was read
                vanished = True
            else:
                self._log[n] = parse_record(data, listed[n], self.name, n)
        if vanished and not last:
            return None
        self._pending = [n for n in pending if n in self._log]
        if unseen:
            save_log_cache(self._log_cache_file(), [self._log[n] for n in self._pending])
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
            self._manifest, self._etag, self._members = load_manifest_cache(self._cache_file())
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
                save_manifest_cache(self._cache_file(), state, etag, self._members)
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
            elif len(cached := load_log_cache(self._segment_cache_file(e[3]), self.name)) == e[2]:
                parts[e[3]] = cached
            else:
                need.append(e)
        self._uncache_segments(root.header.retired)
        keys = [segment_key(self.name, e[3]) for e in need]
        for e, key, data in zip(need, keys, self.storage.get_many(keys), strict=True):
            if data is None:
                return key, {}
            parts[e[3]] = decode(data, key, self.name, e)
            save_log_cache(self._segment_cache_file(e[3]), list(parts[e[3]].values()))
        return None, parts

    def _uncache_segments(self, sids: list[str]) -> None:
        """Remove this machine's parsed copies of segments a commit replaced (`retired`): no manifest names them
        again, and the cache would otherwise grow with every merge. A copy whose retirement this machine never
        read stays (harmless: deleting the cache folder is always safe)."""
        for sid in sids:
            with contextlib.suppress(OSError):
                os.unlink(self._segment_cache_file(sid))

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
                save_log_cache(self._segment_cache_file(layout.new[0]), [state.checkpoints[n] for n in layout.new[1]])
            self._uncache_segments(layout.retired)
            save_manifest_cache(self._cache_file(), state, etag, self._members)
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
        return unknown_objects(self.ws, self)

    def forget_read(self) -> None:
        self._state = self._manifest = None

    def adopt(self, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
        """The store's step of `scan --add` (see adopt_objects)."""
        return adopt_objects(self, candidates)

    def leftovers(self, *, dry_run: bool) -> tuple[list[Repair], set[str]]:
        """The store's step of doctor for what this task's saves left (see task_leftovers)."""
        return task_leftovers(self, dry_run)

    def discard_if_empty(self) -> bool:
        """An object-store task a failed import created is left as it is (not yet done here)."""
        return False

    def pending_markers(self) -> list[Path]:
        return []

    def finish_save(self, *, dry_run: bool = False) -> Repair | None:
        return None  # a save's object without a record is doctor's (task_leftovers): it has no record to take in

    def _markers(self) -> tuple[list[Path], list[Path], list[Path]]:
        return [], [], []  # no trash, import or save marks in object storage (doctor's leftovers find a save's)

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
        return download_cached(self.storage, PurePosixPath(self.path_of(cp)).as_posix(), cp.sha256, cp.file, cp.size)

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
            number, _ = self.upload_numbered(cp, ext, lambda key: self.storage.upload(key, tmp))
        finally:
            fsutil.remove_tree(tmpdir)
        return number

    def _not_running(self) -> ConflictError:
        status = self.state().header.status
        return ConflictError(f"task '{self.name}' is {status}; it takes no new checkpoints", hint="create a new task")

    def upload_numbered(
        self, cp: Checkpoint, ext: str, put: Callable[[str], object], *, unique: bool = False
    ) -> tuple[int, Checkpoint]:
        """Claim the next free number, upload the bytes under it, then commit the record (If-Match).

        With `unique`, a record of the same sha256 and size committed meanwhile (another import or scan of
        the same bytes) wins: the upload is deleted and Duplicate raised."""
        number = self._claim_number()
        file = f"{CHECKPOINT_DIR}/{number:06d}{ext}"
        made = replace(cp, number=number, file=file)

        def add(state: TaskState) -> None:
            if state.header.status != "running":
                raise self._not_running()
            if number in state.checkpoints:  # a workspace copied in without its claims
                raise ConflictError(f"checkpoint {number} of task '{self.name}' exists; save again")
            if unique and any((c.sha256, c.size) == (cp.sha256, cp.size) for c in state.checkpoints.values()):
                raise Duplicate
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
                        self.storage.delete(keys_of(self.ws, f"tasks/{self.name}/{file}"))
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
        save_log_cache(self._log_cache_file(), [self._log[n] for n in self._pending])
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
                _, made = self.upload_numbered(cp, ext, upload, unique=unique)
            except Duplicate:
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
