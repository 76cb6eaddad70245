"""Models in the trash: `ckpt models remove` (a model's folder into a trash entry), its restore, and settling
a remove that stopped; written once for every store, as ckpt.trash is (see its crash order)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BusyError, CkptError, ConflictError, IntegrityError, ModelNotFound
from .layout import CLAIM_FILE
from .manifest import FORMAT, parse_toml
from .models import MODEL_FILE, Model
from .storage.base import PreconditionFailed
from .timeutil import now_iso
from .trash_entry import (
    ENTRY_ID,
    MODEL_DIR,
    Entry,
    create_entry,
    delete_entry,
    held_elsewhere,
    is_young,
    mark,
    put_entry,
    read_entry,
    read_entry_tagged,
)
from .trash_plan import count_links

if TYPE_CHECKING:
    from .trash_results import ModelTrashResult
    from .workspace_base import Workspace

OWN = frozenset({CLAIM_FILE})  # a title's claim stays with the title: never moved with a model's files


@contextlib.contextmanager
def _model_locks(ws: Workspace, task_name: str | None) -> Iterator[None]:
    """The lock of the model's source task where the store has locks and the task exists (a trash-unused of it
    then sees a consistent set of models), then the trash's; always in that order."""
    with contextlib.ExitStack() as stack:
        if task_name:
            with contextlib.suppress(CkptError):
                stack.enter_context(ws.task(task_name).lock())
        stack.enter_context(ws.exclusive("the trash"))
        yield


def trash_model(ws: Workspace, title: str, reason: str = "") -> ModelTrashResult:
    """Move model `title` (its whole folder) to a new trash entry; its source checkpoint is untouched.

    Raises ModelNotFound, ManifestError (unreadable model), BusyError.
    """
    from .trash_results import ModelTrashResult

    try:
        model = ws.models[title]
    except ModelNotFound:
        done = _settle_removes(ws, title)  # a remove of it that stopped after the model went: finished now
        if done is None:
            raise
        return done
    storage = ws.storage
    folder = f"models/{title}"
    blobs = storage.list_prefix(folder + "/")
    links: dict[object, list[int]] = {}
    count_links(links, [b for b in blobs if b.key != f"{folder}/{MODEL_FILE}"])
    with _model_locks(ws, model.task):
        entry = create_entry(
            ws,
            lambda entry_id: Entry(
                id=entry_id,
                kind="model",
                task=model.task,
                state="pending",
                created=now_iso(),
                reason=reason or f"trash_model({title!r})",
                size=model.size,
                bytes=sum(size for n, nlink, size in links.values() if n >= nlink),
                model={"title": title, **{k: v for k, v in model.to_doc().items() if k != "format"}},
                folder=ws.root / "trash" / entry_id,
            ),
        )
        # 1. the entry record, 2. the folder into it (renamed; or copied, then 3. the model deleted, model.toml
        # first), 4. the entry complete: before 2 (or 3) the model is whole, after it the entry is
        try:
            left = storage.transfer(folder, f"trash/{entry.id}/{MODEL_DIR}", [""], exclude=OWN)
        except (FileNotFoundError, PreconditionFailed):
            delete_entry(ws, entry.id)
            raise ModelNotFound(f"model '{title}' was removed or renamed meanwhile", hint="see: ckpt models") from None
        if left:
            if storage.head(f"{folder}/{MODEL_FILE}") is None:  # another remove or rename won: this entry goes
                delete_entry(ws, entry.id)
                raise ModelNotFound(f"model '{title}' was removed or renamed meanwhile", hint="see: ckpt models")
            drop_model(ws, title, left)
        put_entry(ws, replace(entry, state="complete"))
    return ModelTrashResult(entry.id, model)


def _settle_removes(ws: Workspace, title: str) -> ModelTrashResult | None:
    """Settle the pending removes of model `title` (the model is gone from models/); the result of one that is
    complete now, as the remove run again reports it."""
    from .trash_results import ModelTrashResult

    found: ModelTrashResult | None = None
    for entry_id in ws.storage.children("trash/"):
        if not ENTRY_ID.fullmatch(entry_id):
            continue
        try:
            entry = read_entry(ws, entry_id)
        except CkptError:
            continue
        if entry.kind != "model" or entry.title != title or entry.state != "pending":
            continue
        settled = settle_model(ws, entry)
        if settled.state == "complete" and settled.model is not None:
            doc = {"format": FORMAT, **{k: v for k, v in settled.model.items() if k != "title"}}
            found = ModelTrashResult(settled.id, Model.from_doc(title, doc, Path("models") / title))
    return found


def settle_model(ws: Workspace, entry: Entry) -> Entry:
    """A "pending" model entry: finished when the model's record is gone (its copies are whole), else undone
    (on a store without locks, once stale: a younger one may be a remove still running elsewhere)."""
    try:
        with ws.exclusive("the trash", timeout=0):
            return _settle_model_locked(ws, entry)
    except BusyError:
        return entry


def _settle_model_locked(ws: Workspace, entry: Entry) -> Entry:
    storage = ws.storage
    title = entry.title or ""
    folder = f"models/{title}/"
    blobs = storage.list_prefix(folder)
    if any(b.key == folder + MODEL_FILE for b in blobs):
        if not storage.can_lock and is_young(entry.created):
            return entry
        delete_entry(ws, entry.id)
        return replace(entry, state="gone")
    # the record went. By this remove (its copies are whole: they came before the record went), or by another
    # one, run again after this one stopped: then this entry's copies are not all there, and it goes
    prefix = f"trash/{entry.id}/{MODEL_DIR}/"
    copied = {b.key[len(prefix) :] for b in storage.list_prefix(prefix)}
    weights = str((entry.model or {}).get("file", ""))
    whole = MODEL_FILE in copied and (weights in copied or any(k.startswith(weights + "/") for k in copied))
    if not whole or held_elsewhere(ws, entry):
        fresh = read_entry(ws, entry.id)
        if fresh.state != "pending":
            return fresh
        delete_entry(ws, entry.id)
        return replace(entry, state="gone")
    # what is left of the folder is this model's, unless a new promote claimed the title after this remove
    # freed it (its claim is then younger than the entry)
    if blobs and _claim_time(ws, title) <= entry.created:
        drop_model(ws, title, [b.key for b in blobs])
    done = replace(entry, state="complete")
    put_entry(ws, done)
    return done


def drop_model(ws: Workspace, title: str, keys: list[str]) -> None:
    """Delete what is left of a model folder: its record first (it leaves every listing at once), its weights,
    its claim last (in a bucket the title stays taken until nothing of the folder is left)."""
    record, claim = f"models/{title}/{MODEL_FILE}", f"models/{title}/{CLAIM_FILE}"
    ws.storage.delete([record])
    ws.storage.delete([k for k in keys if k not in (record, claim)])
    ws.storage.delete([claim])


def _claim_time(ws: Workspace, title: str) -> str:
    """When the claim of `title` was last renewed ("" with no claim: a folder has none)."""
    try:
        data = ws.storage.get(f"models/{title}/{CLAIM_FILE}")[0]
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", "replace").partition("\n")[0].strip()


def _is_own(ws: Workspace, entry: Entry) -> bool:
    """Whether the model at `entry`'s title is the one `entry` holds (an interrupted restore put it back)."""
    try:
        data = ws.storage.get(f"models/{entry.title}/{MODEL_FILE}")[0]
    except FileNotFoundError:
        return False
    try:
        doc = parse_toml(data, Path("models") / str(entry.title) / MODEL_FILE)
    except CkptError:
        return False
    mine = entry.model or {}
    return all(doc.get(k) == mine.get(k) for k in ("created", "sha256", "task", "checkpoint"))


def restore_model(ws: Workspace, entry_id: str) -> Entry:
    """Claim the title again, put the model's files back (model.toml last), then the entry goes."""
    entry, etag = read_entry_tagged(ws, entry_id)
    title = entry.title or ""
    exists = ConflictError(
        f"model '{title}' exists again; restoring trash entry '{entry.id}' would overwrite it; nothing was changed",
        hint="rename that model first: ckpt models rename",
    )
    # the claim's token is the entry's id: an interrupted restore takes its own claim back at once
    with _model_locks(ws, entry.task), ws.title_lease(title, token=f"restore-{entry.id}", taken=exists) as renew:
        entry, etag = read_entry_tagged(ws, entry_id)
        if entry.state not in ("complete", "restoring"):
            raise ConflictError(f"trash entry '{entry_id}' is {entry.state}", hint="run: ckpt doctor")
        if entry.state != "restoring":
            etag = mark(ws, entry, "restoring", etag)
            entry = replace(entry, state="restoring")
            renew()
        storage = ws.storage
        record, prefix = f"models/{title}/{MODEL_FILE}", f"trash/{entry.id}/{MODEL_DIR}/"
        if not _is_own(ws, entry):
            if storage.head(record) is not None:
                raise exists
            if storage.head(prefix + MODEL_FILE) is None:
                raise IntegrityError(f"trash entry '{entry.id}' is missing its model record", hint="see: ckpt doctor")
            try:
                storage.transfer(f"trash/{entry.id}/{MODEL_DIR}", f"models/{title}", [""], last=MODEL_FILE, exclude=OWN)
            except PreconditionFailed:
                raise exists from None
        # else: an interrupted restore that had put everything back (model.toml comes last): only the entry is left
        delete_entry(ws, entry.id)
    return entry
