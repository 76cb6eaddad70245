"""What doctor and `scan --add` need in a bucket: objects nothing records, adopted or cleared once stale."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import hashing
from .errors import ManifestError
from .layout import CHECKPOINT_DIR, CLAIM_FILE, NUMBERS_DIR, TASK_FILE
from .manifest import Checkpoint, salvage_task, task_bytes
from .models import MODEL_FILE
from .storage import Blob, PreconditionFailed
from .store_log import LOG_DIR
from .store_models import claim_held
from .store_segments import SEGMENT_DIR
from .timeutil import now_iso, parse_iso, seconds_since
from .trash_entry import STALE_AFTER, STALE_PENDING
from .trash_models import drop_model

if TYPE_CHECKING:
    from .finders import Found
    from .importer import Unknown
    from .store import StoreWorkspace
    from .store_task import StoreTask
    from .task_base import Task
    from .trash_results import Repair


class Duplicate(Exception):
    """A record of the same bytes was committed meanwhile (see StoreTask.upload_numbered)."""


def keys_of(ws: StoreWorkspace, key: str) -> list[str]:
    """The keys of object `key`, or of the objects of folder checkpoint `key/` (from one LIST)."""
    return [b.key for b in ws.storage.list_prefix(key) if b.key == key or b.key.startswith(key + "/")]


def adopt_objects(task: StoreTask, candidates: list[Unknown]) -> tuple[list[Checkpoint], set[str]]:
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
        except Duplicate:
            # added by another scan meanwhile, or by this scan run before and stopped before it deleted the
            # original: a record made from this very object (same name, size and bytes) lets it go
            digest = _digest_of(ws, u)
            if any(
                (cp.original_name, cp.size, cp.sha256) == (c.name, u.size, digest)
                for cp in task.reload().checkpoints.values()
            ):
                ws.storage.delete([u.rel] if u.kind == "file" else keys_of(ws, u.rel))
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
    return hashing.tree_digest([(k[len(u.rel) + 1 :], ws.storage.sha256(k)) for k in keys])


def unknown_objects(ws: StoreWorkspace, task: Task) -> tuple[list[Unknown], list[Unknown]]:
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
        digest, size, ext = hashing.tree_digest(files), u.size, ""
    cp = Checkpoint(0, "", size, digest, now_iso(), c.step, c.epoch, dict(c.metrics), c.name, task.name)

    def copy(dst: str) -> None:
        ws.storage.copy_many([(k, dst + k[len(u.rel) :]) for k in keys])

    _, made = task.upload_numbered(cp, ext, copy, unique=True)
    ws.storage.delete(keys)
    return made


def unclaimed_models(ws: StoreWorkspace, dry_run: bool) -> list[Repair]:
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
        if CLAIM_FILE in names and claim_held(ws.storage.get(f"{rel}/{CLAIM_FILE}")[0]):
            repairs.append(Repair(rel, "a model folder without model.toml", "left alone: it may be in use"))
            continue
        what = "an interrupted promote (a model folder without model.toml)"
        repairs.append(Repair(rel, what, "would delete it" if dry_run else "deleted"))
        if not dry_run:
            drop_model(ws, title, [f"{rel}/{n}" for n in names if n != CLAIM_FILE])
    return repairs


def abort_stale_uploads(ws: StoreWorkspace, dry_run: bool) -> list[Repair]:
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


def bad_records(
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


def task_leftovers(task: StoreTask, dry_run: bool) -> tuple[list[Repair], set[str]]:
    """What saves left in a task: records in the log of a finished task (folded in), and objects under a number
    a save or import claimed and never recorded (deleted once stale); and the objects dealt with."""
    from .trash_results import Repair

    ws = task.ws
    repairs: list[Repair] = []
    state = task.state()
    if state.header.status != "running" and (task.unfolded or state.header.log):
        # a save that raced `finish` left its record in the log of a finished task: fold it (format 1 again)
        if not dry_run:
            task.update(lambda st: None)
        problem = f"task '{task.name}' is {state.header.status} with {len(task.unfolded)} records in its log"
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
    for u in unknown_objects(ws, task)[0]:
        if _claimed_number(task, u.rel, claimed) is not None and seconds_since(u.modified) >= STALE_PENDING:
            # under a number a save (import, scan --add) claimed, never recorded: one that stopped before its
            # commit. The same while it is still running on another machine: only a stale one goes
            what = f"an object of task '{task.name}' a save or import stopped before recording"
            repairs.append(Repair(u.rel, what, "would delete it" if dry_run else "deleted"))
            orphans += [u.rel] if u.kind == "file" else keys_of(ws, u.rel)
            dealt.add(u.rel)
    if orphans and not dry_run:
        ws.storage.delete(orphans)
    return repairs, dealt
