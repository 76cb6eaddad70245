"""A task of any workspace: what every store does the same way (reading records, saving, finishing), over the
steps each store gives (`FolderTask` in ckpt.task for a folder, `StoreTask` in ckpt.store_task for a bucket)."""

from __future__ import annotations

import contextlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from . import fsutil, hashing
from .errors import BusyError, CheckpointNotFound, CkptError, UsageError
from .manifest import (
    Checkpoint,
    TaskHeader,
    TaskState,
)
from .metrics import Direction, direction
from .task_rows import CachedRows

if TYPE_CHECKING:
    from .background import PendingSave
    from .importer import Unknown
    from .models import Model
    from .trash_results import Repair
    from .workspace_base import Workspace

from .layout import (
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


class Task(ABC):
    """One training run in a workspace: its manifest and its checkpoint files. What every store does the same
    way (reading records, saving, finishing) is here, written once over the steps each store gives (the
    abstract methods): `FolderTask` for a folder, `ckpt.store_task.StoreTask` for a bucket."""

    def __init__(self, ws: Workspace, name: str):
        self.ws = ws
        self.name = name
        self.folder = ws.tasks_dir / name
        self.manifest = self.folder / TASK_FILE

    def __repr__(self) -> str:
        return f"Task({self.name!r})"

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
        held = self._trash_entry_holding(number) if 0 < number <= self.state().max_number else None
        if held is not None:
            raise CheckpointNotFound(
                f"task '{self.name}' has no checkpoint {number} ({have}): it is in trash entry {held}",
                hint=f"put it back: ckpt trash restore {held}",
            )
        raise CheckpointNotFound(
            f"task '{self.name}' has no checkpoint {number} ({have})", hint=f"see: ckpt list {self.name}"
        )

    def _trash_entry_holding(self, number: int) -> str | None:
        """The trash entry that holds checkpoint `number` of this task, if one does (for an error's message:
        entries that cannot be read are passed over)."""
        from .trash_entry import read_entry  # here: only this error's path reads the trash (`import ckpt` is lighter)

        ids, _ = self.ws.trash_entry_ids()
        for entry_id in sorted(ids, reverse=True):  # the newest first: ids begin with their time
            try:
                entry = read_entry(self.ws, entry_id)
            except (CkptError, OSError):
                continue
            if entry.kind == "checkpoints" and entry.task == self.name and number in entry.numbers:
                return entry_id
        return None

    def latest(self) -> Checkpoint | None:
        """The checkpoint with the highest number, or None: after what an interrupted save, trash or import
        left is taken in (a training run that resumes from it must not start one checkpoint behind)."""
        self.take_in_save()
        cps = self.state().checkpoints
        return cps[max(cps)] if cps else None

    def path_of(self, cp: Checkpoint) -> Path:
        return self.folder / cp.file

    def settle(self) -> bool:
        """Finish or undo an interrupted save, trash or restore of this task, if one left a mark; whether one did.

        What `lock()` does before every change, for the commands that only read (`list`, `show`), so that
        they never show a record whose file an interrupted trash left in the trash. Costs one scandir of
        the task folder when there is nothing to do; takes the task's lock (waiting as `lock` does) only
        when there is.
        """
        pending, importing, saving = self._markers()
        if importing and not pending:
            from .staging import abandoned

            if not abandoned(importing):
                importing = []  # imports that are running: theirs to finish
        if pending or importing:
            with self.lock():
                pass
            return True
        return bool(saving) and self.take_in_save()

    def take_in_save(self) -> bool:
        """Record the file of a save a kill stopped between its rename and its record (see docs/formats.md), as
        every lock of the task does first; whether one was. What reads, `latest()` and dry runs call: nothing
        but that record is written. The record may be a save's that is committing now (it holds the lock and
        is done in a moment): taken in only when the lock is free at once; else, or where the lock cannot be
        taken at all (a read-only mount, another user's workspace), the records committed are the answer."""
        if not self._markers()[2]:
            return False
        try:
            with self.lock(timeout=0, settle=False):
                return self.finish_save() is not None
        except (BusyError, OSError):
            return False

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
            clean = check_metrics(metrics)
            check_int(step, "step")
            check_int(epoch, "epoch")
            from .background import host_copy, writer_for  # threads only for a background save

            what = f"task '{self.name}'" + (f", step {step}" if step is not None else "")
            return writer_for((self.ws.location, self.name)).save(
                what,
                lambda: obj if isinstance(obj, str | os.PathLike) else host_copy(obj),
                lambda data: self.save(data, step=step, epoch=epoch, metrics=clean, suffix=suffix),
            )
        if isinstance(obj, str | os.PathLike):
            return self.save_file(obj, step=step, epoch=epoch, metrics=metrics)
        clean = check_metrics(metrics)
        check_int(step, "step")
        check_int(epoch, "epoch")
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
        after_save(self, number)  # the retention policy, if any, in the background
        return number

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
        clean = check_metrics(metrics)
        check_int(step, "step")
        check_int(epoch, "epoch")

        def produce(w: fsutil.HashingWriter) -> None:
            with fsutil.open_regular_file(src) as f:  # a FIFO swapped in after is_file() is refused, not waited on
                shutil.copyfileobj(f, w, fsutil.CHUNK)  # type: ignore[misc]

        number = self._commit_new(produce, src.suffix or ".pt", step, epoch, clean, src.name)
        after_save(self, number)
        return number

    def _save_folder(self, src: Path, step: int | None, epoch: int | None, metrics: Mapping[str, float] | None) -> int:
        clean = check_metrics(metrics)
        check_int(step, "step")
        check_int(epoch, "epoch")
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

    def finish(self, *, failed: bool = False, title: str | None = None) -> Model | None:
        """Mark the task finished (or failed) and, unless failed, promote its latest checkpoint.

        Returns the model made (None when failed or when the task has no checkpoint). The model's
        title is `title`, else '<task>-<number>'; see models.finish for what happens when it is taken.
        """
        from .models import finish

        return finish(self.ws, self.name, failed=failed, title=title).model

    def wait(self) -> None:
        """Wait for this task's background save, if one is outstanding (raise its error if one failed), then
        for the retention policy this process runs after its saves (ckpt.policy)."""
        from .background import writer_for
        from .policy import wait

        writer_for((self.ws.location, self.name)).wait()
        wait(self)

    # -- the steps each store gives --

    @abstractmethod
    def state(self) -> TaskState: ...

    @abstractmethod
    def reload(self) -> TaskState: ...

    @abstractmethod
    def update(self, change: Callable[[TaskState], T]) -> T: ...

    @abstractmethod
    def lock(self, timeout: float | None = None, *, settle: bool = True) -> contextlib.AbstractContextManager[None]:
        """Hold the task's lock for a change (a folder's flock; nothing in a bucket, whose commits are conditional)."""

    @abstractmethod
    def refresh_cache(self) -> None: ...

    @abstractmethod
    def summary(self) -> TaskSummary: ...

    @abstractmethod
    def unknown_files(self) -> tuple[list[Unknown], list[Unknown]]: ...

    @abstractmethod
    def adopt(self, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]: ...

    @abstractmethod
    def leftovers(self, *, dry_run: bool) -> tuple[list[Repair], set[str]]: ...

    @abstractmethod
    def local_path(self, cp: Checkpoint) -> Path: ...

    @abstractmethod
    def linked(self, cps: list[Checkpoint]) -> list[tuple[Checkpoint, str]]: ...

    @abstractmethod
    def keep_rows(
        self,
        form: str,
        cps: list[Checkpoint],
        starts: list[int],
        text: bytes,
        linked: list[tuple[Checkpoint, str]],
    ) -> None: ...

    @abstractmethod
    def rows_before_appends(self, form: str) -> CachedRows | None: ...

    @abstractmethod
    def cached_rows(self, form: str) -> CachedRows | None: ...

    @abstractmethod
    def discard_if_empty(self) -> bool: ...

    @abstractmethod
    def pending_markers(self) -> list[Path]: ...

    @abstractmethod
    def _markers(self) -> tuple[list[Path], list[Path], list[Path]]: ...

    @abstractmethod
    def finish_save(self, *, dry_run: bool = False) -> Repair | None:
        """Record the file of a save a kill stopped between its rename and its record, from what it left
        (caller holds the lock); what it did, None when there was nothing to do."""

    @abstractmethod
    def recover_imports(self, *, dry_run: bool = False) -> list[Repair]: ...

    @abstractmethod
    def _commit_new(
        self,
        produce: Callable[[fsutil.HashingWriter], None],
        ext: str,
        step: int | None,
        epoch: int | None,
        metrics: dict[str, float],
        original_name: str | None,
    ) -> int: ...

    @abstractmethod
    def add_existing(self, items: list[Incoming], *, mode: str = "link", unique: bool = False) -> list[Checkpoint]: ...

    @abstractmethod
    def set_status_locked(self, status: str) -> TaskHeader: ...

    @abstractmethod
    def note_import(self, metric_modes: dict[str, str], source: dict[str, str] | None) -> None: ...

    @abstractmethod
    def set_policy(self, policy: dict[str, Any] | None) -> None: ...

    @abstractmethod
    def forget_read(self) -> None: ...


def after_save(task: Task, number: int) -> None:
    from .policy import after_save  # here: `import ckpt` need not pay for it; a lookup in sys.modules after

    after_save(task, number)


def check_int(value: object, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{what} must be an integer, got {value!r}")


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
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
