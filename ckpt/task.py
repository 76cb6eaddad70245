"""A task of a folder workspace: its manifest, its checkpoint files, and every change to them under its lock."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from . import adding, fsutil, hashing, locks
from .errors import (
    CheckpointNotFound,
    CkptError,
    ConflictError,
    ManifestError,
    UsageError,
)
from .manifest import (
    Checkpoint,
    TaskHeader,
    TaskState,
    record_bytes,
    task_bytes,
)
from .metrics import Direction, direction
from .task_reader import TaskReader
from .task_rows import CachedRows, ListRows
from .timeutil import now_iso

if TYPE_CHECKING:
    from .background import PendingSave
    from .importer import Unknown
    from .models import Model
    from .trash_results import Repair
    from .workspace import Workspace

from .layout import (
    CACHE_FILE,
    CHECKPOINT_DIR,
    CREATE_LOCK_FILE,
    IMPORT_MARKER_PREFIX,
    LIST_CACHE_FILE,
    LOCK_FILE,
    PENDING_PREFIX,
    TASK_FILE,
    Incoming,
)

T = TypeVar("T")


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


class Task:
    """One training run in a workspace: its manifest and its checkpoint files."""

    def __init__(self, ws: Workspace, name: str):
        self.ws = ws
        self.name = name
        self.folder = ws.tasks_dir / name
        self.manifest = self.folder / TASK_FILE
        self._reader = TaskReader(self.manifest, self.folder / CACHE_FILE, name)
        self._rows = ListRows(self.folder, self.manifest, self._reader)  # `ckpt list`'s rows, kept
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
        return self._rows.linked(cps)

    def keep_rows(
        self,
        form: str,
        cps: list[Checkpoint],
        starts: list[int],
        text: bytes,
        linked: list[tuple[Checkpoint, str]],
    ) -> None:
        """Keep the rendered rows of `cps` for `cached_rows` (see ListRows.keep); failures are ignored."""
        self._rows.keep(form, cps, starts, text, linked)

    def rows_before_appends(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, when the manifest only grew since (see ListRows.before_appends)."""
        return self._rows.before_appends(form)

    def cached_rows(self, form: str) -> CachedRows | None:
        """What `keep_rows` kept as `form`, while the manifest and the checkpoints' folders are unchanged since."""
        return self._rows.cached(form)

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
        with locks.locked(self.folder / LOCK_FILE, f"task '{self.name}'", timeout):
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
            with locks.locked(self.folder / LOCK_FILE, f"task '{self.name}'"):
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
        own = {TASK_FILE, CACHE_FILE, LIST_CACHE_FILE, LOCK_FILE, LOCK_FILE + locks.HOLDER_SUFFIX, CHECKPOINT_DIR}
        with locks.locked(self.ws.tasks_dir / CREATE_LOCK_FILE, "task creation"), self.lock():
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
        digests = hashing.sha256_many([src / rel for rel, _ in files])
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
            sha256=hashing.tree_digest([(rel, d) for rel, _, d in entries]),
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
        """Add files and folders as they are (see ckpt.adding.add_existing)."""
        return adding.add_existing(self, items, mode=mode, unique=unique)

    def note_append(self, cp: Checkpoint, data: bytes, after: os.stat_result) -> None:
        """Tell the reader that `data` (the record of `cp`) was appended to the manifest, which is `after` now."""
        self._reader.note_append(cp, data, after)

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
