"""Models: checkpoints promoted under a title, stored as `models/<title>/` with a `model.toml`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil, hashing, locks, placing
from .errors import (
    CheckpointNotFound,
    CkptError,
    ConflictError,
    IntegrityError,
    ManifestError,
    ModelNotFound,
    UsageError,
)
from .manifest import FORMAT, Checkpoint, check_format, dumps, read_toml
from .metrics import Direction, rank, require
from .model_sources import MODEL_FILE, MODELS_CACHE_FILE, Source, by_checkpoint, folder_sources
from .names import case_twin, check_task_name, check_title, is_valid_name
from .timeutil import now_iso

if TYPE_CHECKING:
    from .task_base import Task
    from .workspace_base import Workspace

CREATE_LOCK_FILE = ".create.lock"  # in models/: serialises making a title (the case check and the rename)
STORAGES = ("hardlink", "reflink", "copy")


@dataclass(slots=True)
class Model:
    """A checkpoint promoted under a title. The folder name is the title."""

    title: str
    task: str
    checkpoint: int
    file: str  # the weights file inside the model folder
    sha256: str
    size: int
    created: str
    storage: str
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    folder: Path = Path()

    @property
    def path(self) -> Path:
        """The model's weights file."""
        return self.folder / self.file

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.task,
            "checkpoint": self.checkpoint,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
            "storage": self.storage,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_doc(cls, title: str, doc: dict[str, Any], folder: Path) -> Model:
        path = folder / MODEL_FILE
        check_format(doc, path)

        def get(key: str, typ: type | tuple[type, ...], required: bool = True) -> Any:
            v = doc.get(key)
            if v is None:
                if required:
                    raise ManifestError(f"{path}: missing '{key}'", path=path)
                return None
            if isinstance(v, bool) or not isinstance(v, typ):
                raise ManifestError(f"{path}: '{key}' has the wrong type ({type(v).__name__})", path=path)
            return v

        file = get("file", str)
        if "/" in file or "\\" in file or file in ("", ".", "..") or file == MODEL_FILE:
            raise ManifestError(f"{path}: 'file' must name a file inside the model folder", path=path)
        task = get("task", str)
        if not is_valid_name(task):
            raise ManifestError(f"{path}: 'task' ({task[:60]!r}) is not a valid task name", path=path)
        checkpoint = get("checkpoint", int)
        if checkpoint < 1:
            raise ManifestError(f"{path}: 'checkpoint' must be at least 1", path=path)
        storage = get("storage", str)
        if storage not in STORAGES:
            raise ManifestError(f"{path}: unknown storage {storage!r}", path=path)
        metrics = get("metrics", dict, required=False) or {}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ManifestError(f"{path}: metric '{k}' is not a number", path=path)
        return cls(
            title=title,
            task=task,
            checkpoint=checkpoint,
            file=file,
            sha256=get("sha256", str),
            size=get("size", int),
            created=get("created", str),
            storage=storage,
            step=get("step", int, required=False),
            epoch=get("epoch", int, required=False),
            metrics=dict(metrics),
            folder=folder,
        )

    def load_state_dict(self, *, unsafe: bool = False) -> dict[str, Any]:
        """The model's weights as a state dict, loaded safely (see ckpt.loading.load_state_dict)."""
        from .loading import load_state_dict

        return load_state_dict(self.path, unsafe=unsafe)


class ModelIndex:
    """Every model of a workspace: iterate, `len()`, `in`, and `index[title]`."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def titles(self) -> list[str]:
        try:
            entries = list(os.scandir(self.ws.models_dir))
        except FileNotFoundError:
            return []
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".")
            and e.is_dir(follow_symlinks=False)
            and os.path.exists(os.path.join(e.path, MODEL_FILE))
        )

    def names(self) -> list[str]:
        """Every name under models/, whether or not it holds a model yet: what a new title must not twin."""
        try:
            return os.listdir(self.ws.models_dir)
        except FileNotFoundError:
            return []

    def __getitem__(self, title: str) -> Model:
        check_title(title)
        folder = self.ws.models_dir / title
        fsutil.refuse_links(self.ws.root, f"models/{title}/{MODEL_FILE}")  # models/, the folder, its manifest
        if not (folder / MODEL_FILE).is_file():
            raise ModelNotFound(f"model '{title}' does not exist", hint="see: ckpt models")
        return Model.from_doc(title, read_toml(folder / MODEL_FILE, "model"), folder)

    def __contains__(self, title: object) -> bool:
        return isinstance(title, str) and title in self.titles()

    def __iter__(self) -> Iterator[Model]:
        for title in self.titles():
            yield self[title]

    def __len__(self) -> int:
        return len(self.titles())

    def read_all(self) -> tuple[list[Model], list[CkptError]]:
        """Every readable model, and the errors of the ones that could not be read."""
        models: list[Model] = []
        errors: list[CkptError] = []
        for title in self.titles():
            try:
                models.append(self[title])
            except CkptError as e:
                errors.append(e)
        try:
            with os.scandir(self.ws.models_dir) as it:
                links = sorted(e.name for e in it if not e.name.startswith(".") and e.is_symlink())
        except FileNotFoundError:
            links = []
        for title in links:  # reported, never followed
            try:
                fsutil.refuse_links(self.ws.root, f"models/{title}")
            except CkptError as e:
                errors.append(e)
        return models, errors

    def sources(self) -> dict[str, Source]:
        """(task, checkpoint) of every model (None for one that cannot be read), from model_sources' cache:
        as reading every model.toml would give, but reading only those changed since the last call."""
        return folder_sources(self.ws.models_dir, self.ws.tasks_dir / MODELS_CACHE_FILE, self._source)

    def _source(self, title: str) -> tuple[str, int]:
        m = self[title]
        return m.task, m.checkpoint


def models_by_checkpoint(ws: Workspace, task: str) -> dict[int, list[str]]:
    """Titles of the models made from each checkpoint of `task` (unreadable models are skipped)."""
    return by_checkpoint(ws.models.sources(), task)


@dataclass(slots=True)
class PromoteResult:
    model: Model
    chosen_by: str  # "checkpoint 7", or why --best chose it and which way is better
    direction: Direction | None = None  # with --best: which way the metric is better, and why
    unchanged: bool = False  # the title already was this checkpoint's model: nothing was made


def choose_best(cps: list[Checkpoint], metric: str, better: Direction, task_name: str = "") -> Checkpoint:
    """The checkpoint with the best value of `metric` in direction `better` (ties: the earlier checkpoint).

    NaN and missing values never win (ckpt.metrics.rank). Raises CheckpointNotFound when there is no
    checkpoint at all, UsageError when none records `metric`.
    """
    if not cps:
        raise CheckpointNotFound(f"task '{task_name}' has no checkpoints yet; there is nothing to promote")
    require(cps, metric, task_name)
    ranked, _ = rank(cps, metric, better.minimize, metrics_of=lambda cp: cp.metrics, tie=lambda cp: cp.number)
    return ranked[0]


def pick_checkpoint(
    task: Task, number: int | None, best: str | None, flag: str | None
) -> tuple[Checkpoint, str, Direction | None]:
    """The checkpoint `promote` makes a model of: `number`, or the best by metric `best`; why; the direction.

    Raises UsageError (neither or both, unknown direction), CheckpointNotFound.
    """
    if (number is None) == (best is None):
        raise UsageError("give a checkpoint number or --best METRIC (one of them)")
    if best is None:
        assert number is not None
        cp = task.checkpoint(number)
        return cp, f"checkpoint {cp.number}", None
    cps = task.checkpoints
    if cps:
        require(cps, best, task.name)  # before the direction: a misspelt metric is named as such
    better = task.direction(best, flag)
    cp = choose_best(cps, best, better, task.name)
    why = f"checkpoint {cp.number} has the {better.extreme} {best} ({cp.metrics[best]:g}); {better.explain()}"
    return cp, why, better


def already_made(ws: Workspace, title: str, task: str, cp: Checkpoint) -> Model | None:
    """The model `title` when it already is checkpoint `cp` of `task` (promote again: nothing to do), None
    when there is no such model. Raises ConflictError when the title is another checkpoint's model."""
    try:
        model = ws.models[title]
    except ModelNotFound:
        return None
    except CkptError:  # unreadable (half-made, damaged): taken all the same
        model = None
    if model is not None and model.task == task and model.checkpoint == cp.number:
        return model
    what = f" (checkpoint {model.checkpoint} of task '{model.task}')" if model is not None else ""
    raise ConflictError(
        f"model '{title}' already exists{what}", hint="choose another --title, or see: ckpt models show " + title
    )


def promote_title(task: str, cp: Checkpoint, title: str | None) -> str:
    """`title`, or `TASK-N` when none is given (as `finish` names its model); checked as a title."""
    if title is not None:
        return check_title(title)
    default = f"{task}-{cp.number}"
    if len(default) > 100:
        raise UsageError(
            f"the default title '{task[:20]}…-{cp.number}' is longer than 100 characters", hint="pass --title"
        )
    return check_title(default)


@dataclass(slots=True)
class Choice:
    """What a promote takes: the checkpoint and why, the title, and the model that already is it (or None)."""

    cp: Checkpoint
    why: str
    better: Direction | None
    title: str
    same: Model | None

    def unchanged(self) -> PromoteResult:
        assert self.same is not None
        return PromoteResult(self.same, self.why, self.better, unchanged=True)


def choose(
    ws: Workspace, task: Task, number: int | None, best: str | None, flag: str | None, title: str | None
) -> Choice:
    """The one decision of promote (its folder and bucket versions and its dry run): the checkpoint, the
    title (`TASK-N` by default), and whether that title already is its model. Raises as pick_checkpoint,
    promote_title and already_made do."""
    cp, why, better = pick_checkpoint(task, number, best, flag)
    title = promote_title(task.name, cp, title)
    return Choice(cp, why, better, title, already_made(ws, title, task.name, cp))


def promote(
    ws: Workspace,
    task_name: str,
    number: int | None,
    *,
    title: str | None = None,
    best: str | None = None,
    mode: str | None = None,
    minimize: bool = False,
    copy: bool = False,
) -> PromoteResult:
    """Make model `title` (default `TASK-N`) from checkpoint `number` of `task_name`, or from the best by
    metric `best` (its direction: `mode` "min"/"max", `minimize`, else as ckpt.metrics decides).

    Promoting the same checkpoint again under its title changes nothing (`unchanged`). Raises UsageError
    (bad title, neither or both of number and best, unknown direction), NotFoundError (task, checkpoint),
    ConflictError (title taken by another checkpoint), IntegrityError (file missing or changed).
    One sequence for every store: the store makes the model (`ws.make_model`) so that it appears whole or
    not at all, and the task's `lock()` is its lock on a folder and nothing in a bucket, whose commits
    are conditional.
    """
    if title is not None:
        check_title(title)
    check_task_name(task_name)
    flag = "min" if minimize else mode
    task = ws.task(task_name)
    if title is not None:
        check_case_twin(ws, title)  # before the lock: a refused title touches nothing (the store checks again)
    # under the task lock, so a concurrent trash-unused sees this model before it decides
    with task.lock():
        c = choose(ws, task, number, best, flag, title)
        if c.same is not None:
            return c.unchanged()
        try:
            model = ws.make_model(task, c.cp, c.title, copy)
        except ConflictError:  # a racer made the title meanwhile: the same model is no conflict
            c.same = already_made(ws, c.title, task.name, c.cp)
            if c.same is None:
                raise
            return c.unchanged()
    return PromoteResult(model, c.why, c.better)


def make_folder_model(ws: Workspace, task: Task, cp: Checkpoint, title: str, copy: bool) -> Model:
    """The model `title` of checkpoint `cp`, made in a staging folder and renamed into place in one step that
    never replaces (a folder's `Workspace.make_model`); ConflictError when the title exists."""
    check_case_twin(ws, title)
    src = task.path_of(cp)
    if fsutil.symlink_on_path(task.folder, cp.file) is not None:
        raise IntegrityError(
            f"checkpoint {cp.number} of task '{task.name}' is a symlink; ckpt does not promote through links",
            path=src,
        )
    if not (src.is_file() or src.is_dir()):
        raise IntegrityError(
            f"checkpoint {cp.number} of task '{task.name}' is missing its file {ws.rel(src)}",
            path=src,
            hint="run: ckpt doctor",
        )
    fsutil.refuse_links(ws.root, "models")
    staging = ws.models_dir / f".staging-{title}-{os.urandom(4).hex()}"
    staging.mkdir()
    try:
        dst = staging / Path(cp.file).name
        storage = _store(src, dst, cp, copy)
        model = Model(
            title=title,
            task=task.name,
            checkpoint=cp.number,
            file=dst.name,
            sha256=cp.sha256,
            size=cp.size,
            created=now_iso(),
            storage=storage,
            step=cp.step,
            epoch=cp.epoch,
            metrics=dict(cp.metrics),
            folder=ws.models_dir / title,
        )
        fsutil.atomic_write(staging / MODEL_FILE, dumps(model.to_doc()))
        # the finished folder appears under its title in one rename that never replaces: one of two racers wins;
        # the case check is made again inside the lock that makes titles, so that `Sa1` and `sA1` cannot both win
        with title_claim(ws, title):
            try:
                fsutil.move_noreplace(staging, ws.models_dir / title)
            except ConflictError:
                raise ConflictError(f"model '{title}' already exists", hint="choose another --title") from None
            fsutil.fsync_dir(ws.models_dir)
        return model
    finally:
        if staging.exists():
            fsutil.remove_tree(staging)


def _store(src: Path, dst: Path, cp: Checkpoint, copy: bool) -> str:
    """Put the checkpoint's bytes at `dst`: a hard link, else a reflink, else a verified copy."""
    if src.is_dir():
        return _store_tree(src, dst, cp, copy)
    if not copy:
        # ckpt's checkpoint files are immutable once written, so sharing their inode with a model is safe
        try:
            placing.link_new(src, dst)
            return "hardlink"
        except OSError:
            pass
        if placing.reflink_new(src, dst):
            return "reflink"
    digest = placing.copy_new(src, dst)
    if digest != cp.sha256:
        fsutil.remove_file(dst)
        raise IntegrityError(
            f"checkpoint {cp.number} of task '{cp.task}' does not match its recorded sha256",
            path=src,
            hint=f"run: ckpt verify {cp.task}",
        )
    return "copy"


def _store_tree(src: Path, dst: Path, cp: Checkpoint, copy: bool) -> str:
    """A directory checkpoint (a Hugging Face folder): linked file by file, else copied and verified."""
    storage = placing.place_tree_new(src, dst, "copy" if copy else "link")
    if storage == "copy":
        files = fsutil.tree_files(dst)
        digests = hashing.sha256_many([dst / rel for rel, _ in files])
        pairs = [(rel, d) for (rel, _), d in zip(files, digests, strict=True) if isinstance(d, str)]
        if len(pairs) != len(files) or hashing.tree_digest(pairs) != cp.sha256:
            fsutil.remove_tree(dst)
            raise IntegrityError(
                f"checkpoint {cp.number} of task '{cp.task}' does not match its recorded sha256",
                path=src,
                hint=f"run: ckpt verify {cp.task}",
            )
    return storage


@dataclass(slots=True)
class FinishResult:
    task: str
    status: str
    model: Model | None
    note: str


def finish_title(task: str, number: int) -> str:
    suffix = f"-{number}"
    return task[: 100 - len(suffix)] + suffix


def finish(ws: Workspace, task_name: str, *, failed: bool = False, title: str | None = None) -> FinishResult:
    """Mark `task_name` finished and promote its latest checkpoint (or mark it failed, promoting nothing).

    The model's title is `title`, else '<task>-<number>'. When that title is taken by a model of the
    same checkpoint nothing new is made; when taken by another, '-2', '-3'... is appended.
    """
    if title is not None:
        check_title(title)
    task = ws.task(task_name)
    task.wait()  # this process's background saves of the task are committed first (their errors raised)
    model: Model | None = None
    note = "no checkpoint to promote"
    with task.lock():  # the task's lock on a folder; nothing in a bucket (its commit is conditional)
        if failed:
            task.set_status_locked("failed")
            return FinishResult(task.name, "failed", None, "marked failed; nothing promoted")
        cp = task.latest()
        if cp is not None:
            base = title or finish_title(task.name, cp.number)
            candidate = base
            for i in range(2, 1000):
                existing = _existing(ws, candidate)
                if existing is None:
                    try:
                        # promote first, mark finished last: after a crash between, finish again completes it
                        model = ws.make_model(task, cp, candidate, False)
                        note = f"promoted checkpoint {cp.number} as '{candidate}'"
                        break
                    except ConflictError:  # a racer took the title meanwhile (or holds its claim)
                        existing = _existing(ws, candidate)
                if existing is not None and existing.task == task.name and existing.checkpoint == cp.number:
                    model = existing
                    note = f"checkpoint {cp.number} is already model '{candidate}'"
                    break
                candidate = f"{base[: 100 - len(str(i)) - 1]}-{i}"
        task.set_status_locked("finished")
    return FinishResult(task.name, "finished", model, note)


@contextlib.contextmanager
def title_claim(ws: Workspace, title: str, renaming: str | None = None) -> Iterator[None]:
    """Hold models/.create.lock (one new title at a time in the workspace) with `title` checked against the others
    in it: ConflictError when it differs from one (not `renaming`) only in case. Make the title's folder inside."""
    fsutil.refuse_links(ws.root, "models")
    with locks.locked(ws.models_dir / CREATE_LOCK_FILE, "making a model title"):
        check_case_twin(ws, title, renaming)
        yield


def check_case_twin(ws: Workspace, title: str, renaming: str | None = None) -> None:
    """Refuse a new title that differs from an existing model's only in case (one folder on macOS, Windows)."""
    twin = case_twin(title, (t for t in ws.models.names() if t != renaming))
    if twin is not None:
        raise ConflictError(
            f"model title '{title}' differs from model '{twin}' only in case",
            hint="titles must stay distinct on case-insensitive file systems; choose another title",
        )


def _existing(ws: Workspace, title: str) -> Model | None:
    """The model `title`, None when the title is free, or a blank model when it is taken otherwise (a title
    differing only in case, a model that cannot be read)."""
    try:
        return ws.models[title]
    except ModelNotFound:
        try:
            check_case_twin(ws, title)
        except ConflictError:
            return Model(title, "", 0, "", "", 0, "", "copy")  # a title differing only in case: taken
        return None
    except CkptError:
        return Model(title, "", 0, "", "", 0, "", "copy")  # unreadable: treat the title as taken


def rename(ws: Workspace, old: str, new: str) -> Model:
    """Rename model `old` to `new`; its source checkpoint is untouched. Raises ModelNotFound, ConflictError."""
    check_title(old)
    check_title(new)
    model = ws.models[old]
    check_case_twin(ws, new, renaming=old)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(CkptError):
            # the source task's lock keeps trash-unused from deciding while the model has no folder name
            stack.enter_context(ws.task(model.task).lock())
        return ws.move_model(model, new)


def add_folder_model(ws: Workspace, task_name: str, number: int, title: str, staged: Path, doc: bytes) -> None:
    """A folder's `Workspace.add_model`: `staged` (a folder under models/ holding the weights) gets `doc` as its
    model.toml and is renamed to `models/<title>` in one step that never replaces, under the task's lock
    while checkpoint `number` is still in the task."""
    fsutil.atomic_write(staged / MODEL_FILE, doc)
    task = ws.task(task_name)
    with task.lock():
        task.checkpoint(number)  # raises CheckpointNotFound when it went to the trash meanwhile
        with title_claim(ws, title):
            try:
                fsutil.move_noreplace(staged, ws.models_dir / title)
            except ConflictError:
                raise ConflictError(f"model '{title}' already exists", hint="choose another title") from None
            fsutil.fsync_dir(ws.models_dir)


def move_folder_model(ws: Workspace, model: Model, new: str) -> Model:
    """A folder's `Workspace.move_model`: one rename that never replaces, under the lock that makes titles."""
    old = model.title
    fsutil.refuse_links(ws.root, f"models/{old}")
    with title_claim(ws, new, renaming=old):  # the case check again, inside the lock
        try:
            fsutil.move_noreplace(ws.models_dir / old, ws.models_dir / new)
        except ConflictError:
            raise ConflictError(f"model '{new}' already exists", hint="choose another title") from None
        except FileNotFoundError:
            raise ModelNotFound(f"model '{old}' does not exist", hint="see: ckpt models") from None
        fsutil.fsync_dir(ws.models_dir)
    return ws.models[new]
