"""The trash bin: trash-unused, models remove, trash list / restore / empty, du, and crash recovery.

A trash entry is a folder `trash/<id>/` with an `entry.toml` (format in docs/trash.md) and the moved
files: a task's checkpoint files under `files/<path in the task folder>`, or a model's whole folder
as `model/`. Every move is a rename inside the workspace; only `empty` deletes bytes.

Destructive work is planned first (a plan changes nothing; `--dry-run` renders it), then the same
plan is executed in an order that a crash at any point leaves recoverable:

1. the marker `tasks/<task>/.pending-<id>` (the next lock of the task recovers what follows),
2. `entry.toml` in state "pending", with the checkpoint records in full, before anything moves (the
   entry's new folders each fsynced into their parent first),
3. the files, by rename,
4. the task manifest, rewritten without their records,
5. the entry marked "complete", then the marker removed.

Recovery (`recover_task`, run by `Task.lock`, and `recover_workspace`, run by `ckpt doctor`) undoes
a trash that stopped before step 4 (the files go back) and finishes one that got past it. A restore
(state "restoring") is always finished: its conflicts were checked before anything moved.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .backend import per_backend
from .errors import CkptError, ConflictError, IntegrityError, ManifestError, NotFoundError, UsageError
from .layout import LOCK_FILE as TASK_LOCK
from .layout import PENDING_PREFIX
from .manifest import FORMAT, Checkpoint, TaskState, check_files, check_format, dumps, read_toml
from .metrics import Direction, rank, require
from .names import describe, is_valid_name
from .timeutil import now_iso, parse_iso
from .timeutil import parse_age as parse_age  # where `ckpt trash empty --older-than` finds it

if TYPE_CHECKING:
    from .trash_results import DiskUse, EmptyPlan, EmptyResult, Held, ModelTrashResult, Repair, RestoreResult
    from .workspace import Task, Workspace

ENTRY_FILE = "entry.toml"
FILES_DIR = "files"
MODEL_DIR = "model"
LOCK_FILE = ".lock"
DELETING_PREFIX = ".deleting-"
STAGING_PREFIX = ".staging-"
KINDS = ("checkpoints", "model")
STATES = ("pending", "complete", "restoring", "emptying")  # "emptying": object storage only (docs/s3.md)
STALE_AFTER = 3600.0  # seconds before doctor treats a temp file or staging folder as abandoned
ENTRY_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")


_RESULTS = ("DiskUse", "EmptyPlan", "EmptyResult", "ModelTrashResult", "Repair", "RestoreResult")


def __getattr__(name: str) -> Any:
    """The result types that live in `ckpt.trash_results`, imported the first time one is asked for here."""
    if name in _RESULTS:
        from . import trash_results

        return getattr(trash_results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- entries ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One trash entry, as its `entry.toml` says."""

    id: str
    kind: str  # "checkpoints" or "model"
    task: str | None
    state: str  # "pending", "complete" or "restoring"
    created: str
    reason: str
    size: int  # the moved files' sizes
    bytes: int  # bytes that emptying would free, as counted when it was made
    checkpoints: list[Checkpoint] = field(default_factory=list)
    model: dict[str, Any] | None = None
    folder: Path = Path()
    # object storage: the task manifest names this entry (its `trashing`) from the commit that dropped its
    # records until the entry is complete; an entry made before that protocol is not tracked
    tracked: bool = False

    @property
    def numbers(self) -> list[int]:
        return [cp.number for cp in self.checkpoints]

    @property
    def title(self) -> str | None:
        return None if self.model is None else str(self.model.get("title"))

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "task": self.task,
            "created": self.created,
            "reason": self.reason,
            "size": self.size,
            "bytes": self.bytes,
        }
        if self.model is not None:
            doc["model"] = dict(self.model)
        if self.tracked:
            doc["tracked"] = True
        if self.checkpoints:
            doc["checkpoints"] = [cp.to_record() for cp in self.checkpoints]
        return doc


def entry_from_doc(doc: dict[str, Any], folder: Path) -> Entry:
    path = folder / ENTRY_FILE
    check_format(doc, path)

    def get(key: str, typ: type | tuple[type, ...], required: bool = True) -> Any:
        v = doc.get(key)
        if v is None and not required:
            return None
        if v is None or isinstance(v, bool) or not isinstance(v, typ):
            raise ManifestError(f"{path}: '{key}' is missing or has the wrong type", path=path)
        return v

    kind = get("kind", str)
    state = get("state", str)
    if kind not in KINDS or state not in STATES:
        raise ManifestError(f"{path}: unknown kind {kind!r} or state {state!r}", path=path)
    task = get("task", str, required=(kind == "checkpoints"))
    # every name read here becomes a path (the task folder, the model's title): checked as if typed
    if task is not None and not is_valid_name(task):
        raise ManifestError(f"{path}: 'task' ({describe(task)}) is not a valid task name", path=path)
    entry_id = get("id", str)
    if entry_id != folder.name:
        raise ManifestError(f"{path}: 'id' ({describe(entry_id)}) is not its folder's name", path=path)
    records = get("checkpoints", list, required=False) or []
    try:
        cps = [Checkpoint.from_record(rec, path, task or "") for rec in records]
        numbers = [cp.number for cp in cps]
        if len(set(numbers)) != len(numbers):
            raise ManifestError(f"{path}: a checkpoint is recorded twice", path=path)
        check_files(cps, path)
    except ManifestError as e:
        # not a task manifest's hint (doctor mends those): an entry is fixed or emptied by hand
        e.hint = f"nothing is restored from it; its files are in trash/{folder.name}/{FILES_DIR}/; see: ckpt trash list"
        raise
    model = get("model", dict, required=(kind == "model"))
    if model is not None and not isinstance(model.get("title"), str):
        raise ManifestError(f"{path}: model has no title", path=path)
    if model is not None and not is_valid_name(model["title"]):
        raise ManifestError(f"{path}: model: 'title' ({describe(model['title'])}) is not a valid title", path=path)
    return Entry(
        id=entry_id,
        kind=kind,
        task=task,
        state=state,
        created=get("created", str),
        reason=get("reason", str, required=False) or "",
        size=get("size", int, required=False) or 0,
        bytes=get("bytes", int, required=False) or 0,
        checkpoints=cps,
        model=model,
        folder=folder,
        tracked=doc.get("tracked") is True,
    )


def check_entry_id(entry_id: str) -> str:
    if not ENTRY_ID.fullmatch(entry_id):
        raise UsageError(
            f"invalid trash entry id {describe(entry_id)}",
            hint="ids look like 20250101-120000-a1b2c3; see: ckpt trash list",
        )
    return entry_id


def read_entry(ws: Workspace, entry_id: str) -> Entry:
    """The trash entry `entry_id`; raises NotFoundError, ManifestError."""
    check_entry_id(entry_id)
    folder = ws.trash_dir / entry_id
    if fsutil.is_symlink(folder):
        raise IntegrityError(f"trash entry '{entry_id}' is a symlink; ckpt does not follow it", path=folder)
    fsutil.refuse_links(ws.root, f"trash/{entry_id}/{ENTRY_FILE}")
    if not (folder / ENTRY_FILE).is_file():
        raise NotFoundError(f"trash entry '{entry_id}' does not exist", hint="see: ckpt trash list")
    return entry_from_doc(read_toml(folder / ENTRY_FILE, "trash entry"), folder)


def _entry_or_none(ws: Workspace, entry_id: str) -> Entry | None:
    try:
        return read_entry(ws, entry_id)
    except NotFoundError:
        return None


def entry_ids(ws: Workspace) -> tuple[list[str], list[CkptError]]:
    """Ids of the folders in the trash that hold an entry, oldest first, and an error for each entry that is
    a symlink (reported, never followed: emptying removes the link only, restoring refuses it): a folder's
    `Workspace.trash_entry_ids`."""
    try:
        with os.scandir(ws.trash_dir) as it:
            found = [
                (e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in it if ENTRY_ID.fullmatch(e.name)
            ]
    except FileNotFoundError:
        return [], []
    ids = sorted(n for n, _, d in found if d and os.path.isfile(os.path.join(ws.trash_dir, n, ENTRY_FILE)))
    links: list[CkptError] = [
        IntegrityError(
            f"trash entry '{name}' is a symlink; ckpt does not follow it",
            path=ws.trash_dir / name / ENTRY_FILE,
            hint=f"remove the link {ws.rel(ws.trash_dir / name)} by hand",
        )
        for name in sorted(n for n, link, _ in found if link)
    ]
    return ids, links


def list_entries(ws: Workspace) -> tuple[list[Entry], list[CkptError]]:
    """Every readable trash entry (oldest first), and the errors of those that could not be read. One listing
    for every store: `ws.trash_entry_ids` names them (with the errors of entries it will not read), and
    `ws.trash_entry` reads each as it stands (a bucket settles a pending one: finished or undone)."""
    ids, errors = ws.trash_entry_ids()
    entries: list[Entry] = []
    for entry_id in ids:
        try:
            entry = ws.trash_entry(entry_id)
        except NotFoundError:
            continue  # emptied or restored meanwhile (in a bucket: copies without their record)
        except CkptError as e:
            errors.append(e)
            continue
        if entry.state != "gone":
            entries.append(entry)
    # oldest first by the time recorded (to the microsecond): ids name the second only, then a random suffix
    entries.sort(key=lambda e: (_created_key(e.created), e.id))
    return entries, errors


def _created_key(created: str) -> float:
    try:
        return parse_iso(created).timestamp()
    except (ValueError, OverflowError):
        return float("inf")  # unreadable: after the others


def _new_entry(ws: Workspace) -> tuple[str, Path]:
    """A fresh entry id and its (new, empty) folder."""
    _check_trash_dir(ws)
    for _ in range(100):
        entry_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        try:
            fsutil.make_dir_new(ws.trash_dir / entry_id)
            fsutil.fsync_dir(ws.trash_dir)  # the entry's folder is on disk before its record or any file goes in
            return entry_id, ws.trash_dir / entry_id
        except ConflictError:
            continue
    raise CkptError("could not make a new trash entry folder", path=ws.trash_dir)  # pragma: no cover


def _check_trash_dir(ws: Workspace) -> None:
    fsutil.refuse_links(ws.root, "trash")
    if not ws.trash_dir.is_dir():
        raise IntegrityError(
            f"'{ws.rel(ws.trash_dir)}' is not a plain folder (a symlink?); ckpt moves nothing through links",
            path=ws.trash_dir,
        )


def _write_entry(entry: Entry) -> None:
    fsutil.atomic_write(entry.folder / ENTRY_FILE, dumps(entry.to_doc()))


def _drop_entry(entry_folder: Path) -> None:
    """Remove an entry whose files have all moved out: entry.toml, temp files, empty folders. Never a moved file."""
    fsutil.remove_file(entry_folder / ENTRY_FILE)
    for path, st in fsutil.lstat_tree(entry_folder):
        if stat.S_ISREG(st.st_mode) and _is_temp(path.name):
            fsutil.remove_file(path)
    fsutil.remove_empty_dirs(entry_folder)
    fsutil.fsync_dir(entry_folder.parent)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def _trash_lock(ws: Workspace) -> Iterator[None]:
    fsutil.refuse_links(ws.root, "trash")
    with fsutil.locked(ws.trash_dir / LOCK_FILE, "the trash"):
        yield


# --- trash-unused: plan, then execute -------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class KeepRules:
    """What protects a checkpoint beyond models and the latest: the last N, the best N by a metric."""

    keep_last: int = 0
    keep_best: int = 0
    metric: str | None = None
    mode: str | None = None  # "min" / "max" from --min / --max; None: the direction ckpt.metrics finds
    # a retention policy's rules too (ckpt.policy): the first checkpoint at or after each multiple of
    # `keep_every` steps, and the latest of each `keep_interval` seconds counted from the task's creation
    keep_every: int = 0
    keep_interval: int = 0
    mode_from: str = ""  # where `mode` came from when not a flag: "the task's policy", "the workspace's policy"
    protect: frozenset[int] = frozenset()  # kept whatever the rules say: the checkpoints a training loop just saved

    def check(self) -> None:
        if self.keep_last < 0 or self.keep_best < 0 or self.keep_every < 0 or self.keep_interval < 0:
            raise UsageError("--keep-last, --keep-best, --keep-every and --keep-interval take 0 or more")
        if self.keep_best and not self.metric:
            raise UsageError("--keep-best needs --metric", hint="e.g. --keep-best 3 --metric val_iou")
        if self.metric and not self.keep_best:
            raise UsageError("--metric goes with --keep-best N", hint=f"e.g. --keep-best 3 --metric {self.metric}")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs three times as much, once per checkpoint
class Decision:
    """What the plan does with one checkpoint, and why."""

    number: int
    action: str  # "keep" or "trash"
    reason: str
    size: int


@dataclass(slots=True)
class TrashPlan:
    """What `trash-unused` will do; building it changes nothing. `execute()` (under the task lock) does it."""

    task: Task
    decisions: list[Decision]
    checkpoints: list[Checkpoint]  # the ones to trash, by number
    bytes_freed_on_empty: int
    reason: str
    warnings: list[str] = field(default_factory=list)
    direction: Direction | None = None  # --keep-best's metric: which way is better, and why
    held: Held | None = None  # bytes that stay on disk after emptying because other links hold them

    @property
    def trashed(self) -> list[int]:
        return [cp.number for cp in self.checkpoints]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]

    def execute(self) -> str | None:
        """Move the planned checkpoints to a new trash entry and return its id (None when there are none).

        The caller holds the task lock and built the plan under it.
        """
        if not self.checkpoints:
            return None
        task = self.task
        ws = task.ws
        entry_id, folder = _new_entry(ws)
        marker = task.folder / f"{PENDING_PREFIX}{entry_id}"
        entry = Entry(
            id=entry_id,
            kind="checkpoints",
            task=task.name,
            state="pending",
            created=now_iso(),
            reason=self.reason,
            size=sum(cp.size for cp in self.checkpoints),
            bytes=self.bytes_freed_on_empty,
            checkpoints=list(self.checkpoints),
            folder=folder,
        )
        try:
            # 1. the marker first: from here on the next lock of this task finishes or undoes what follows
            fsutil.make_file_new(marker, entry_id.encode())  # only its name counts: its bytes need no fsync
            fsutil.fsync_dir(task.folder)  # the marker is on disk before anything moves
            # 2. the entry record before anything moves: it names every file that may be in the trash
            data = _entry_bytes(entry)
            # the folders the files go to, each durable in its parent before anything moves into it
            files = folder / FILES_DIR
            for parent in sorted({cp.file.rpartition("/")[0] for cp in self.checkpoints}):
                fsutil.make_dirs_durably(files / parent)
            # atomic_write fsyncs the record, then its folder: the whole record is on disk before the first rename
            fsutil.atomic_write(folder / ENTRY_FILE, data)
            # 3. the files, by rename (never a copy), through their folders opened once
            odd: set[str] = set()
            plain = [cp.file for cp in self.checkpoints if _plain_name(cp.file)]
            with fsutil.Mover(task.folder, files) as mover:
                mover.move_all(plain)
                for cp in self.checkpoints if len(plain) < len(self.checkpoints) else ():
                    name = cp.file
                    if _plain_name(name):
                        continue
                    parent = os.path.dirname(name)  # a name pathlib rewrites: moved by its Path, as planned
                    if parent not in odd:
                        fsutil.make_dirs((files / name).parent)
                        odd.add(parent)
                    fsutil.move_noreplace(task.folder / name, files / name)
                # the renames are on disk (both sides) before the manifest drops the records
                mover.sync()
            for parent in odd:
                fsutil.fsync_dir(task.folder / parent)
                fsutil.fsync_dir(files / parent)
            # 4. the manifest last: before this a crash is undone (files go back), after it finished
            state = task.state()
            gone = set(self.trashed)
            kept = {n: cp for n, cp in state.checkpoints.items() if n not in gone}
            # atomic_write fsyncs the manifest and the task folder: it is on disk before the entry says complete
            task._rewrite(TaskState(replace(state.header, last_number=state.max_number), kept))
            # 5. the entry complete (on disk before the marker goes), the marker removed; no fsync after the
            # removal: a marker that comes back after a crash names a complete entry, and is simply removed
            fsutil.atomic_write(folder / ENTRY_FILE, _with_state(data, "pending", "complete"))
            fsutil.remove_file(marker)
        except BaseException:
            # put things right at once where the file system lets us; else the next lock of the task does
            with contextlib.suppress(Exception):
                recover_task(task)
            raise
        return entry_id


def _plain_name(file: str) -> bool:
    """True when pathlib would leave the relative name `file` as it is (so a joined string equals the Path)."""
    return bool(file) and not ("//" in file or "/." in file or file[:1] in "./" or file[-1:] == "/")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_STR = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': needs no escaping in TOML


def _entry_bytes(entry: Entry) -> bytes:
    """The entry's TOML: tomli-w for the header, and a direct rendering of each plain checkpoint record.

    tomli-w takes about 35 ms for a thousand records, a third of trash-unused's own time on a big
    task; records hold only integers, finite floats and plain strings, which render the same way
    directly. A record with anything else (escapes, non-finite metrics, odd keys) goes through tomli-w.
    """
    chunks = [dumps(replace(entry, checkpoints=[]).to_doc()).decode()]
    for cp in entry.checkpoints:
        chunks.append(_plain_record(cp) or _tomli_record(cp))
    return "".join(chunks).encode()


_bare_keys: dict[str, bool] = {}  # the same few metric names in every record: checked once each


def _bare_key(k: str) -> bool:
    ok = _bare_keys.get(k)
    if ok is None:
        ok = _bare_keys[k] = type(k) is str and _BARE_KEY.fullmatch(k) is not None
    return ok


def _plain_record(cp: Checkpoint) -> str | None:
    """The `[[checkpoints]]` table of `cp` (keys in `to_record` order, metrics inline), or None when a value
    is not an exact int, a finite float or a plain string: straight from the fields, no dict per record."""
    step, epoch, name, file, sha256, created = cp.step, cp.epoch, cp.original_name, cp.file, cp.sha256, cp.created
    if not (
        type(cp.number) is int
        and type(cp.size) is int
        and (step is None or type(step) is int)
        and (epoch is None or type(epoch) is int)
        and type(file) is str
        and type(sha256) is str
        and type(created) is str
        and (name is None or type(name) is str)
        # one match for all four strings: the character class holds for the whole iff for each part
        and _PLAIN_STR.fullmatch(f"{file}{sha256}{created}{name or ''}")
    ):
        return None
    metrics = ""
    if cp.metrics:
        parts = []
        for k, v in cp.metrics.items():
            t = type(v)
            if t is float and v - v == 0.0:  # finite (inf - inf and nan - nan are nan)
                parts.append(f"{k} = {v!r}")
            elif t is int:
                parts.append(f"{k} = {v}")
            else:
                return None
            if not _bare_key(k):
                return None
        metrics = f"metrics = {{ {', '.join(parts)} }}\n"
    return "".join(
        (
            f'\n[[checkpoints]]\nnumber = {cp.number}\nfile = "{file}"\n',
            "" if step is None else f"step = {step}\n",
            "" if epoch is None else f"epoch = {epoch}\n",
            f'size = {cp.size}\nsha256 = "{sha256}"\ncreated = "{created}"\n',
            "" if name is None else f'original_name = "{name}"\n',
            metrics,
        )
    )


def _tomli_record(cp: Checkpoint) -> str:
    """The `[[checkpoints]]` table of `cp` through tomli-w (which, given one short record alone, would write
    an inline array instead of a table)."""
    rec = cp.to_record()
    metrics = rec.pop("metrics", None)
    text = "\n[[checkpoints]]\n" + dumps(rec).decode()
    if metrics:
        text += "\n[checkpoints.metrics]\n" + dumps(metrics).decode()
    return text


def _with_state(data: bytes, old: str, new: str) -> bytes:
    """The entry's TOML with its state changed (the top-level key comes before any table)."""
    before, after = f'state = "{old}"'.encode(), f'state = "{new}"'.encode()
    assert before in data
    return data.replace(before, after, 1)


@dataclass(slots=True)
class TrashResult:
    """What `trash_unused` did: its plan, and the new entry's id."""

    plan: TrashPlan
    entry: str | None  # None on a dry run or when nothing was unused


@per_backend
def trash_unused(
    ws: Workspace, task_name: str, rules: KeepRules | None = None, *, reason: str = "", dry_run: bool = False
) -> TrashResult:
    """Move every unused checkpoint of `task_name` to one new trash entry (or, `dry_run`, only plan it).

    A checkpoint is used when a model was made from it, when it is the latest, or when `rules`
    protect it. Raises TaskNotFound, UsageError (rules), BusyError, ManifestError.
    """
    rules = rules or KeepRules()
    rules.check()
    task = ws.task(task_name)
    reason = reason or f"trash_unused({task_name!r})"
    if dry_run:
        return TrashResult(plan_unused(task, rules, reason), None)
    with task.lock():
        # decided under the lock, from the manifest read under it: checkpoints saved meanwhile are not in
        # the plan, and a promote (which takes this lock) cannot make a model from one we are moving
        plan = plan_unused(task, rules, reason)
        entry = plan.execute()
    return TrashResult(plan, entry)


@dataclass(slots=True)
class Reasons:
    """Why each checkpoint is used (number -> reasons), and the direction --keep-best ranked by."""

    why: dict[int, list[str]]
    direction: Direction | None = None
    unranked: set[int] = field(default_factory=set)  # without a value of --keep-best's metric: ranked last

    def unused(self, number: int) -> str:
        """The dry run's word for a checkpoint nothing protects."""
        if number in self.unranked and self.direction is not None:
            return f"unused (no {self.direction.metric} value: missing, NaN or infinite, ranked last)"
        return "unused"


def keep_reasons(task: Task, cps: list[Checkpoint], rules: KeepRules, warnings: list[str]) -> Reasons:
    """Why each of `cps` (the task's checkpoints in number order) is used: latest, a model, a keep rule."""
    why: dict[int, list[str]] = {cp.number: [] for cp in cps}
    out = Reasons(why)
    if cps:
        why[cps[-1].number].append("latest")
    models, model_errors = task.ws.models.read_all()
    if model_errors:  # its checkpoint may be one this would trash: refuse rather than guess
        raise IntegrityError(
            f"a model could not be read, so the checkpoint it came from is not known: {model_errors[0]}; "
            "nothing was trashed",
            hint="fix that model.toml by hand (docs/formats.md) or move its folder out of models/, then run again",
        )
    titles: dict[int, list[str]] = {}
    for m in models:
        if m.task == task.name:
            titles.setdefault(m.checkpoint, []).append(m.title)
    for number, names in sorted(titles.items()):
        if number in why:
            why[number].append("model " + ", ".join(sorted(names)))
    if rules.keep_last:
        for cp in cps[-rules.keep_last :]:
            why[cp.number].append(f"keep-last {rules.keep_last}")
    for number in sorted(rules.protect):
        if number in why:
            why[number].append("just saved")
    if rules.keep_every or rules.keep_interval:
        from .keep import keep_every, keep_interval  # only where one asks for them

        for number, why_kept in (
            *keep_every(cps, rules.keep_every),
            *keep_interval(cps, rules.keep_interval, task.header.created),
        ):
            why[number].append(why_kept)
    if rules.keep_best and rules.metric:
        metric = rules.metric
        if cps:
            require(cps, metric, task.name)
        better = out.direction = task.direction(metric, rules.mode)
        if rules.mode_from and rules.mode is not None:
            better = out.direction = Direction(metric, rules.mode, "policy", rules.mode_from)
        ranked, missing = rank(cps, metric, better.minimize, metrics_of=lambda cp: cp.metrics, tie=lambda cp: cp.number)
        out.unranked = {cp.number for cp in missing}
        for cp in ranked[: rules.keep_best]:
            why[cp.number].append(f"keep-best {rules.keep_best} by {metric} ({cp.metrics[metric]:.4g})")
    return out


def plan_unused(task: Task, rules: KeepRules, reason: str) -> TrashPlan:
    """Decide, for each checkpoint of `task`, keep or trash and why. Changes nothing."""
    state = task.state()
    cps = [state.checkpoints[n] for n in sorted(state.checkpoints)]
    warnings: list[str] = []
    if task.pending_markers():
        warnings.append("an interrupted trash operation on this task will be finished or undone first")
    reasons_of = keep_reasons(task, cps, rules, warnings)
    why = reasons_of.why

    decisions: list[Decision] = []
    trash: list[Checkpoint] = []
    # what emptying the entry would free: each inode once, and only when every link to it goes
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [links among the files to trash, nlink, size]
    folders: dict[str, tuple[str, int | None, str | None]] = {}
    root = str(task.folder)
    lstat, is_reg = os.lstat, stat.S_ISREG
    try:
        for cp in cps:
            reasons = why[cp.number]
            if not reasons:
                # the common case first, a thousand times on a big task: a regular file in a folder already
                # checked and opened; everything else (the first file of a folder, odd names) goes the long way
                parent, _, name = cp.file.rpartition("/")
                known = folders.get(parent)
                if known is not None and known[1] is not None and name:
                    try:
                        top = lstat(name, dir_fd=known[1])
                    except FileNotFoundError:
                        top = None
                    if top is not None and is_reg(top.st_mode):
                        decisions.append(Decision(cp.number, "trash", "unused", cp.size))
                        trash.append(cp)
                        key = (top.st_dev, top.st_ino)
                        seen = links.get(key)
                        if seen is None:
                            links[key] = [1, top.st_nlink, top.st_size]
                        else:
                            seen[0] += 1
                        continue
                problem, top = _unmovable(root, cp.file, folders)
                if problem is None:
                    assert top is not None
                    decisions.append(Decision(cp.number, "trash", "unused", cp.size))
                    trash.append(cp)
                    tree = fsutil.lstat_tree(task.path_of(cp)) if stat.S_ISDIR(top.st_mode) else ((None, top),)
                    for _, st in tree:
                        if stat.S_ISREG(st.st_mode):
                            key = (st.st_dev, st.st_ino)
                            if key in links:
                                links[key][0] += 1
                            else:
                                links[key] = [1, st.st_nlink, st.st_size]
                    continue
                reasons.append(problem)
            decisions.append(Decision(cp.number, "keep", "; ".join(reasons), cp.size))
    finally:
        for _, fd, _ in folders.values():
            if fd is not None:
                os.close(fd)
    if reasons_of.unranked:  # the dry run says why a checkpoint without the metric was not among the best
        for d in decisions:
            if d.action == "trash":
                d.reason = reasons_of.unused(d.number)
    freed = sum(size for n, nlink, size in links.values() if n >= nlink)
    plan = TrashPlan(task, decisions, trash, freed, reason, warnings, reasons_of.direction)
    plan.held = _held(links, state.header.source)
    return plan


def _held(links: dict[tuple[int, int], list[int]], source: dict[str, str] | None) -> Held | None:
    """What emptying would not free of these files (inode -> [links among them, nlink, size]): the inodes
    that other hard links hold, with the import's source folder when the task was imported by linking."""
    files = held = 0
    for n, nlink, size in links.values():
        if n < nlink:
            files += n
            held += size
    if not files:
        return None
    from .trash_results import Held

    linked = source.get("path") if source and source.get("how") == "link" else None
    return Held(files, held, linked)


def _unmovable(
    root: str, file: str, folders: dict[str, tuple[str, int | None, str | None]]
) -> tuple[str | None, os.stat_result | None]:
    """Why `file` (relative to the task folder `root`) cannot be moved (a symlink, missing, reached through
    a link), or its lstat. `folders` keeps each parent folder's path, descriptor (closed by the caller) and
    problem: checked and opened once, not per file."""
    # plain strings, not Path: this runs once per checkpoint, a thousand times on a big task
    parent, _, name = file.rpartition("/")
    known = folders.get(parent)
    if known is None:
        folder, fd, problem = root, None, None
        for part in parent.split("/") if parent else ():
            folder = os.path.join(folder, part)
            if fsutil.is_symlink(Path(folder)):
                problem = f"skipped: {part}/ is a symlink; ckpt never moves files through links"
                break
        if problem is None:
            with contextlib.suppress(OSError):  # a folder that is gone: its files are reported missing below
                fd = fsutil.open_folder(folder)  # an lstat through it looks up one name, not the whole path
        known = folders[parent] = (folder, fd, problem)
    folder, fd, problem = known
    if problem is not None:
        return problem, None
    try:
        st = os.lstat(name, dir_fd=fd) if fd is not None and name else os.lstat(f"{folder}/{name}")
    except FileNotFoundError:
        return "skipped: its file is missing (see: ckpt doctor)", None
    if stat.S_ISLNK(st.st_mode):
        return "skipped: its file is a symlink; ckpt never follows, moves or deletes through links", None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return "skipped: its file is not a regular file or folder", None
    return None, st


# --- models remove ---------------------------------------------------------------------------------


@per_backend
def trash_model(ws: Workspace, title: str, reason: str = "") -> ModelTrashResult:
    """Move model `title` (its whole folder) to a new trash entry; its source checkpoint is untouched.

    Raises ModelNotFound, ManifestError (unreadable model), BusyError.
    """
    from .trash_results import ModelTrashResult

    model = ws.models[title]
    with _model_locks(ws, model.task):
        model = ws.models[title]  # again, under the locks
        src = ws.models_dir / title
        entry_id, folder = _new_entry(ws)
        entry = Entry(
            id=entry_id,
            kind="model",
            task=model.task,
            state="pending",
            created=now_iso(),
            reason=reason or f"trash_model({title!r})",
            size=model.size,
            bytes=_model_bytes(src),
            model={"title": title, **{k: v for k, v in model.to_doc().items() if k != "format"}},
            folder=folder,
        )
        # the entry before the move; a crash between is finished or undone by ckpt doctor
        data = dumps(entry.to_doc())
        fsutil.atomic_write(folder / ENTRY_FILE, data)
        fsutil.move_noreplace(src, folder / MODEL_DIR)
        fsutil.fsync_dir(ws.models_dir)
        fsutil.fsync_dir(folder)
        fsutil.atomic_write(folder / ENTRY_FILE, _with_state(data, "pending", "complete"))
    return ModelTrashResult(entry_id, model)


def _model_bytes(folder: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, st in fsutil.lstat_tree(folder):
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and key not in seen:
            seen.add(key)
            if st.st_nlink <= 1:
                total += st.st_size
    return total


@contextlib.contextmanager
def _model_locks(ws: Workspace, task_name: str | None) -> Iterator[None]:
    """The model's source task lock where that task exists (a concurrent trash-unused sees a consistent set
    of models), then the trash lock. Always in that order."""
    with contextlib.ExitStack() as stack:
        if task_name:
            with contextlib.suppress(CkptError):
                task = ws.task(task_name)
                stack.enter_context(task.lock())
        stack.enter_context(_trash_lock(ws))
        yield


# --- restore -----------------------------------------------------------------------------------------


@per_backend
def restore(ws: Workspace, entry_id: str) -> RestoreResult:
    """Put the files and records of trash entry `entry_id` back exactly as they were; the entry is removed.

    Raises NotFoundError, ConflictError (something would be overwritten, a number is back in the
    manifest, or the entry is not complete; nothing is changed), IntegrityError (a file is missing).
    """
    from .trash_results import RestoreResult

    entry = read_entry(ws, entry_id)
    if entry.kind == "model":
        return RestoreResult(_restore_model(ws, entry_id, entry.task))
    task = _entry_task(ws, entry)
    with task.lock():
        entry = read_entry(ws, entry_id)  # again, under the lock
        if entry.state != "complete":
            raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
        state = task.state()
        conflicts: list[str] = []
        for cp in entry.checkpoints:
            if cp.number in state.checkpoints:
                conflicts.append(f"checkpoint {cp.number} is in the manifest of task '{task.name}' again")
            dst = task.path_of(cp)
            if os.path.lexists(dst):
                conflicts.append(f"'{ws.rel(dst)}' exists")
            src = entry.folder / FILES_DIR / cp.file
            link = fsutil.symlink_on_path(entry.folder, f"{FILES_DIR}/{cp.file}") or fsutil.symlink_on_path(
                task.folder, cp.file
            )
            if link is not None:
                raise IntegrityError(
                    f"restoring checkpoint {cp.number} of trash entry '{entry_id}' would go through the symlink "
                    f"'{link}'; ckpt never moves files through links; nothing was changed",
                    path=src,
                )
            if not _is_file_or_folder(src):
                raise IntegrityError(
                    f"trash entry '{entry_id}' is missing the file of checkpoint {cp.number} ({ws.rel(src)})",
                    path=src,
                )
        if conflicts:
            shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
            raise ConflictError(f"restoring trash entry '{entry_id}' would overwrite: {shown}; nothing was changed")
        marker = task.folder / f"{PENDING_PREFIX}{entry_id}"
        try:
            # marker, then the entry marked "restoring": from here on recovery finishes the restore
            fsutil.make_file_new(marker, entry_id.encode())  # only its name counts: its bytes need no fsync
            fsutil.fsync_dir(task.folder)  # the marker is on disk before the entry changes
            _write_entry(replace(entry, state="restoring"))
            _finish_restore(task, entry)
            # no fsync after the removal: a marker that comes back after a crash names no entry and is removed
            fsutil.remove_file(marker)
        except BaseException:
            with contextlib.suppress(Exception):
                recover_task(task)
            raise
    return RestoreResult(entry)


def _finish_restore(task: Task, entry: Entry) -> None:
    """Move back what is still in the trash, add the records not in the manifest, drop the entry."""
    moved_to: set[Path] = set()
    for cp in entry.checkpoints:
        src = entry.folder / FILES_DIR / cp.file
        dst = task.path_of(cp)
        if os.path.lexists(src) and not os.path.lexists(dst):
            fsutil.make_dirs(dst.parent)
            fsutil.move_noreplace(src, dst)
            moved_to.add(dst.parent)
    for d in moved_to:
        fsutil.fsync_dir(d)
    # the manifest after the files: a record never points at a file that is not in place
    state = task.state()
    missing = {cp.number: replace(cp, task=task.name) for cp in entry.checkpoints if cp.number not in state.checkpoints}
    if missing:
        merged = dict(state.checkpoints)
        merged.update(missing)
        task._rewrite(TaskState(replace(state.header, last_number=state.max_number), merged))
    _drop_entry(entry.folder)


def _restore_model(ws: Workspace, entry_id: str, task_name: str | None) -> Entry:
    with _model_locks(ws, task_name):
        entry = read_entry(ws, entry_id)
        if entry.state != "complete":
            raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
        title = entry.title or ""
        dst = ws.models_dir / title
        if os.path.lexists(dst):
            raise ConflictError(
                f"model '{title}' exists again; restoring trash entry '{entry_id}' would overwrite it; "
                "nothing was changed",
                hint="rename that model first: ckpt models rename",
            )
        if fsutil.is_symlink(entry.folder / MODEL_DIR) or not os.path.isdir(entry.folder / MODEL_DIR):
            raise IntegrityError(f"trash entry '{entry_id}' is missing its model folder", path=entry.folder)
        from .models import title_claim

        with title_claim(ws, title):  # a title differing from another only in case is refused, as for promote
            _write_entry(replace(entry, state="restoring"))
            _finish_model_restore(ws, entry)
    return entry


def _finish_model_restore(ws: Workspace, entry: Entry) -> None:
    src = entry.folder / MODEL_DIR
    fsutil.refuse_links(ws.root, "models")
    dst = ws.models_dir / (entry.title or "")
    if os.path.lexists(src) and not os.path.lexists(dst):
        fsutil.move_noreplace(src, dst)
        fsutil.fsync_dir(ws.models_dir)
    _drop_entry(entry.folder)


def _entry_task(ws: Workspace, entry: Entry) -> Task:
    from .errors import TaskNotFound

    try:
        return ws.task(entry.task or "")
    except TaskNotFound:
        raise NotFoundError(
            f"task '{entry.task}' of trash entry '{entry.id}' no longer exists; its checkpoints cannot go back",
            hint=f"the files are in {ws.rel(entry.folder)}",
        ) from None


def _is_file_or_folder(path: Path) -> bool:
    """A regular file or a folder (a directory checkpoint), not a symlink."""
    try:
        mode = os.lstat(path).st_mode
        return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
    except OSError:
        return False


# --- empty -------------------------------------------------------------------------------------------


def plan_empty(ws: Workspace, ids: list[str] | None = None, older_than: timedelta | None = None) -> EmptyPlan:
    """Choose the entries to delete: `ids` (all when empty or None), only those older than `older_than`; an
    entry an interrupted empty left ("emptying") is chosen whatever its age, one being made or restored
    (or interrupted doing so) is skipped. One plan for every store (`ws.trash_entry` reads an entry as
    it stands; a bucket settles a pending one first). Raises NotFoundError for an id not in the trash.
    """
    from .trash_results import EmptyPlan

    skipped: list[tuple[str, str]] = []
    if ids:
        candidates = [ws.trash_entry(i) for i in dict.fromkeys(ids)]
    else:
        candidates, errors = list_entries(ws)
        skipped.extend((str(e.path and Path(e.path).parent.name), f"unreadable: {e}") for e in errors)
    cutoff = datetime.now(UTC) - older_than if older_than is not None else None
    chosen: list[Entry] = []
    for e in candidates:
        if e.state == "gone":
            continue
        if e.state == "emptying":
            chosen.append(e)
            continue
        if e.state != "complete":
            doing = "being restored" if e.state == "restoring" else "being made"
            skipped.append((e.id, f"{e.state}: {doing}, or interrupted doing so; run: ckpt doctor"))
            continue
        if cutoff is not None:
            try:
                if parse_iso(e.created) > cutoff:
                    continue
            except ValueError:
                skipped.append((e.id, f"unreadable created time {e.created!r}"))
                continue
        chosen.append(e)
    return EmptyPlan(chosen, skipped, ws.trash_leftovers())


def deleting_leftovers(ws: Workspace) -> list[Path]:
    """Folders an interrupted `trash empty` renamed aside and did not finish deleting (a folder's
    `Workspace.trash_leftovers`)."""
    try:
        with os.scandir(ws.trash_dir) as it:
            return sorted(Path(e.path) for e in it if e.name.startswith(DELETING_PREFIX))
    except FileNotFoundError:
        return []


@per_backend
def empty(ws: Workspace, plan: EmptyPlan) -> EmptyResult:
    """Delete the planned entries for good; return the bytes actually freed (each inode once).

    The only function of ckpt that deletes checkpoint bytes. Never follows a symlink.
    """
    from .trash_results import EmptyResult

    _check_trash_dir(ws)
    emptied: list[str] = []
    skipped = list(plan.skipped)
    doomed: list[Path] = list(plan.leftovers)
    for planned in plan.entries:
        with contextlib.ExitStack() as stack:
            if planned.kind == "checkpoints":
                with contextlib.suppress(CkptError):  # a task that is gone has no lock to take
                    stack.enter_context(ws.task(planned.task or "").lock())
            stack.enter_context(_trash_lock(ws))
            entry = _entry_or_none(ws, planned.id)  # again, under the locks: a restore may have taken it
            if entry is None or entry.state != "complete":
                skipped.append((planned.id, "restored or changed meanwhile"))
                continue
            # one rename takes the entry out of the trash; deleting the renamed folder may then be interrupted
            # and finished later (the next `trash empty` or `ckpt doctor`)
            target = ws.trash_dir / f"{DELETING_PREFIX}{entry.id}"
            fsutil.move_noreplace(entry.folder, target)
            fsutil.fsync_dir(ws.trash_dir)
            doomed.append(target)
            emptied.append(entry.id)
    freed, held = _delete_trees(doomed)
    return EmptyResult(emptied, freed, skipped, held)


def _delete_trees(paths: list[Path]) -> tuple[int, Held | None]:
    """Delete these trees without following symlinks; the sizes of the files whose last link went."""
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [links inside, nlink, size]
    for root in paths:
        for _, st in fsutil.lstat_tree(root):
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            if key in links:
                links[key][0] += 1
            else:
                links[key] = [1, st.st_nlink, st.st_size]
    for root in paths:
        fsutil.remove_tree(root)
    freed = 0
    for inside, nlink, size in links.values():
        if inside >= nlink:
            freed += size
    return freed, _held(links, None)


# --- du ------------------------------------------------------------------------------------------------


def disk_use(ws: Workspace) -> DiskUse:
    """Bytes of the workspace by task, models and trash. Tasks count first: a model hard-linked to a
    checkpoint of a task costs nothing more (`ws.usage` counts each file, inode or object once)."""
    from .trash_results import DiskUse

    names = ws.task_names()
    sizes, other = ws.usage([f"tasks/{n}" for n in names] + ["models", "trash"])
    by_task = dict(zip(names, sizes, strict=False))
    models, trash = sizes[-2:]
    return DiskUse(by_task, models, trash, other, sum(sizes) + other)


# --- recovery --------------------------------------------------------------------------------------------


def recover_task(task: Task) -> list[Repair]:
    """Finish or undo the interrupted trash operations of `task` (those that left a `.pending-` marker).

    The caller holds the task lock (Task.lock calls this). Never deletes a checkpoint file.
    """
    repairs: list[Repair] = []
    for marker in sorted(task.pending_markers()):
        repairs.append(_recover_marker(task, marker))
    return repairs


def _recover_marker(task: Task, marker: Path) -> Repair:
    from .trash_results import Repair

    ws = task.ws
    entry_id = marker.name[len(PENDING_PREFIX) :]
    rel = ws.rel(marker)
    if not ENTRY_ID.fullmatch(entry_id):
        fsutil.remove_file(marker)
        return Repair(rel, "a pending marker that names no trash entry", "removed the marker")
    folder = ws.trash_dir / entry_id
    entry = _entry_or_none(ws, entry_id)
    if entry is None:
        # the marker comes before the entry, and the entry is removed before the marker: nothing of it is moved
        _drop_entry(folder)
        fsutil.remove_file(marker)
        fsutil.fsync_dir(task.folder)
        return Repair(rel, "an interrupted trash with no entry record (nothing had moved)", "removed the marker")
    if entry.kind != "checkpoints" or entry.task != task.name:
        fsutil.remove_file(marker)
        return Repair(rel, f"a pending marker for trash entry '{entry_id}' of another task", "removed the marker")
    repair = _recover_entry(task, entry)
    fsutil.remove_file(marker)
    fsutil.fsync_dir(task.folder)
    return repair


def _recover_entry(task: Task, entry: Entry) -> Repair:
    """Recover a checkpoint entry of `task` (lock held): undo a pending trash, finish a restore."""
    from .trash_results import Repair

    ws = task.ws
    rel = ws.rel(entry.folder)
    if entry.state == "complete":
        return Repair(rel, f"trash entry '{entry.id}' was complete but its marker was left", "removed the marker")
    if entry.state == "restoring":
        _finish_restore(task, entry)
        return Repair(rel, f"an interrupted restore of trash entry '{entry.id}'", "finished the restore")
    state = task.state()
    if any(n in state.checkpoints for n in entry.numbers):
        # the manifest was not rewritten yet: the checkpoints are still the task's; put the files back
        moved: set[Path] = set()
        for cp in entry.checkpoints:
            src = entry.folder / FILES_DIR / cp.file
            dst = task.path_of(cp)
            if os.path.lexists(src):
                if os.path.lexists(dst):
                    raise IntegrityError(
                        f"checkpoint {cp.number} of task '{task.name}' is both in the task and in trash entry "
                        f"'{entry.id}'; nothing was changed",
                        path=src,
                        hint=f"compare {ws.rel(dst)} with {ws.rel(src)} and remove one",
                    )
                fsutil.move_noreplace(src, dst)
                moved.add(dst.parent)
        for d in moved:
            fsutil.fsync_dir(d)
        _drop_entry(entry.folder)
        return Repair(rel, f"an interrupted trash-unused ('{entry.id}')", "undone: the files are back in the task")
    # the manifest was rewritten: the move is done, only the entry's state is behind
    _write_entry(replace(entry, state="complete"))
    return Repair(rel, f"an interrupted trash-unused ('{entry.id}')", "finished: the entry is complete")


def _has_files(folder: Path) -> bool:
    return any(not stat.S_ISDIR(st.st_mode) and not _is_temp(p.name) for p, st in fsutil.lstat_tree(folder))


def _recover_model_entry(ws: Workspace, entry: Entry) -> Repair:
    """Recover a model entry (trash lock held): finish or undo a pending remove, finish a restore."""
    from .trash_results import Repair

    rel = ws.rel(entry.folder)
    if entry.state == "restoring":
        _finish_model_restore(ws, entry)
        return Repair(rel, f"an interrupted restore of model '{entry.title}'", "finished the restore")
    if os.path.lexists(entry.folder / MODEL_DIR):
        _write_entry(replace(entry, state="complete"))
        return Repair(rel, f"an interrupted remove of model '{entry.title}'", "finished: the entry is complete")
    _drop_entry(entry.folder)
    return Repair(rel, f"an interrupted remove of model '{entry.title}'", "undone: the model had not moved")


@per_backend
def recover_workspace(ws: Workspace, *, dry_run: bool = False, stale_after: float = STALE_AFTER) -> list[Repair]:
    """Find and repair what interrupted commands left anywhere in the workspace (`ckpt doctor`).

    Pending markers and trash entries, `.deleting-*` folders of an interrupted empty, `models/.staging-*`
    folders of an interrupted promote, and `.<name>.<rand>.tmp` files: the last two only when older than
    `stale_after` seconds (a live command may be writing them). Never deletes a recorded checkpoint file.
    With `dry_run`, changes nothing and says what it would do.
    """
    from .trash_results import Repair

    repairs: list[Repair] = []
    now = time.time()
    # 1. tasks with markers, under their locks (Task.lock recovers them)
    for name in ws.task_names():
        try:
            task = ws.task(name)
        except CkptError:
            continue
        markers = task.pending_markers()
        if not markers:
            continue
        if dry_run:
            repairs.extend(
                Repair(ws.rel(m), "an interrupted trash or restore", "would finish or undo it") for m in markers
            )
            continue
        with fsutil.locked(task.folder / TASK_LOCK, f"task '{name}'"):
            repairs.extend(recover_task(task))
    # 2. entries still pending or restoring without a marker (models; or a marker removed by hand)
    entries, errors = list_entries(ws)
    for err in errors:
        repairs.append(Repair(ws.rel(Path(err.path)) if err.path else "trash", str(err), "left alone"))
    for entry in entries:
        if entry.state == "complete":
            continue
        if dry_run:
            repairs.append(
                Repair(ws.rel(entry.folder), f"trash entry '{entry.id}' is {entry.state}", "would recover it")
            )
            continue
        if entry.kind == "model":
            with _model_locks(ws, entry.task):
                fresh = _entry_or_none(ws, entry.id)
                if fresh is not None and fresh.state != "complete":
                    repairs.append(_recover_model_entry(ws, fresh))
        else:
            try:
                task = ws.task(entry.task or "")
            except CkptError:
                repairs.append(Repair(ws.rel(entry.folder), f"entry '{entry.id}' of a task that is gone", "left alone"))
                continue
            with fsutil.locked(task.folder / TASK_LOCK, f"task '{task.name}'"):
                fresh = _entry_or_none(ws, entry.id)
                if fresh is not None and fresh.state != "complete":
                    repairs.append(_recover_entry(task, fresh))
    # 3. folders in the trash: `.deleting-*` (committed to deletion) and entry folders with no entry.toml
    for path in deleting_leftovers(ws):
        repairs.append(Repair(ws.rel(path), "an interrupted trash empty", "would delete it" if dry_run else "deleted"))
        if not dry_run:
            _delete_trees([path])
    try:
        with os.scandir(ws.trash_dir) as it:
            loose = [Path(e.path) for e in it if ENTRY_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        loose = []
    for folder in sorted(loose):
        if (folder / ENTRY_FILE).exists() or os.path.lexists(folder / ENTRY_FILE):
            continue
        if _has_files(folder):
            repairs.append(Repair(ws.rel(folder), "a trash folder with files but no entry.toml", "left alone"))
        elif now - _mtime(folder) > 60:
            # a fresh empty folder may be an entry being made right now
            repairs.append(Repair(ws.rel(folder), "an empty trash folder", "would remove it" if dry_run else "removed"))
            if not dry_run:
                _drop_entry(folder)
    # 4. staging folders of promote, and temp files: only when stale
    try:
        with os.scandir(ws.models_dir) as it:
            staging = [Path(e.path) for e in it if e.name.startswith(STAGING_PREFIX)]
    except FileNotFoundError:
        staging = []
    for folder in sorted(staging):
        age = now - max((st.st_mtime for _, st in fsutil.lstat_tree(folder)), default=now)
        if age < stale_after:
            repairs.append(Repair(ws.rel(folder), "a promote's staging folder", "left alone: it may be in use"))
            continue
        repairs.append(
            Repair(
                ws.rel(folder), "an interrupted promote's staging folder", "would delete it" if dry_run else "deleted"
            )
        )
        if not dry_run:
            fsutil.remove_tree(folder)
    for path in _temp_files(ws):
        if now - _mtime(path) < stale_after:
            continue
        repairs.append(
            Repair(ws.rel(path), "a temp file of an interrupted write", "would delete it" if dry_run else "deleted")
        )
        if not dry_run:
            fsutil.remove_file(path)
    return repairs


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def _temp_files(ws: Workspace) -> list[Path]:
    """`.<name>.<rand>.tmp` regular files where ckpt writes: the root, task folders and their checkpoints/,
    model folders, trash entries."""
    folders = [ws.root]
    for name in ws.task_names():
        folders += [ws.tasks_dir / name, ws.tasks_dir / name / "checkpoints"]
    for parent in (ws.models_dir, ws.trash_dir):
        try:
            with os.scandir(parent) as it:
                folders += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            pass
    out: list[Path] = []
    for folder in folders:
        if fsutil.is_symlink(folder):
            continue
        try:
            with os.scandir(folder) as it:
                out += [Path(e.path) for e in it if _is_temp(e.name) and e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted(out)
