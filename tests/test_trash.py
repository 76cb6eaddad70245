"""The trash bin through the command line and the library: trash-unused, trash list/restore/empty, du, doctor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import trash
from ckpt.timeutil import parse_age
from ckpt.trash_entry import entry_bytes, with_state

from .conftest import make_task


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(task: ckpt.Task) -> dict[int, dict[str, Any]]:
    doc = tomllib.loads(task.manifest.read_text())
    return {r["number"]: r for r in doc.get("checkpoints", [])}


def numbers(run_json: Any, task: str = "unet") -> list[int]:
    return [c["number"] for c in run_json("list", task)]


def test_dry_run_explains_each_checkpoint_and_changes_nothing(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = make_task(ws, n=6)
    ws.promote("unet", 2, title="unet-2")
    before = task.manifest.read_bytes()
    data = run_json("trash-unused", "unet", "--keep-best", "1", "--metric", "loss", "--min", "--dry-run")
    assert data["entry"] is None
    assert data["trashed"] == [1, 3, 4, 5]
    assert {k["number"]: k["reason"] for k in data["kept"]} == {
        2: "model unet-2",
        6: "latest; keep-best 1 by loss (0.1667)",
    }
    assert data["bytes_freed_on_empty"] == 4 * 1000
    assert task.manifest.read_bytes() == before
    assert os.listdir(ws.trash_dir) == []
    table = run("trash-unused", "unet", "--dry-run")
    assert table.exit_code == 0, table.output
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert "trash" in lines["1"] and "unused" in lines["1"]
    assert "keep" in lines["2"] and "model unet-2" in lines["2"]
    assert "keep" in lines["6"] and "latest" in lines["6"]


def test_trash_unused_moves_unused_files_and_records(ws: ckpt.Workspace, run_json: Any) -> None:
    task = make_task(ws, n=8)
    ws.promote("unet", 3, title="unet-3")
    originals = {cp.number: (cp.sha256, records(task)[cp.number]) for cp in task.checkpoints}
    data = run_json("trash-unused", "unet", "--keep-last", "2", "--keep-best", "1", "--metric", "val_iou")
    assert data["trashed"] == [1, 2, 4, 5, 6]
    assert {k["number"] for k in data["kept"]} == {3, 7, 8}
    entry = data["entry"]
    assert numbers(run_json) == [3, 7, 8]
    folder = ws.trash_dir / entry
    for n in data["trashed"]:
        f = folder / "files" / f"checkpoints/{n:06d}.pt"
        assert sha(f) == originals[n][0]
        assert not (task.folder / f"checkpoints/{n:06d}.pt").exists()
    doc = tomllib.loads((folder / "entry.toml").read_text())
    assert doc["state"] == "complete" and doc["kind"] == "checkpoints" and doc["task"] == "unet"
    assert doc["reason"].startswith("ckpt trash-unused unet --keep-last 2")
    assert doc["checkpoints"] == [originals[n][1] for n in data["trashed"]]
    assert not task.pending_markers()
    # numbers are never reused: the next save gets 9
    assert ws.task("unet").save(b"new") == 9


def test_a_trashed_number_names_its_entry(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    make_task(any_ws, n=4)
    entry = run_json("trash-unused", "unet", "--keep-last", "1")["entry"]
    res = run("promote", "unet", "2", "--title", "u2")
    assert res.exit_code == 3, res.output
    assert f"task 'unet' has no checkpoint 2 (it has 4): it is in trash entry {entry}" in res.stderr
    assert f"ckpt trash restore {entry}" in res.stderr
    # the way back names the workspace as the user did
    where = str(any_ws.root) if not any_ws.remote else any_ws.url
    res = run("-w", where, "promote", "unet", "2", "--title", "u2")
    assert f"put it back: ckpt -w {where} trash restore {entry}" in res.stderr, res.stderr
    # a number never given says only what the task has
    res = run("promote", "unet", "9", "--title", "u9")
    assert res.exit_code == 3 and "trash" not in res.stderr, res.output


def test_latest_only_by_default_and_nothing_left_to_trash(ws: ckpt.Workspace, run_json: Any) -> None:
    make_task(ws, n=3)
    assert run_json("trash-unused", "unet")["trashed"] == [1, 2]
    again = run_json("trash-unused", "unet")
    assert again["entry"] is None and again["trashed"] == []
    assert again["kept"] == [{"number": 3, "reason": "latest"}]


def test_keep_rules_are_checked(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=3)
    r = run("trash-unused", "unet", "--keep-best", "2")
    assert r.exit_code == 2 and "--metric" in r.stderr
    r = run("trash-unused", "unet", "--keep-best", "2", "--metric", "nope")
    assert r.exit_code == 2 and "known metrics" in r.stderr
    r = run("trash-unused", "missing")
    assert r.exit_code == 3


def test_hard_linked_file_frees_nothing(ws: ckpt.Workspace, run_json: Any) -> None:
    make_task(ws, n=4)
    ws.promote("unet", 2, title="unet-2")
    run_json("models", "remove", "unet-2")  # the model's hard link now lives in the trash
    data = run_json("trash-unused", "unet", "--dry-run")
    assert data["trashed"] == [1, 2, 3]
    assert data["bytes_freed_on_empty"] == 2 * 1000


def test_restore_puts_back_identical_records_and_files(ws: ckpt.Workspace, run_json: Any) -> None:
    task = make_task(ws, n=5)
    before = records(task)
    shas = {cp.number: cp.sha256 for cp in task.checkpoints}
    entry = run_json("trash-unused", "unet")["entry"]
    listed = run_json("trash", "list")
    assert [set(e) for e in listed] == [
        {"id", "kind", "task", "checkpoints", "model", "size", "bytes_freed_on_empty", "created", "reason", "state"}
    ]
    assert listed[0]["checkpoints"] == [1, 2, 3, 4] and listed[0]["size"] == 4000 and listed[0]["model"] is None
    data = run_json("trash", "restore", entry)
    assert data == {"entry": entry, "kind": "checkpoints", "task": "unet", "checkpoints": [1, 2, 3, 4], "model": None}
    assert records(task) == before
    for cp in ws.task("unet").checkpoints:
        assert sha(task.path_of(cp)) == shas[cp.number]
    assert os.listdir(ws.trash_dir) == [".lock"] or os.listdir(ws.trash_dir) == []
    assert run_json("trash", "list") == []


def test_restore_refuses_to_overwrite_and_changes_nothing(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = make_task(ws, n=4)
    entry = run_json("trash-unused", "unet")["entry"]
    squatter = task.folder / "checkpoints" / "000002.pt"
    squatter.write_bytes(b"someone else's file")
    manifest = task.manifest.read_bytes()
    r = run("trash", "restore", entry)
    assert r.exit_code == 4, r.output
    assert "000002.pt" in r.stderr and "nothing was changed" in r.stderr
    assert squatter.read_bytes() == b"someone else's file"
    assert task.manifest.read_bytes() == manifest
    assert sorted(os.listdir(ws.trash_dir / entry / "files" / "checkpoints")) == [
        "000001.pt",
        "000002.pt",
        "000003.pt",
    ]
    assert run_json("trash", "list")[0]["state"] == "complete"
    # a number back in the manifest is refused too
    squatter.unlink()
    doc = tomllib.loads(task.manifest.read_text())
    doc["checkpoints"].append({**tomllib.loads((ws.trash_dir / entry / "entry.toml").read_text())["checkpoints"][0]})
    from ckpt.manifest import dumps

    task.manifest.write_bytes(dumps(doc))
    r = run("trash", "restore", entry)
    assert r.exit_code == 4 and "checkpoint 1 is in the manifest" in r.stderr


def test_unknown_entry(ws: ckpt.Workspace, run: Any) -> None:
    assert run("trash", "restore", "20240101-000000-abcdef").exit_code == 3
    assert run("trash", "restore", "../../etc").exit_code == 2
    assert run("trash", "empty", "20240101-000000-abcdef", "--yes").exit_code == 3


def test_empty_asks_without_terminal_and_reports_bytes(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    make_task(ws, n=4)
    entry = run_json("trash-unused", "unet")["entry"]
    r = run("trash", "empty")
    assert r.exit_code == 2 and "pass --yes" in r.stderr
    assert (ws.trash_dir / entry).is_dir()
    entry_toml = (ws.trash_dir / entry / "entry.toml").stat().st_size
    data = run_json("trash", "empty", "--yes")
    assert data["emptied"] == [entry]
    assert data["bytes_freed"] == 3 * 1000 + entry_toml
    assert not (ws.trash_dir / entry).exists()
    assert run_json("trash", "empty", "--yes")["emptied"] == []


def test_empty_by_id_and_age(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    make_task(ws, n=3)
    first = run_json("trash-unused", "unet")["entry"]
    ws.task("unet").save(b"x")
    ws.task("unet").save(b"y")
    second = run_json("trash-unused", "unet")["entry"]
    assert run_json("trash", "empty", "--older-than", "1d", "--yes")["emptied"] == []
    # make the first entry a week old
    path = ws.trash_dir / first / "entry.toml"
    text = path.read_text()
    created = tomllib.loads(text)["created"]
    path.write_text(text.replace(created, "2000-01-01T00:00:00+00:00"))
    assert run_json("trash", "empty", "--older-than", "7d", "--yes")["emptied"] == [first]
    assert run("trash", "empty", "--older-than", "soon", "--yes").exit_code == 2
    assert run_json("trash", "empty", second, "--yes")["emptied"] == [second]


def test_empty_never_follows_symlinks(ws: ckpt.Workspace, tmp_path: Path, run_json: Any) -> None:
    make_task(ws, n=3)
    entry = run_json("trash-unused", "unet")["entry"]
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep me")
    os.symlink(outside, ws.trash_dir / entry / "files" / "link-to-dir")
    os.symlink(outside / "data.bin", ws.trash_dir / entry / "files" / "link-to-file")
    run_json("trash", "empty", "--yes")
    assert (outside / "data.bin").read_bytes() == b"keep me"
    assert shutil.rmtree.avoids_symlink_attacks


def test_symlinked_checkpoint_is_never_moved(ws: ckpt.Workspace, tmp_path: Path, run_json: Any) -> None:
    task = make_task(ws, n=4)
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"weights kept elsewhere")
    link = task.folder / "checkpoints" / "000002.pt"
    link.unlink()
    os.symlink(outside, link)
    data = run_json("trash-unused", "unet")
    assert data["trashed"] == [1, 3]
    kept = {k["number"]: k["reason"] for k in data["kept"]}
    assert "symlink" in kept[2]
    assert os.path.islink(link) and outside.read_bytes() == b"weights kept elsewhere"
    run_json("trash", "empty", "--yes")
    assert outside.read_bytes() == b"weights kept elsewhere"


def test_symlinked_trash_folder_is_refused(ws: ckpt.Workspace, tmp_path: Path, run: Any) -> None:
    make_task(ws, n=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(ws.trash_dir)
    os.symlink(elsewhere, ws.trash_dir)
    r = run("trash-unused", "unet")
    assert r.exit_code == 6 and "symlink" in r.stderr
    assert os.listdir(elsewhere) == []
    assert len(ws.task("unet").checkpoints) == 3


def test_models_remove_and_restore(ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = make_task(ws, n=3)
    ws.promote("unet", 2, title="unet-2")
    model_toml = (ws.models_dir / "unet-2" / "model.toml").read_bytes()
    data = run_json("models", "remove", "unet-2")
    assert data["model"] == "unet-2" and data["task"] == "unet" and data["checkpoint"] == 2
    assert not (ws.models_dir / "unet-2").exists()
    assert sha(task.path_of(task.checkpoint(2))) == task.checkpoint(2).sha256  # source untouched
    listed = run_json("trash", "list")
    assert listed[0]["kind"] == "model" and listed[0]["model"] == "unet-2" and listed[0]["checkpoints"] is None
    # the title taken again: restore is refused
    ws.promote("unet", 1, title="unet-2")
    r = run("trash", "restore", data["entry"])
    assert r.exit_code == 4
    run_json("models", "rename", "unet-2", "other")
    run_json("trash", "restore", data["entry"])
    assert (ws.models_dir / "unet-2" / "model.toml").read_bytes() == model_toml
    assert ws.models["unet-2"].checkpoint == 2
    assert run("models", "remove", "nope").exit_code == 3


@pytest.mark.skipif(shutil.which("du") is None, reason="needs du")
def test_du_agrees_with_du(ws: ckpt.Workspace, run_json: Any) -> None:
    make_task(ws, n=5, size=20000)
    make_task(ws, name="other", n=2, size=5000)
    ws.promote("unet", 2, title="unet-2")
    run_json("trash-unused", "unet")
    data = run_json("du")
    assert set(data) == {"tasks", "by_task", "models", "trash", "other", "total"}
    assert data["tasks"] == sum(data["by_task"].values())
    assert data["total"] == data["tasks"] + data["models"] + data["trash"] + data["other"]
    real = int(subprocess.run(["du", "-s", "-B1", str(ws.root)], capture_output=True, text=True).stdout.split()[0])
    assert abs(data["total"] - real) <= 4096 * 8
    assert data["trash"] >= 3 * 20000 and data["models"] < 20000  # the model is a hard link: counted in its task


def test_doctor_cleans_stale_leftovers_only(ws: ckpt.Workspace, run_json: Any) -> None:
    task = make_task(ws, n=2)
    stale = task.folder / "checkpoints" / ".checkpoint.pt.abc123.tmp"
    fresh = task.folder / "checkpoints" / ".checkpoint.pt.def456.tmp"
    staging = ws.models_dir / ".staging-unet-x-1234abcd"
    for p in (stale, fresh):
        p.write_bytes(b"half")
    staging.mkdir()
    (staging / "000001.pt").write_bytes(b"half")
    old = time.time() - 2 * 3600
    for p in (stale, staging / "000001.pt", staging):
        os.utime(p, (old, old))
    dry = run_json("doctor", "--dry-run")
    assert dry["dry_run"] is True and len(dry["repairs"]) == 2
    assert stale.exists() and staging.exists()
    done = run_json("doctor")
    assert {r["path"] for r in done["repairs"]} == {
        ws.rel(stale),
        ws.rel(staging),
    }
    assert not stale.exists() and not staging.exists() and fresh.exists()
    assert run_json("doctor")["repairs"] == []
    assert len(ws.task("unet").checkpoints) == 2


def test_doctor_finishes_interrupted_empty(ws: ckpt.Workspace, run_json: Any) -> None:
    make_task(ws, n=3)
    entry = run_json("trash-unused", "unet")["entry"]
    os.rename(ws.trash_dir / entry, ws.trash_dir / f".deleting-{entry}")  # as if empty died after its rename
    assert run_json("trash", "list") == []
    repairs = run_json("doctor")["repairs"]
    assert repairs[0]["action"] == "deleted"
    assert not (ws.trash_dir / f".deleting-{entry}").exists()


def test_parse_age() -> None:
    assert parse_age("7d").total_seconds() == 7 * 86400
    assert parse_age("1.5h").total_seconds() == 5400
    with pytest.raises(ckpt.UsageError):
        parse_age("7 days")


def test_trash_commands_do_not_import_torch(ws: ckpt.Workspace, tmp_path: Path) -> None:
    make_task(ws, n=3)
    code = (
        "import sys\n"
        "from ckpt.cli import app\n"
        "for args in (['trash-unused','unet','--dry-run'],['trash-unused','unet'],['trash','list'],['du'],"
        "['doctor'],['trash','empty','--yes']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_library_api(ws: ckpt.Workspace) -> None:
    make_task(ws, n=5)
    plan = trash.trash_unused(ws, "unet", trash.KeepRules(keep_last=2), dry_run=True).plan
    assert plan.trashed == [1, 2, 3]
    res = trash.trash_unused(ws, "unet", trash.KeepRules(keep_last=2))
    assert res.entry is not None and res.plan.trashed == [1, 2, 3]
    entries, errors = trash.list_entries(ws)
    assert [e.id for e in entries] == [res.entry] and not errors
    assert entries[0].reason == "trash_unused('unet')"
    trash.restore(ws, res.entry)
    assert [cp.number for cp in ws.task("unet").checkpoints] == [1, 2, 3, 4, 5]
    json.dumps(trash.disk_use(ws).by_task)


def test_directory_checkpoints_move_whole(ws: ckpt.Workspace, tmp_path: Path, run_json: Any) -> None:
    from ckpt.hashing import hash_tree
    from ckpt.workspace import Incoming

    task = make_task(ws, n=1)
    hf = tmp_path / "hf-model"
    (hf / "sub").mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "sub" / "model.safetensors").write_bytes(os.urandom(3000))
    digest, size = hash_tree(hf)
    task.add_existing([Incoming(hf, "hf-model", size, digest, is_dir=True)], mode="copy")
    task.save(b"latest")
    data = run_json("trash-unused", "unet")
    assert data["trashed"] == [1, 2]
    assert data["bytes_freed_on_empty"] == 1000 + 2 + 3000
    moved = ws.trash_dir / data["entry"] / "files" / "checkpoints" / "000002"
    assert hash_tree(moved) == (digest, size)
    run_json("trash", "restore", data["entry"])
    assert hash_tree(task.folder / "checkpoints" / "000002") == (digest, size)


def test_entry_toml_fast_path_parses_like_tomli_w() -> None:
    from ckpt.manifest import Checkpoint, dumps

    odd = [
        Checkpoint(1, "checkpoints/000001.pt", 10, "ab" * 32, "2025-01-01T00:00:00+00:00", 5, 1, {"val_iou": 0.5}),
        Checkpoint(2, "checkpoints/000002.pt", 0, "x", "t", None, None, {}),
        Checkpoint(3, 'checkpoints/we"ird\\näme.pt', 1, "y", "t", -1, 2**40, {"loss": 1e-05, "big": 1e300}),
        Checkpoint(4, "checkpoints/4.pt", 1, "y", "t", metrics={"nan": float("nan"), "a.b": 1.0, "neg": -0.0}),
        Checkpoint(5, "checkpoints/5.pt", 1, "y", "t", metrics={"i": 3, "inf": float("-inf")}, original_name="é.ckpt"),
        Checkpoint(6, "checkpoints/6.pt", 2**62, "y", "t", metrics={"x-y_z": 12345678901234567.0}),
        Checkpoint(7, 'c/"', 1, "y", "t"),  # short and escaped: tomli-w alone would write it as an inline array
        Checkpoint(8, "checkpoints/8.pt", True, "y", "t", step=False, metrics={"flag": True}),  # bools are no ints
    ]
    entry = trash.Entry("20250101-000000-abcdef", "checkpoints", "unet", "pending", "t", "ckpt x 'y'", 1, 1, odd)
    fast = tomllib.loads(entry_bytes(entry).decode())
    slow = tomllib.loads(dumps(entry.to_doc()).decode())
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)  # NaN compares equal as text
    assert with_state(entry_bytes(entry), "pending", "complete").count(b'state = "complete"') == 1


def test_trash_unused_moves_files_of_several_folders(ws: ckpt.Workspace, run_json: Any) -> None:
    """A manifest another tool wrote: files in a sub-folder, at the top of the task, and a name pathlib rewrites."""
    task = make_task(ws, n=4)
    names = {1: "runs/a/000001.pt", 2: "000002.pt", 3: "checkpoints//000003.pt"}
    text = task.manifest.read_text()
    digests = {}
    for n, name in names.items():
        old = f"checkpoints/{n:06d}.pt"
        digests[n] = sha(task.folder / old)
        target = task.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (task.folder / old).rename(target)
        text = text.replace(f'file = "{old}"', f'file = "{name}"')
    task.manifest.write_text(text)
    data = run_json("trash-unused", "unet")
    assert data["trashed"] == [1, 2, 3] and data["bytes_freed_on_empty"] == 3000
    files = ws.trash_dir / data["entry"] / "files"
    for n, name in names.items():
        assert sha(files / name) == digests[n] and not (task.folder / name).exists()
    assert numbers(run_json) == [4]
    run_json("trash", "restore", data["entry"])
    assert numbers(run_json) == [1, 2, 3, 4]
    assert all(sha(task.folder / name) == digests[n] for n, name in names.items())


def test_mover_moves_into_a_new_folder_and_never_moves_a_name_twice(tmp_path: Path) -> None:
    """The Mover renames into a folder just made (a new trash entry's), through open folders."""
    from ckpt import fsutil

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    for rel in ("x", "y", "sub/z", "sub/w"):
        (src / rel).write_text(rel)
    with fsutil.Mover(src, dst) as mover:
        mover.move("x")
        mover.move_all(["sub/z", "sub/w", "y"])
        (src / "x").write_text("a new x")  # a file that appeared after the move: the Mover does not take it
        with pytest.raises(ckpt.ConflictError):
            mover.move("x")
        with pytest.raises(ckpt.ConflictError):
            mover.move_all(["x"])
        mover.sync()
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == ["sub/w", "sub/z", "x", "y"]
    assert all((dst / rel).read_text() == rel for rel in ("x", "y", "sub/z", "sub/w"))
    assert (src / "x").read_text() == "a new x" and not (src / "sub" / "z").exists()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_move_noreplace_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    from ckpt import fsutil

    if not renameat2:
        monkeypatch.setattr(fsutil, "_renameat2", lambda *a: False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (dst / "sub").mkdir(parents=True)
    for rel in ("sub/z", "sub/w"):
        (src / rel).write_text(rel)
    (dst / "sub" / "w").write_text("kept")
    with pytest.raises(ckpt.ConflictError):
        fsutil.move_noreplace(src / "sub" / "w", dst / "sub" / "w")
    src_fd, dst_fd = fsutil.open_folder(src / "sub"), fsutil.open_folder(dst / "sub")
    assert src_fd is not None and dst_fd is not None
    try:
        with pytest.raises(ckpt.ConflictError):
            fsutil.move_noreplace("w", "w", src_fd, dst_fd)
        fsutil.move_noreplace("z", "z", src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert (dst / "sub" / "w").read_text() == "kept" and (src / "sub" / "w").read_text() == "sub/w"
    assert (dst / "sub" / "z").read_text() == "sub/z" and not (src / "sub" / "z").exists()


def test_new_folders_of_a_trash_entry_are_made_durable_in_their_parents(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run_json: Any
) -> None:
    """Every folder trash-unused makes (the entry's, files/, files/checkpoints/) is fsynced in its parent
    before the first file moves: a crash cannot lose a folder that moved files are in."""
    from ckpt import fsutil

    make_task(ws, n=3)
    events: list[str] = []
    real_fsync_dir, real_rename = fsutil.fsync_dir, fsutil.rename_in
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: (events.append(f"fsync {p}"), real_fsync_dir(p))[1])
    monkeypatch.setattr(fsutil, "rename_in", lambda *a: (events.append("rename"), real_rename(*a))[1])
    data = run_json("trash-unused", "unet")
    entry = ws.trash_dir / data["entry"]
    first_move = events.index("rename")
    for parent in (ws.trash_dir, entry, entry / "files"):
        assert f"fsync {parent}" in events[:first_move], parent


def test_trash_list_is_oldest_first_within_one_second(ws: ckpt.Workspace) -> None:
    from ckpt.trash import KeepRules, list_entries, trash_unused

    task = ws.create_task("order")
    for i in range(6):
        task.save(f"w{i}".encode())
    made = []
    for keep in (4, 3, 2, 1, 0):  # five trash-unused within a second or so: ids share their time part
        made.append(trash_unused(ws, "order", KeepRules(keep_last=keep)).entry)
    entries, _ = list_entries(ws)
    assert [e.id for e in entries] == [m for m in made if m is not None] and len(entries) >= 4
