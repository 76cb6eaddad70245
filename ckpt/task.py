"""A task of a folder workspace (`FolderTask`): its manifest, its checkpoint files, and every change to them under
its lock."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import adding, fsutil, locks
from .errors import (
    CkptError,
    ConflictError,
    IntegrityError,
    ManifestError,
    UsageError,
    WriteError,
)
from .manifest import (
    Checkpoint,
    TaskHeader,
    TaskState,
    parse_toml,
    record_bytes,
    records_in,
    task_bytes,
)
from .task_base import Task, TaskSummary
from .task_reader import TaskReader
from .task_rows import CachedRows, ListRows
from .timeutil import now_iso

if TYPE_CHECKING:
    from .importer import Unknown
    from .trash_results import Repair
    from .workspace_base import Workspace

from .layout import (
    CACHE_FILE,
    CHECKPOINT_DIR,
    CREATE_LOCK_FILE,
    IMPORT_MARKER_PREFIX,
    LIST_CACHE_FILE,
    LOCK_FILE,
    PENDING_PREFIX,
    SAVING_FILE,
    TASK_FILE,
    Incoming,
)

T = TypeVar("T")
_SKIPPED_MAX = 1000  # a save skips the numbers of files no record names (put there by hand): never this many
_DISK_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # a save's bytes the disk would not take


class FolderTask(Task):
    """A task of a folder workspace: its manifest `tasks/<name>/task.toml` (appended to by saves, rewritten
    under the task's lock by every other change) and its checkpoint files."""

    def __init__(self, ws: Workspace, name: str):
        super().__init__(ws, name)
        self._reader = TaskReader(self.manifest, self.folder / CACHE_FILE, name)
        self._rows = ListRows(self.folder, self.manifest, self._reader)  # `ckpt list`'s rows, kept
        self._holder: int | None = None  # the thread that holds the task's lock through this handle (see lock)

    def refuse_links(self) -> None:
        """Raise SymlinkError when `tasks/`, the task folder, `checkpoints/`, or one of the task's own files is a link.

        Checked when the task is opened and again before every change (under `lock`), so that nothing is read or
        written through one (a link there may lead out of the workspace).
        """
        fsutil.refuse_links(self.ws.root, f"tasks/{self.name}/{CHECKPOINT_DIR}")
        for own in (TASK_FILE, LOCK_FILE, CACHE_FILE, LIST_CACHE_FILE):
            fsutil.refuse_links(self.folder, own, f"tasks/{self.name}")

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
                pending, importing, saving = self._markers()
                if saving and settle:
                    self.finish_save()  # a save killed between its rename and its record: recorded first
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
        self.ws.forget_task(self.name)
        fsutil.remove_file(self.folder / LOCK_FILE)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)
        return True

    def pending_markers(self) -> list[Path]:
        """Markers (`.pending-<entry id>`) of interrupted trash operations on this task."""
        return self._markers()[0]

    def _markers(self) -> tuple[list[Path], list[Path], list[Path]]:
        """The markers of interrupted trash operations, of imports (running or killed) and the record of a save
        (running or killed: SAVING_FILE), in one scandir."""
        pending: list[Path] = []
        importing: list[Path] = []
        saving: list[Path] = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.startswith(PENDING_PREFIX):
                        pending.append(Path(e.path))
                    elif e.name.startswith(IMPORT_MARKER_PREFIX):
                        importing.append(Path(e.path))
                    elif e.name == SAVING_FILE:
                        saving.append(Path(e.path))
        except FileNotFoundError:
            pass
        return pending, importing, saving

    def unknown_files(self) -> tuple[list[Unknown], list[Unknown]]:
        """What the task folder holds that its manifest does not know: (unknown, ckpt's own temporary names)."""
        from .importer import scan_folder

        found = scan_folder(self.ws, self)
        return found.unknown, found.temporary

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
        try:
            tmp, size, digest = fsutil.write_new_file(cdir, "checkpoint" + ext, produce)
        except OSError as e:
            refused = self._refused(e, cdir)
            if refused is e or isinstance(e, CkptError) or not str(e.filename or cdir).startswith(str(cdir)):
                raise
            raise refused from e
        saving = self.folder / SAVING_FILE
        try:
            with self.lock():  # which records a save a kill stopped between its rename and its record, first
                state = self.state()
                if state.header.status != "running":
                    raise ConflictError(
                        f"task '{self.name}' is {state.header.status}; it takes no new checkpoints",
                        hint="create a new task",
                    )
                number = state.max_number
                while True:
                    number += 1
                    cp = Checkpoint(
                        number=number,
                        file=f"{CHECKPOINT_DIR}/{number:06d}{ext}",
                        size=size,
                        sha256=digest,
                        created=now_iso(),
                        step=step,
                        epoch=epoch,
                        metrics=metrics,
                        original_name=original_name,
                        task=self.name,
                    )
                    target = self.folder / cp.file
                    # the record first, beside the manifest: a kill after the rename leaves what the next save (or
                    # doctor) needs to record the file (finish_save). Not fsynced: a killed process's writes stay
                    try:
                        fsutil.make_file_new(saving, record_bytes(cp))
                    except OSError as e:
                        if isinstance(e, CkptError):
                            raise
                        fsutil.remove_file(saving)  # what a full disk let it write, if anything
                        refused = self._refused(e, saving)
                        if refused is e:
                            raise
                        raise refused from e
                    try:
                        fsutil.move_noreplace(tmp, target)
                        break
                    except ConflictError:
                        fsutil.remove_file(saving)  # a file no record names (put there by hand): its number is skipped
                    except BaseException:
                        fsutil.remove_file(saving)
                        raise
                try:
                    fsutil.fsync_dir(cdir)
                    self._append_record(cp, target)  # only once the file is complete and in place
                except BaseException:
                    # an interrupt (Ctrl-C, SIGTERM) before the record landed: the save did not happen
                    if not self._recorded(cp):
                        fsutil.remove_file(target)
                    raise
                finally:
                    fsutil.remove_file(saving)
        finally:
            fsutil.remove_file(tmp)
        return number

    def _refused(self, e: OSError, where: Path) -> OSError:
        """The error of a save whose bytes the disk would not take: WriteError naming the task (still an OSError),
        or `e` itself for any other failure."""
        if e.errno not in _DISK_REFUSED:
            return e
        what = {errno.EROFS: "make the file system writable", errno.EFBIG: "raise the file size limit (ulimit -f)"}
        hint = what.get(e.errno or 0, f"free space (ckpt trash-unused {self.name}, then ckpt trash empty)")
        return WriteError(
            f"cannot save to task '{self.name}': {e.strerror} ({self.ws.rel(where)}); nothing was saved",
            errno=e.errno,
            path=where,
            hint=f"{hint} and save again",
        )

    def _append_record(self, cp: Checkpoint, target: Path) -> None:
        """Append the record of `cp`, whose file `target` is in place (caller holds the lock)."""
        data = record_bytes(cp)
        after = fsutil.append_durably(self.manifest, data)
        self._reader.note_append(cp, data, after)

    def _recorded(self, cp: Checkpoint) -> bool:
        """Whether the manifest holds the record of `cp` (after an interrupted append: it landed, or was undone)."""
        try:
            return cp.number in self.state().checkpoints
        except (CkptError, OSError):
            return True  # unreadable: the file is kept, for doctor

    def finish_save(self, *, dry_run: bool = False) -> Repair | None:
        """A save a kill stopped between its rename and its record (caller holds the lock): its file recorded
        from the record it left in SAVING_FILE. A record that does not describe such a file exactly (the save
        landed, never renamed, or the file is anything else: input like any other) is dropped."""
        from .trash_results import Repair

        saving = self.folder / SAVING_FILE
        try:
            st = os.lstat(saving)
        except FileNotFoundError:
            return None
        rel = self.ws.rel(saving)
        if stat.S_ISDIR(st.st_mode):
            raise IntegrityError(
                f"{rel} is a folder, where ckpt keeps the record of a save in progress",
                path=saving,
                hint=f"move it out of the task folder: mv {rel} <elsewhere>",
            )
        cp, why = self._left_record(saving, st)
        if cp is None:
            if not dry_run:
                fsutil.remove_file(saving)
            if why is None:  # what a save that landed (or never renamed its file) leaves: nothing to say
                return None
            return Repair(rel, f"the record of a save that {why}", "would drop it" if dry_run else "dropped it")
        target = self.folder / cp.file
        what = f"a save to task '{self.name}' killed before its record"
        if dry_run:
            return Repair(self.ws.rel(target), what, f"would record it as checkpoint {cp.number}")
        self._append_record(cp, target)
        fsutil.remove_file(saving)
        return Repair(self.ws.rel(target), what, f"recorded it as checkpoint {cp.number}")

    def _left_record(self, saving: Path, st: os.stat_result) -> tuple[Checkpoint | None, str | None]:
        """The record a killed save left in `saving`, when its file is in place exactly as a save leaves it:
        the task's next number (or one after numbers whose files no record names), named as a save names
        it, a file of its own (one link) of the recorded size and sha256. Else (None, why it is not usable),
        and (None, None) for what a save that landed, or never renamed its file, leaves."""
        from .hashing import sha256_file

        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:  # a record is a few hundred bytes
            return None, "is not a file ckpt wrote (a link, a FIFO, or too large)"
        try:
            data = fsutil.read_own(saving)
            (cp,) = records_in(parse_toml(data, saving), saving, self.name).values()
        except (CkptError, OSError, ValueError):
            return None, None  # cut short: the save was killed while it wrote this, before its rename
        state = self.state()
        if cp.number <= state.max_number:
            return None, None  # it landed
        name = cp.file.removeprefix(f"{CHECKPOINT_DIR}/")
        suffix = name[6:] if len(name) > 6 and name[:6].isdigit() else ""
        if name != f"{cp.number:06d}{suffix}" or not suffix.startswith(".") or "/" in suffix or len(suffix) > 20:
            return None, f"names {cp.file}, which no save of checkpoint {cp.number} writes"
        if cp.number > state.max_number + _SKIPPED_MAX:
            return None, f"is numbered {cp.number}, far beyond the task's last number {state.max_number}"
        try:
            file = os.lstat(self.folder / cp.file)
        except FileNotFoundError:
            return None, None  # never renamed
        except OSError:
            return None, f"names {cp.file}, which cannot be read"
        if not stat.S_ISREG(file.st_mode) or file.st_nlink != 1:
            return None, f"names {cp.file}, which is not a file of its own (a link, a folder, or hard-linked)"
        if file.st_size != cp.size or sha256_file(self.folder / cp.file) != cp.sha256:
            return None, f"names {cp.file}, whose bytes are not the ones it records"
        return cp, None

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

    @property
    def reader(self) -> TaskReader:
        """What reads this task's manifest incrementally (the workspace's summary cache keys on it)."""
        return self._reader

    def forget_read(self) -> None:
        """Read the manifest again next time (it was replaced behind this handle's back)."""
        self._reader.forget()

    def leftovers(self, *, dry_run: bool) -> tuple[list[Repair], set[str]]:
        """The store's step of doctor for what this task's interrupted writes left beyond its marks: a save
        killed between its rename and its record (a killed import's are `recover_imports`'); and the files it
        dealt with."""
        if not os.path.lexists(self.folder / SAVING_FILE):
            return [], set()
        from .trash_results import Repair

        try:
            with self.lock(settle=False):  # the lock would finish the save first, without a word
                repair = self.finish_save(dry_run=dry_run)
        except IntegrityError as e:
            what = "a folder where ckpt keeps the record of a save in progress"
            return [Repair(self.ws.rel(self.folder / SAVING_FILE), what, f"left alone: {e.hint}")], set()
        return ([repair], {repair.path}) if repair is not None else ([], set())

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
