"""Trash entries: `trash/<id>/entry.toml` and the files beside it, read and written through the workspace's store.

An entry names what it holds before anything moves into it (state "pending"), and says "complete" once
its move committed; "restoring" and "emptying" say what is being done to it. Every change of state is a
conditional write on the version read (If-Match), so of a restore and an empty begun at once one wins.
The format is in docs/trash.md; the operations on entries are in ckpt.trash.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CkptError, ConflictError, ManifestError, NotFoundError, UsageError
from .manifest import FORMAT, Checkpoint, check_files, check_format, dumps, parse_toml
from .names import describe, is_valid_name
from .storage.base import PreconditionFailed, Storage
from .timeutil import parse_iso

if TYPE_CHECKING:
    from .workspace_base import Workspace

ENTRY_FILE = "entry.toml"
FILES_DIR = "files"
MODEL_DIR = "model"
DELETING_PREFIX = ".deleting-"  # an older ckpt's empty renamed an entry aside under this name first
STAGING_PREFIX = ".staging-"
KINDS = ("checkpoints", "model")
STATES = ("pending", "complete", "restoring", "emptying")
STALE_AFTER = 3600.0  # seconds before doctor treats a temp file or staging folder as abandoned
STALE_PENDING = 3600.0  # seconds before a pending entry a store without locks cannot tell from a running one is undone
ENTRY_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
# a record is about 250 bytes: 64 MiB holds a quarter of a million; a larger entry.toml is no entry ckpt wrote,
# and is refused before it is parsed (parsing costs about 3 bytes of memory per byte)
MAX_ENTRY_BYTES = 64 * 1024 * 1024
HAND_HINT = "fix trash/{0}/entry.toml by hand (docs/trash.md), or move trash/{0} out of the workspace"


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
    if kind not in KINDS:
        raise ManifestError(f"{path}: unknown kind {kind!r} (ckpt writes {' or '.join(KINDS)})", path=path)
    if state not in STATES:
        raise ManifestError(f"{path}: unknown state {state!r} (ckpt writes {', '.join(STATES)})", path=path)
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
        e.hint = f"nothing is restored from it; its files are in trash/{folder.name}/{FILES_DIR}/; " + HAND_HINT.format(
            folder.name
        )
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


def is_temp(name: str) -> bool:
    """A temporary file of an atomic write (`.<name>.<rand>.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


def entry_key(entry_id: str) -> str:
    return f"trash/{entry_id}/{ENTRY_FILE}"


def read_entry_tagged(ws: Workspace, entry_id: str) -> tuple[Entry, str]:
    """Trash entry `entry_id` as it stands, and the version read; raises NotFoundError, ManifestError,
    SymlinkError (an entry reached through a link is never read)."""
    check_entry_id(entry_id)
    try:
        data, etag = ws.storage.get(entry_key(entry_id))
    except FileNotFoundError:
        raise NotFoundError(f"trash entry '{entry_id}' does not exist", hint="see: ckpt trash list") from None
    folder = ws.root / "trash" / entry_id
    if len(data) > MAX_ENTRY_BYTES:
        raise ManifestError(
            f"trash/{entry_id}/{ENTRY_FILE} is {len(data):,} bytes, more than any entry ckpt writes "
            f"({MAX_ENTRY_BYTES:,}); nothing was read from it",
            path=folder / ENTRY_FILE,
            hint=HAND_HINT.format(entry_id),
        )
    try:
        return entry_from_doc(parse_toml(data, folder / ENTRY_FILE), folder), etag
    except ManifestError as e:
        e.hint = e.hint or HAND_HINT.format(entry_id)  # no command mends an entry: a person does
        raise


def read_entry(ws: Workspace, entry_id: str) -> Entry:
    return read_entry_tagged(ws, entry_id)[0]


def entry_or_none(ws: Workspace, entry_id: str) -> Entry | None:
    try:
        return read_entry(ws, entry_id)
    except NotFoundError:
        return None


def put_once(
    storage: Storage, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
) -> str:
    """A conditional `put` that recognises its own write: when it answers 412 and `key` holds exactly `data`
    (a retry whose first attempt landed: every conditional write here carries an id or a time of its own),
    it landed; returns the etag."""
    try:
        return storage.put(key, data, if_match=if_match, if_none_match=if_none_match)
    except PreconditionFailed:
        try:
            got, etag = storage.get(key)
        except FileNotFoundError:
            got, etag = b"", ""
        if got == data and (if_none_match or if_match is not None):
            return etag
        raise


def put_entry(ws: Workspace, entry: Entry, *, new: bool = False, if_match: str | None = None) -> str:
    return put_once(ws.storage, entry_key(entry.id), entry_bytes(entry), if_match=if_match, if_none_match=new)


def new_entry_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def create_entry(ws: Workspace, make: Callable[[str], Entry]) -> Entry:
    """A new entry record under a fresh id (If-None-Match claims the id)."""
    while True:
        entry = make(new_entry_id())
        try:
            put_entry(ws, entry, new=True)
            return entry
        except PreconditionFailed:
            continue


def mark(ws: Workspace, entry: Entry, state: str, etag: str) -> str:
    """Move `entry` to `state` with If-Match on the etag it was read with: of a restore and an empty of the same
    entry begun at once, the first to mark it wins and the other stops before it changes anything."""
    try:
        return put_entry(ws, replace(entry, state=state), if_match=etag)
    except PreconditionFailed:
        raise ConflictError(
            f"trash entry '{entry.id}' was changed by another command meanwhile; nothing was changed by this one",
            hint="see: ckpt trash list",
        ) from None


def delete_entry(ws: Workspace, entry_id: str) -> int:
    """Delete the entry's files, its record last (a record never names files that are already gone); the
    bytes of the files deleted."""
    blobs = ws.storage.list_prefix(f"trash/{entry_id}/")
    record = entry_key(entry_id)
    ws.storage.delete([b.key for b in blobs if b.key != record])
    ws.storage.delete([record])
    ws.storage.delete([f"trash/{entry_id}"])  # a folder's entry: what no listing names (links, empty folders)
    return sum(b.size for b in blobs if b.key != record)


def created_key(created: str) -> float:
    try:
        return parse_iso(created).timestamp()
    except (ValueError, OverflowError):
        return float("inf")  # unreadable: after the others


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_STR = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII without '"' and '\\': needs no escaping in TOML


def entry_bytes(entry: Entry) -> bytes:
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


def with_state(data: bytes, old: str, new: str) -> bytes:
    """The entry's TOML with its state changed (the top-level key comes before any table)."""
    before, after = f'state = "{old}"'.encode(), f'state = "{new}"'.encode()
    assert before in data
    return data.replace(before, after, 1)


def held_elsewhere(ws: Workspace, entry: Entry) -> bool:
    """Whether another trash entry holds one of `entry`'s checkpoints, or its model (the same title, record
    time and sha256); reads every entry: a rare path."""

    def model_of(e: Entry) -> tuple[Any, ...] | None:
        m = e.model or {}
        return (m.get("title"), m.get("created"), m.get("sha256")) if e.kind == "model" else None

    mine = set(entry.numbers)
    for other in ws.storage.children("trash/"):
        if other == entry.id or not ENTRY_ID.fullmatch(other):
            continue
        try:
            e = read_entry(ws, other)
        except CkptError:
            continue
        if e.kind == "checkpoints" and e.task == entry.task and mine & set(e.numbers):
            return True
        if e.kind == "model" and model_of(e) == model_of(entry):
            return True
    return False


def _age(created: str) -> float:
    """Seconds since the ISO time `created` (0 when unreadable: treated as young)."""
    try:
        return (datetime.now(UTC) - parse_iso(created)).total_seconds()
    except ValueError:
        return 0.0


def is_young(created: str) -> bool:
    """Whether a pending change made at `created` may still be running on another machine (a store without
    locks cannot tell otherwise): younger than STALE_PENDING."""
    return age(created) < STALE_PENDING


def age(created: str) -> float:
    """Seconds since the ISO time `created` (0 when unreadable: treated as young)."""
    try:
        return (datetime.now(UTC) - parse_iso(created)).total_seconds()
    except ValueError:
        return 0.0
