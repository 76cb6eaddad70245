"""A bucket's models: the lease of a title, the model index, and promote and rename as server-side copies."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import CkptError, ConflictError, IntegrityError, ModelNotFound
from .layout import CLAIM_FILE
from .manifest import Checkpoint, dumps, parse_toml
from .model_sources import Source, store_sources
from .models import MODEL_FILE, Model, ModelIndex, check_case_twin
from .names import check_title
from .storage import Blob, PreconditionFailed
from .store_cache import cache_dir
from .timeutil import now_iso, seconds_since
from .trash_entry import put_once
from .trash_models import drop_model

if TYPE_CHECKING:
    from .store import StoreWorkspace
    from .task_base import Task

MOVING_FILE = ".moving"  # in a model folder while a rename copies it (see _claim_source)
LEASE = 600.0  # seconds a title claim holds without being renewed (see Lease)


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
            seconds_since(holder[0]) < LEASE or self.storage.head(f"models/{self.title}/{MODEL_FILE}") is not None
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


def claim_held(data: bytes) -> bool:
    """Whether a title claim's bytes were renewed less than LEASE seconds ago (it may be in use)."""
    return seconds_since(_claim_lines(data)[0]) < LEASE


def make_model(ws: StoreWorkspace, task: Task, cp: Checkpoint, title: str) -> Model:
    check_case_twin(ws, title)
    # the title is claimed first (If-None-Match), so a losing racer never touches the winner's objects;
    # the weights are copied on the server, and model.toml comes last: a model never names missing weights
    lease = take_title(ws, title)
    src = PurePosixPath(task.path_of(cp)).as_posix()
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


def _model_keys(ws: StoreWorkspace, title: str) -> tuple[list[Blob], str | None]:
    """The objects of model folder `title` other than its claim, and the claim's key (None when absent)."""
    folder = f"models/{title}/"
    blobs = ws.storage.list_prefix(folder)
    claim = folder + CLAIM_FILE
    return [b for b in blobs if b.key != claim], claim if any(b.key == claim for b in blobs) else None


def move_model(ws: StoreWorkspace, model: Model, new: str) -> Model:
    old = model.title
    # the source is claimed first (If-None-Match on its `.moving`): of two renames of one model one wins, and
    # the other never copies it under a second title
    moving = _claim_source(ws, old)
    try:
        lease = take_title(ws, new, hint="choose another title")
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
    if seconds_since(held.decode("utf-8", "replace").strip()) < LEASE:
        raise busy
    try:
        put_once(ws.storage, key, body, if_match=etag)
    except PreconditionFailed:
        raise busy from None
    return key


def take_title(ws: StoreWorkspace, title: str, hint: str | None = None) -> Lease:
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
