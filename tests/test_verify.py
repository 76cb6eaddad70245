"""ckpt verify and ckpt scan: missing, changed and unknown files; files a script wrote itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ckpt
from ckpt import hashing

from .conftest import make_task
from .test_import import hf_tree

PROBLEM_KEYS = {"kind", "path", "task", "number", "model", "expected", "actual", "note"}
VERIFY_KEYS = {"ok", "tasks", "models", "checked", "files", "bytes", "seconds", "problems", "temporary"}


def test_verify_clean_workspace(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    make_task(ws, "a", n=3)
    make_task(ws, "b", n=2)
    ws.promote("a", 2, title="a-2")
    res = run_json("verify", "--models")
    assert set(res) == VERIFY_KEYS
    assert res["ok"] is True and res["tasks"] == ["a", "b"] and res["models"] == ["a-2"]
    assert res["checked"] == 6
    assert res["files"] == 5 and res["bytes"] == 5000  # the model shares checkpoint 2's inode: read once
    r = run("verify")
    assert r.exit_code == 0 and "0 problems" in r.stderr


def test_verify_reports_missing_changed_unknown(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = make_task(ws, "a", n=4)
    ws.promote("a", 1, title="a-1", copy=True)
    os.unlink(task.path_of(task.checkpoint(2)))
    p3 = task.path_of(task.checkpoint(3))
    data = bytearray(p3.read_bytes())
    data[10] ^= 0xFF  # same size, one bit flipped
    p3.write_bytes(bytes(data))
    with open(task.path_of(task.checkpoint(4)), "ab") as f:
        f.write(b"x")
    (task.folder / "stray.pt").write_bytes(b"stray")
    (ws.models["a-1"].path).write_bytes(b"tampered")
    r = run("verify", "a", "--models", "--json")
    assert r.exit_code == 6
    import json

    res = json.loads(r.stdout)
    assert res["ok"] is False
    got = sorted((p["kind"], p["number"], p["model"]) for p in res["problems"])
    assert got == [
        ("changed", 1, "a-1"),
        ("changed", 3, None),
        ("changed", 4, None),
        ("missing", 2, None),
        ("unknown", None, None),
    ]
    assert all(set(p) == PROBLEM_KEYS for p in res["problems"])
    changed3 = next(p for p in res["problems"] if p["number"] == 3)
    assert changed3["expected"] == task.checkpoint(3).sha256 and changed3["actual"] == hashing.sha256_file(p3)
    r = run("verify", "a")
    assert r.exit_code == 6 and "missing" in r.stdout and "stray.pt" in r.stdout


def test_verify_directory_checkpoint(tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    out = hf_tree(tmp_path)
    run_json("import", str(out), "--task", "hf")
    res = run_json("verify", "hf")
    assert res["ok"] is True and res["files"] == 21
    # the source shares the inode (hard links): changing it in place changes the checkpoint, and verify says so
    state = out / "checkpoint-8" / "trainer_state.json"
    with open(state, "ab") as f:
        f.write(b" ")
    r = run("verify", "hf", "--json")
    assert r.exit_code == 6 and "checkpoints/000002" in r.stdout
    (ws.root / "tasks/hf/checkpoints/000003/extra.bin").write_bytes(b"new")
    r = run("verify", "hf", "--json")
    assert r.stdout.count('"changed"') == 2


def test_verify_unknown_task(ws: ckpt.Workspace, run: Any) -> None:
    r = run("verify", "nope")
    assert r.exit_code == 3


def test_scan_lists_and_adds(tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = make_task(ws, "a", n=2)
    (task.folder / "epoch=5-step=500-val_iou=0.8.ckpt").write_bytes(b"lightning")
    (task.folder / "model_12.pt").write_bytes(b"twelve")
    (task.folder / "notes.txt").write_text("hello")
    (task.folder / "checkpoints" / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    res = run_json("scan", "a")
    assert {u["path"]: u["addable"] for u in res["unknown"]} == {
        "tasks/a/epoch=5-step=500-val_iou=0.8.ckpt": True,
        "tasks/a/model_12.pt": True,
        "tasks/a/notes.txt": False,
    }
    assert [u["path"] for u in res["temporary"]] == ["tasks/a/checkpoints/.checkpoint.pt.abc123.tmp"]
    assert res["added"] == []
    res = run_json("scan", "a", "--add")
    assert [(c["number"], c["original_name"]) for c in res["added"]] == [
        (3, "epoch=5-step=500-val_iou=0.8.ckpt"),
        (4, "model_12.pt"),
    ]
    assert [u["path"] for u in res["unknown"]] == ["tasks/a/notes.txt"]
    cp3 = task.checkpoint(3)
    assert (cp3.step, cp3.epoch, cp3.metrics) == (500, 5, {"val_iou": 0.8})
    assert (task.folder / cp3.file).read_bytes() == b"lightning"
    assert not (task.folder / "model_12.pt").exists()
    again = run_json("scan", "a", "--add")
    assert again["added"] == [] and [u["path"] for u in again["unknown"]] == ["tasks/a/notes.txt"]
    r = run("verify", "a")
    assert r.exit_code == 6  # notes.txt is still unknown
    os.unlink(task.folder / "notes.txt")
    assert run("verify", "a").exit_code == 0  # a temporary file is not a problem


def test_scan_adds_a_numbered_file_left_without_record(ws: ckpt.Workspace, run_json: Any) -> None:
    """A crash between renaming a checkpoint into place and appending its record leaves 000003.pt: it comes back
    as checkpoint 3 (never recorded, so no number is reused)."""
    task = make_task(ws, "a", n=2)
    (task.folder / "checkpoints" / "000003.pt").write_bytes(b"orphan")
    res = run_json("scan", "a", "--add")
    assert [(c["number"], c["original_name"]) for c in res["added"]] == [(3, "checkpoints/000003.pt")]
    assert task.checkpoint(3).sha256 == hashing.sha256_file(task.folder / "checkpoints/000003.pt")
    assert task.save(b"next") == 4


def test_verify_reports_progress(ws: ckpt.Workspace) -> None:
    from ckpt.verify import verify

    make_task(ws, "a", n=4, size=3000)
    seen: list[tuple[int, int]] = []
    res = verify(ws, ["a"], progress=lambda n, total: seen.append((n, total)))
    assert res.ok and sum(n for n, _ in seen) == 12000 and {t for _, t in seen} == {12000}


def test_sha256_many_across_buffer_sizes(tmp_path: Path) -> None:
    """Empty and small files, files that fill the read buffer exactly or just overflow it, and files of many
    buffers hash right, on one thread and on several (the calling thread hashes too)."""
    import hashlib

    buf = hashing.HASH_BUFFER
    sizes = [0, 1, 4096, buf - 1, buf, buf + 1, 3 * buf, 3 * buf + 7, 7]
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    paths.append(tmp_path / "missing")
    for workers in (1, 2, 3):
        got = hashing.sha256_many(paths, workers=workers)
        assert got[:-1] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths[:-1]]
        assert isinstance(got[-1], FileNotFoundError)
