"""The crash invariant of issue 16, checked the same way on every store (memory, folder, moto's S3 server).

A store's state is given as a snapshot: every file (object) of the workspace, by its '/'-separated key relative
to the root, and its bytes, read behind ckpt's back (no fault counted). `picture` says where each checkpoint
is and which records are broken; `check` compares two pictures; `done_as_reported` checks that what a command
said it did is so. The walks (tests/test_faults*.py) share the operations' names below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpt import hashing
from ckpt.manifest import TaskState, parse_task, parse_toml
from ckpt.store_log import log_prefix, number_of, parse_record
from ckpt.store_segments import decode, id_of, segment_key, segment_prefix
from ckpt.trash_entry import ENTRY_FILE, FILES_DIR, MODEL_DIR, entry_from_doc

Objects = Mapping[str, bytes]


def task_state(objs: Objects, name: str) -> TaskState:
    """Task `name`'s manifest with its segments and the log records it has not folded (a bucket's; a folder has
    neither)."""
    state = parse_task(objs[f"tasks/{name}/task.toml"], Path(name), name)
    for e in state.header.segments:  # a segment the root names and that is missing fails the test here
        key = segment_key(name, e[3])
        state.checkpoints.update(decode(objs[key], key, name, e))
    skip = set(state.header.folded) | state.checkpoints.keys()
    prefix = log_prefix(name)
    for k in sorted(objs):
        n = number_of(k, prefix) if k.startswith(prefix) else None
        if n is not None and n not in skip:
            state.checkpoints[n] = parse_record(objs[k], k, name, n)
    return state


def picture(objs: Objects) -> dict[str, Any]:
    """Where every checkpoint is, checking as it goes that no record names a missing or changed file."""
    where: dict[str, list[str]] = {}  # sha256 -> places ("task:unet", "trash:<id>"); "model:..." -> places
    models: dict[str, str] = {}
    problems: list[str] = []

    def tree_digest(prefix: str) -> str | None:
        if prefix in objs:
            return hashlib.sha256(objs[prefix]).hexdigest()
        inside = sorted(k for k in objs if k.startswith(prefix + "/"))
        if not inside:
            return None
        return hashing.tree_digest([(k[len(prefix) + 1 :], hashlib.sha256(objs[k]).hexdigest()) for k in inside])

    for key, data in sorted(objs.items()):
        parts = key.split("/")
        if parts[0] == "tasks" and parts[-1] == "task.toml" and len(parts) == 3:
            state = task_state(objs, parts[1])
            for cp in state.checkpoints.values():
                if tree_digest(f"tasks/{parts[1]}/{cp.file}") != cp.sha256:
                    problems.append(f"{key}: record {cp.number} names a missing or changed file")
                where.setdefault(cp.sha256, []).append(f"task:{parts[1]}")
        elif parts[0] == "trash" and parts[-1] == ENTRY_FILE and len(parts) == 3:
            entry = entry_from_doc(parse_toml(data, Path(key)), Path("trash") / parts[1])
            if entry.state != "complete":
                continue  # not restorable (pending, restoring, emptying): counted nowhere
            if entry.kind == "checkpoints":
                for cp in entry.checkpoints:
                    if tree_digest(f"trash/{entry.id}/{FILES_DIR}/{cp.file}") != cp.sha256:
                        problems.append(f"{key}: complete, but checkpoint {cp.number}'s copy is missing or changed")
                    where.setdefault(cp.sha256, []).append(f"trash:{entry.id}")
            else:
                assert entry.model is not None
                model = (entry.model["title"], entry.model["created"])
                where.setdefault(f"model:{model}", []).append(f"trash:{entry.id}")
                if f"trash/{entry.id}/{MODEL_DIR}/model.toml" not in objs:
                    problems.append(f"{key}: complete, but its model record is missing")
                digest = tree_digest(f"trash/{entry.id}/{MODEL_DIR}/{entry.model['file']}")
                if digest != entry.model["sha256"]:
                    problems.append(f"{key}: complete, but its model's weights are missing or changed")
        elif parts[0] == "models" and parts[-1] == "model.toml" and len(parts) == 3:
            doc = parse_toml(data, Path(key))
            if tree_digest(f"models/{parts[1]}/{doc['file']}") != doc["sha256"]:
                problems.append(f"{key}: names missing or changed weights")
            models[parts[1]] = str(doc["sha256"])
            where.setdefault(f"model:{(parts[1], doc['created'])}", []).append("models")
    return {"where": where, "models": models, "problems": problems}


def check(
    objs: Objects,
    before: dict[str, Any],
    *,
    may_go: set[str] = frozenset(),  # type: ignore[assignment]
    new: set[str] = frozenset(),  # type: ignore[assignment]
    models_move: bool = False,
) -> dict[str, Any]:
    """The invariant after the command and its re-run: each checkpoint of `before` is in exactly one place
    (one in `may_go` may also be gone: an empty), one in `new` at most once, each model (a title and its
    record's time) live or in one complete entry, at most once (gone or new when `models_move`: a rename
    or an empty), and no record is broken."""
    after = picture(objs)
    assert not after["problems"], after["problems"]
    for key in before["where"]:
        places = after["where"].get(key, [])
        if key in may_go or (key.startswith("model:") and models_move):
            assert len(places) <= 1, (key, places)
        else:
            assert len(places) == 1, (key, places)
    for key, places in after["where"].items():
        if not key.startswith("model:"):
            assert key in before["where"] or key in new, f"a checkpoint from nowhere: {key} {places}"
        assert len(places) == 1, (key, places)
    return after


def left_half_done(objs: Objects) -> list[str]:
    """Keys that say an operation is still half done once doctor ran: an entry not complete, a bucket title
    claim without its model, a segment its task's root does not name (left behind)."""
    out = []
    for key, data in objs.items():
        if key.startswith("trash/") and key.endswith("/" + ENTRY_FILE) and b'state = "complete"' not in data:
            out.append(key)
        if key.startswith("models/") and key.endswith("/.claim") and key.replace(".claim", "model.toml") not in objs:
            out.append(key)
        if key.startswith("tasks/") and "/segments/" in key:
            name = key.split("/")[1]
            header = parse_task(objs[f"tasks/{name}/task.toml"], Path(name), name).header
            if id_of(key, segment_prefix(name)) not in {e[3] for e in header.segments}:
                out.append(key)
    return out


# --- the operations the walks run, by name ---------------------------------------------------------------


def expected_new(op: str) -> set[str]:
    """The sha256 of the checkpoints `op` makes."""
    made = {"save": [b"the new one"], "import": [b"lightning 0", b"lightning 1"], "scan_add": [b"a stray file"]}
    got = made.get("save" if op.startswith("save") else op, [])
    return {hashlib.sha256(b).hexdigest() for b in got}


def done_as_reported(objs: Objects, op: str, result: Any, ctx: dict[str, Any]) -> None:
    """What a command that returned reported is so."""
    if op.startswith("save"):
        assert result in task_state(objs, "unet").checkpoints
    elif op == "promote":
        assert "models/best/model.toml" in objs
    elif op == "finish":
        state = task_state(objs, "unet")
        assert state.header.status == "finished" and result.model is not None
        assert f"models/{result.model.title}/model.toml" in objs
    elif op == "rename":
        assert "models/m2/model.toml" in objs and "models/m1/model.toml" not in objs
    elif op == "models_remove":
        assert "models/m1/model.toml" not in objs
        assert f"trash/{result.entry}/{ENTRY_FILE}" in objs
    elif op.startswith("trash_unused"):
        assert result.entry is None or f"trash/{result.entry}/{ENTRY_FILE}" in objs
    elif op.startswith("restore") and op != "restore_model":
        assert not any(k.startswith(f"trash/{ctx['entry']}/") for k in objs)
        assert len(task_state(objs, "unet").checkpoints) == 4
    elif op == "restore_model":
        assert "models/m1/model.toml" in objs
        assert not any(k.startswith(f"trash/{ctx['entry']}/") for k in objs)
    elif op == "empty":
        for entry_id in result.emptied:
            assert not any(k.startswith(f"trash/{entry_id}/") for k in objs)
    elif op == "scan_add":
        recorded = task_state(objs, "unet").checkpoints
        assert all(cp.number in recorded and recorded[cp.number].sha256 == cp.sha256 for cp in result.added)
        assert not result.added or "tasks/unet/step=50.pt" not in objs
    elif op == "import":
        recorded = task_state(objs, "lit").checkpoints
        assert all(r.number in recorded for r in result.rows if r.action == "added")
