"""A hostile or damaged workspace (issue 15, points 1, 2, 3, 4, 7, 8, 11): links in the workspace's own paths,
names and paths read from files, poisoned caches, case twins racing, edits another tool makes.

Each test sets up the damage on real files, runs the commands the report ran, and checks the answer (exit 6
naming the thing, or the right result) and that nothing outside the workspace changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import trash, trash_models

from .conftest import make_task
from .test_hardening import assert_clean_error, sha, snapshot


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.pt").write_bytes(b"outside bytes" * 100)
    return d


def _link_folder(folder: Path, target: Path) -> None:
    """Move `folder`'s contents to `target` and put a link to `target` where `folder` was."""
    target.mkdir(exist_ok=True)
    for p in folder.iterdir():
        os.replace(p, target / p.name)
    folder.rmdir()
    folder.symlink_to(target)


# --- 1. the workspace's own paths are never followed through a link ----------------------------------------


def test_a_linked_models_folder_is_refused(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    make_task(ws, n=3, size=100)
    ws.promote("unet", 2, title="kept")
    _link_folder(ws.models_dir, outside / "models")
    before = snapshot(outside)
    digest = sha(outside / "models" / "kept" / "000002.pt")
    for args in (
        ["models", "remove", "kept"],
        ["trash", "empty", "--yes"],
        ["promote", "unet", "1", "--title", "new"],
        ["finish", "unet"],
        ["models", "rename", "kept", "other"],
        ["models"],
        ["list", "unet"],
    ):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "'models' is a symlink" in result.stderr, result.stderr
    assert snapshot(outside) == before and sha(outside / "models" / "kept" / "000002.pt") == digest


def test_a_linked_tasks_folder_is_refused(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    make_task(ws, n=3, size=100)
    _link_folder(ws.tasks_dir, outside / "tasks")
    before = snapshot(outside)
    for args in (["trash-unused", "unet"], ["trash", "empty", "--yes"], ["tasks"], ["doctor"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "'tasks' is a symlink" in result.stderr
    assert snapshot(outside) == before


def test_a_linked_task_folder_is_reported_and_never_entered(
    ws: ckpt.Workspace, outside: Path, run: Callable[..., Any], run_json: Callable[..., Any]
) -> None:
    other = ckpt.Workspace.init(outside / "ws2")
    make_task(other, "far", n=3, size=100)
    stale = other.tasks_dir / "far" / "checkpoints" / ".000009.pt.abc.tmp"
    stale.write_bytes(b"someone else's temp file")
    os.utime(stale, (1, 1))  # old: doctor removes such leftovers in the workspace's own folders
    (ws.tasks_dir / "far").symlink_to(other.tasks_dir / "far")
    before = snapshot(outside)
    result = run("tasks")
    assert result.exit_code == 0 and "'tasks/far' is a symlink" in result.stderr
    repairs = run_json("doctor")["repairs"]
    assert [r["path"] for r in repairs] == ["tasks/far"] and "symlink" in repairs[0]["problem"], repairs
    assert run_json("du")  # counts the link, never what it points at
    assert_clean_error(run("verify", "far"), 6)
    assert snapshot(outside) == before


def test_a_linked_task_manifest_takes_no_append(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    task = make_task(ws, n=2, size=100)
    victim = outside / "task.toml"
    os.replace(task.manifest, victim)
    task.manifest.symlink_to(victim)
    before = snapshot(outside)
    src = outside.parent / "run"
    src.mkdir()
    (src / "a.pt").write_bytes(b"a" * 50)
    for args in (["import", str(src), "--task", "unet"], ["list", "unet"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "'tasks/unet/task.toml' is a symlink" in result.stderr
    assert "'tasks/unet/task.toml' is a symlink" in run("tasks").stderr  # a listing reports it
    with pytest.raises(ckpt.IntegrityError, match="symlink"):
        ckpt.Workspace.open(ws.root).task("unet").save(b"x")
    with pytest.raises(ckpt.IntegrityError, match="symlink"):
        task.save(b"x")  # a Task opened before the link appeared checks again before writing
    assert snapshot(outside) == before
    assert not [p for p in (task.folder / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_linked_checkpoints_folder_takes_no_import(
    ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]
) -> None:
    task = make_task(ws, n=2, size=100)
    _link_folder(task.folder / "checkpoints", outside / "cps")
    before = snapshot(outside)
    src = outside.parent / "run"
    src.mkdir()
    (src / "a.pt").write_bytes(b"a" * 50)
    result = run("import", str(src), "--task", "unet")
    assert_clean_error(result, 6)
    assert "'tasks/unet/checkpoints' is a symlink" in result.stderr
    assert snapshot(outside) == before


@pytest.mark.parametrize("own", [".task.cache.json", ".task.list.cache", ".lock"])
def test_a_linked_cache_or_lock_file_is_refused(
    ws: ckpt.Workspace, outside: Path, run: Callable[..., Any], own: str
) -> None:
    task = make_task(ws, n=3, size=100)
    run("list", "unet", "--json")  # the caches exist
    (task.folder / own).unlink(missing_ok=True)
    (task.folder / own).symlink_to(outside / "precious.pt")
    before, digest = snapshot(outside), sha(outside / "precious.pt")
    for args in (["trash-unused", "unet"], ["list", "unet", "--json"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert f"'tasks/unet/{own}' is a symlink" in result.stderr
    assert snapshot(outside) == before and sha(outside / "precious.pt") == digest


def test_a_linked_model_folder_or_manifest_is_reported(
    ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]
) -> None:
    make_task(ws, n=3, size=100)
    ws.promote("unet", 1, title="m1")
    ws.promote("unet", 2, title="m2")
    _link_folder(ws.models_dir / "m1", outside / "m1")
    manifest = ws.models_dir / "m2" / "model.toml"
    os.replace(manifest, outside / "model.toml")
    manifest.symlink_to(outside / "model.toml")
    before = snapshot(outside)
    result = run("models")
    assert result.exit_code == 0 or result.exit_code == 6
    assert "'models/m1' is a symlink" in result.stderr and "'models/m2/model.toml' is a symlink" in result.stderr
    for title in ("m1", "m2"):
        for args in (["models", "show", title], ["models", "remove", title], ["models", "rename", title, "z"]):
            assert_clean_error(run(*args), 6)
    assert run("trash", "empty", "--yes").exit_code == 0
    assert snapshot(outside) == before


def test_a_linked_trash_entry_manifest_is_refused(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    make_task(ws, n=3, size=100)
    entry_id = trash.trash_unused(ws, "unet").entry
    assert entry_id is not None
    entry_toml = ws.trash_dir / entry_id / "entry.toml"
    os.replace(entry_toml, outside / "entry.toml")
    entry_toml.symlink_to(outside / "entry.toml")
    before = snapshot(outside)
    result = run("trash", "restore", entry_id)
    assert_clean_error(result, 6)
    assert "entry.toml' is a symlink" in result.stderr
    assert snapshot(outside) == before


def test_a_linked_workspace_file_is_refused(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    os.replace(ws.root / "ckpt.toml", outside / "ckpt.toml")
    (ws.root / "ckpt.toml").symlink_to(outside / "ckpt.toml")
    result = run("tasks")
    assert_clean_error(result, 6)
    assert "'ckpt.toml' is a symlink" in result.stderr


def test_a_trash_entry_with_two_records_of_one_file_is_refused(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    make_task(ws, n=4, size=100)
    entry_id = trash.trash_unused(ws, "unet").entry
    assert entry_id is not None
    entry_toml = ws.trash_dir / entry_id / "entry.toml"
    entry_toml.write_text(entry_toml.read_text().replace("checkpoints/000001.pt", "checkpoints/000002.pt"))
    result = run("trash", "restore", entry_id)
    assert_clean_error(result, 6)
    assert "checkpoints 1 and 2 both name the file" in result.stderr and "drop-bad-records" not in result.stderr
    assert [cp.number for cp in ckpt.Workspace.open(ws.root).task("unet").checkpoints] == [4]


@pytest.mark.parametrize("own", ["task.toml", ".task.cache.json"])
def test_a_fifo_in_place_of_a_manifest_or_cache_never_blocks(
    ws: ckpt.Workspace, run: Callable[..., Any], own: str
) -> None:
    task = make_task(ws, n=2, size=100)
    (task.folder / own).unlink(missing_ok=True)
    os.mkfifo(task.folder / own)
    result = run("list", "unet")  # a blocking open would hang here
    if own == "task.toml":
        assert_clean_error(result, 6)
        assert "is a FIFO" in result.stderr
    else:  # a cache that cannot be read is dropped and written again
        assert result.exit_code == 0, result.output
        assert (task.folder / own).is_file()


def test_the_workspace_root_itself_may_be_a_link(ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]) -> None:
    make_task(ws, n=3, size=100)
    (tmp_path / "alias").symlink_to(ws.root)
    for args in (["list", "unet"], ["trash-unused", "unet"], ["promote", "unet", "3", "--title", "t"]):
        result = run("-w", str(tmp_path / "alias"), *args)
        assert result.exit_code == 0, result.output


# --- 2. names read from trash entries are checked as if typed ------------------------------------------------


@pytest.mark.parametrize("title", ["/abs/path", "../../x", "a/b", ".hidden", ""])
def test_a_trash_entry_naming_a_path_as_title_is_refused(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any], title: str
) -> None:
    make_task(ws, n=2, size=100)
    ws.promote("unet", 1, title="m")
    entry_id = trash_models.trash_model(ws, "m").entry
    entry_toml = ws.trash_dir / entry_id / "entry.toml"
    target = str(tmp_path / "escaped") if title == "/abs/path" else title
    text = entry_toml.read_text().replace('title = "m"', f"title = {json.dumps(target)}")
    assert text != entry_toml.read_text()
    entry_toml.write_text(text)
    before = snapshot(tmp_path)
    result = run("trash", "restore", entry_id)
    assert_clean_error(result, 6)
    assert "title" in result.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("task_name", ["../../x", "/abs", "a/b"])
def test_a_trash_entry_naming_a_path_as_task_is_refused(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any], task_name: str
) -> None:
    make_task(ws, n=3, size=100)
    entry_id = trash.trash_unused(ws, "unet").entry
    assert entry_id is not None
    entry_toml = ws.trash_dir / entry_id / "entry.toml"
    entry_toml.write_text(entry_toml.read_text().replace('task = "unet"', f"task = {json.dumps(task_name)}"))
    before = snapshot(tmp_path)
    result = run("trash", "restore", entry_id)
    assert_clean_error(result, 6)
    assert "not a valid task name" in result.stderr
    assert snapshot(tmp_path) == before


def test_a_model_manifest_naming_a_path_as_task_is_refused(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    make_task(ws, n=2, size=100)
    ws.promote("unet", 1, title="m")
    manifest = ws.models_dir / "m" / "model.toml"
    manifest.write_text(manifest.read_text().replace('task = "unet"', 'task = "../../x"'))
    result = run("models", "show", "m")
    assert_clean_error(result, 6)
    assert "not a valid task name" in result.stderr


# --- 3. two records naming one file --------------------------------------------------------------------------


def test_two_records_of_one_file_are_refused_and_doctor_mends_them(
    ws: ckpt.Workspace, run: Callable[..., Any], run_json: Callable[..., Any]
) -> None:
    task = make_task(ws, n=3, size=100)
    digest3 = sha(task.folder / "checkpoints" / "000003.pt")
    text = task.manifest.read_text()
    task.manifest.write_text(text.replace('file = "checkpoints/000001.pt"', 'file = "checkpoints/000003.pt"'))
    for args in (["trash-unused", "unet", "--dry-run"], ["trash-unused", "unet"], ["list", "unet"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "checkpoints 1 and 3 both name the file 'checkpoints/000003.pt'" in result.stderr
        assert "ckpt doctor" in result.stderr
    assert run("trash", "empty", "--yes").exit_code == 0
    assert sha(task.folder / "checkpoints" / "000003.pt") == digest3
    data = run_json("doctor", "--dry-run")
    assert any("names the file of checkpoint 3" in r["problem"] for r in data["repairs"]), data
    data = run_json("doctor", "--drop-bad-records")
    assert any(r["action"].startswith("dropped the record") for r in data["repairs"]), data
    assert any(r["path"] == "tasks/unet/checkpoints/000001.pt" for r in data["repairs"]), data  # now unrecorded
    assert [c["number"] for c in run_json("list", "unet")] == [2, 3]
    result = run_json("trash-unused", "unet")
    assert result["trashed"] == [2]
    assert sha(task.folder / "checkpoints" / "000003.pt") == digest3
    assert ckpt.Workspace.open(ws.root).task("unet").save(b"new") == 4  # numbers are never reused


def test_a_record_inside_another_records_folder_is_refused(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    task = make_task(ws, n=2, size=100)
    text = task.manifest.read_text()
    task.manifest.write_text(text.replace('file = "checkpoints/000001.pt"', 'file = "checkpoints/000002.pt/x"'))
    result = run("list", "unet")
    assert_clean_error(result, 6)
    assert "inside checkpoint 2's 'checkpoints/000002.pt'" in result.stderr


def test_an_appended_record_of_a_recorded_file_is_refused(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    """The incremental read (only the appended bytes parsed) checks the new record against the ones it had."""
    task = make_task(ws, n=2, size=100)
    assert run("list", "unet").exit_code == 0  # the cache holds records 1 and 2
    with open(task.manifest, "a") as f:
        f.write('\n[[checkpoints]]\nnumber = 3\nfile = "./checkpoints/000001.pt"\nsize = 1\nsha256 = "x"\n')
        f.write('created = "2026-01-01T00:00:00Z"\n')
    result = run("list", "unet")
    assert_clean_error(result, 6)
    assert "checkpoints 1 and 3 both name the file" in result.stderr


# --- 4. a poisoned cache is never trusted ------------------------------------------------------------------


def test_a_poisoned_task_cache_is_dropped_and_rebuilt(
    ws: ckpt.Workspace, outside: Path, run: Callable[..., Any], run_json: Callable[..., Any]
) -> None:
    task = make_task(ws, n=3, size=100)
    victim = outside / "victim.bin"
    victim.write_bytes(b"victim")
    run_json("list", "unet")
    cache = task.folder / ".task.cache.json"
    doc = json.loads(cache.read_bytes())
    rel = os.path.relpath(victim, task.folder)
    assert rel.startswith("..")
    doc["checkpoints"]["file"][0] = rel
    cache.write_text(json.dumps(doc))
    before = snapshot(outside)
    data = run_json("trash-unused", "unet")
    assert data["trashed"] == [1, 2]
    assert snapshot(outside) == before
    entry = trash.read_entry(ws, data["entry"])
    assert [cp.file for cp in entry.checkpoints] == ["checkpoints/000001.pt", "checkpoints/000002.pt"]
    run_json("list", "unet")
    rebuilt = json.loads(cache.read_bytes())
    assert rebuilt["checkpoints"]["file"] == ["checkpoints/000003.pt"]


@pytest.mark.parametrize(
    "poison",
    [
        lambda d: d["checkpoints"]["number"].__setitem__(0, True),
        lambda d: d["checkpoints"]["size"].__setitem__(0, "big"),
        lambda d: d["checkpoints"]["metrics"].__setitem__(0, {"loss": "low"}),
        lambda d: d["checkpoints"]["file"].__setitem__(0, "task.toml"),
        lambda d: d["checkpoints"]["file"].__setitem__(0, d["checkpoints"]["file"][1]),
        lambda d: d["header"].__setitem__("status", "evil"),
        lambda d: d["header"].__setitem__("name", "other"),
        lambda d: d.__setitem__("mtime", "now"),
    ],
)
def test_a_cache_with_a_value_no_manifest_may_hold_is_not_used(
    ws: ckpt.Workspace, run_json: Callable[..., Any], poison: Callable[[dict[str, Any]], None]
) -> None:
    task = make_task(ws, n=3, size=100)
    run_json("list", "unet")
    cache = task.folder / ".task.cache.json"
    doc = json.loads(cache.read_bytes())
    poison(doc)
    cache.write_text(json.dumps(doc))
    data = run_json("list", "unet")
    assert [c["path"] for c in data] == [f"tasks/unet/checkpoints/{n:06d}.pt" for n in (1, 2, 3)]
    assert ckpt.Workspace.open(ws.root).task("unet").status == "running"


@pytest.mark.parametrize("poison", [{"size": "big"}, {"latest_metrics": {"a": "b"}}, {"name": "x"}, {"extra": 1}])
def test_a_poisoned_summary_row_is_not_used(
    ws: ckpt.Workspace, run: Callable[..., Any], poison: dict[str, Any]
) -> None:
    make_task(ws, n=2, size=100)
    first = run("tasks")
    assert first.exit_code == 0
    cache = ws.tasks_dir / ".tasks.cache.json"
    doc = json.loads(cache.read_bytes())
    doc["tasks"]["unet"]["row"].update(poison)  # the key (the manifest's fingerprint) still matches
    cache.write_text(json.dumps(doc))
    (ws.tasks_dir / ".tasks.rows.cache.json").unlink(missing_ok=True)
    result = run("tasks")
    assert result.exit_code == 0 and result.stdout == first.stdout, result.output


# --- 7. case twins under races -----------------------------------------------------------------------------

_RACE = """
import sys, time, ckpt
ws = ckpt.Workspace.open(sys.argv[1])
start, kind, case = float(sys.argv[2]), sys.argv[3], sys.argv[4]
for i in range(8):
    while time.time() < start + 0.1 * i:
        pass
    title = f"sa{i}" if case == "lower" else f"SA{i}"
    try:
        if kind == "promote":
            ws.promote("unet", 1, title=title)
        else:
            ckpt.models.rename(ws, f"{case}{i}", title)
    except ckpt.ConflictError:
        pass
"""


@pytest.mark.parametrize("kind", ["promote", "rename"])
def test_case_twins_made_at_once_give_one_model(ws: ckpt.Workspace, kind: str) -> None:
    make_task(ws, n=1, size=100)
    if kind == "rename":
        for case in ("lower", "upper"):
            for i in range(8):
                ws.promote("unet", 1, title=f"{case}{i}")
    start = time.time() + 1.0
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(ws.root), repr(start), kind, case])
        for case in ("lower", "upper")
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    titles = ckpt.Workspace.open(ws.root).models.titles()
    for i in range(8):
        assert len([t for t in titles if t.casefold() == f"sa{i}"]) == 1, titles


def test_restoring_a_model_whose_title_has_a_case_twin_is_refused(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    make_task(ws, n=2, size=100)
    ws.promote("unet", 1, title="Sa1")
    entry_id = trash_models.trash_model(ws, "Sa1").entry
    ws.promote("unet", 2, title="sA1")
    result = run("trash", "restore", entry_id)
    assert_clean_error(result, 4)
    assert "only in case" in result.stderr
    assert ckpt.Workspace.open(ws.root).models.titles() == ["sA1"]
    assert trash.read_entry(ws, entry_id).state == "complete"


# --- 8. doctor brings back a task whose record names the task's own structure --------------------------------


@pytest.mark.parametrize("bad", ["./checkpoints", "checkpoints/", "checkpoints", "./", "checkpoints/."])
def test_a_record_naming_the_checkpoints_folder_is_mended_by_doctor(
    ws: ckpt.Workspace, run: Callable[..., Any], run_json: Callable[..., Any], bad: str
) -> None:
    task = make_task(ws, n=3, size=100)
    digests = {p.name: sha(p) for p in (task.folder / "checkpoints").iterdir()}
    text = task.manifest.read_text()
    task.manifest.write_text(text.replace('file = "checkpoints/000001.pt"', f"file = {json.dumps(bad)}"))
    for args in (["trash-unused", "unet"], ["list", "unet"], ["promote", "unet", "2", "-t", "x"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "ckpt doctor" in result.stderr
    assert {p.name: sha(p) for p in (task.folder / "checkpoints").iterdir()} == digests  # nothing moved
    assert run("doctor").exit_code == 0
    data = run_json("doctor", "--drop-bad-records")
    assert any("not the folder itself" in r["problem"] for r in data["repairs"]), data
    assert [c["number"] for c in run_json("list", "unet")] == [2, 3]
    assert run_json("scan", "unet", "--add")["added"]
    assert run_json("trash-unused", "unet")["trashed"] == [2, 3]
    assert run_json("doctor")["repairs"] == []


# --- 11. edits are seen ------------------------------------------------------------------------------------


def test_a_same_size_edit_in_place_is_seen(ws: ckpt.Workspace, run_json: Callable[..., Any]) -> None:
    task = make_task(ws, n=3, size=100)
    assert run_json("list", "unet")[1]["metrics"]["val_iou"] == 0.2  # the cache is written
    assert (task.folder / ".task.cache.json").exists()
    assert run_json("show", "unet", "2")["metrics"]["val_iou"] == 0.2
    data = task.manifest.read_bytes()
    at = data.index(b"val_iou = 0.2")
    assert 128 < at < len(data) - 64  # neither in the first nor in the last bytes a reader compares
    with open(task.manifest, "r+b") as f:
        f.seek(at)
        f.write(b"val_iou = 0.7")
    assert task.manifest.stat().st_size == len(data)
    assert run_json("show", "unet", "2")["metrics"]["val_iou"] == 0.7
    assert run_json("list", "unet")[1]["metrics"]["val_iou"] == 0.7
    assert ckpt.Workspace.open(ws.root).task("unet").checkpoint(2).metrics["val_iou"] == 0.7


def test_doctor_reports_records_a_rewrite_dropped(ws: ckpt.Workspace, run_json: Callable[..., Any]) -> None:
    """An editor's read-modify-write while a trainer saves: the records saved meanwhile are gone, their files stay."""
    task = make_task(ws, n=2, size=100)
    old = task.manifest.read_bytes()  # the editor reads...
    for _ in range(3):
        task.save(b"meanwhile")  # ...a trainer saves 3, 4, 5...
    tmp = task.folder / "task.toml.edit"
    tmp.write_bytes(old.replace(b"val_iou = 0.1", b"val_iou = 0.15"))
    os.replace(tmp, task.manifest)  # ...and the editor writes its copy back whole
    data = run_json("doctor")
    unrecorded = sorted(r["path"] for r in data["repairs"] if "no record" in r["problem"])
    assert unrecorded == [f"tasks/unet/checkpoints/00000{n}.pt" for n in (3, 4, 5)], data
    assert all("ckpt scan unet --add" in r["action"] for r in data["repairs"])
    assert [c["number"] for c in run_json("list", "unet")] == [1, 2]


# --- found by a user's attack after the fixes above -------------------------------------------------


@pytest.mark.parametrize(
    ("fifo", "args"),
    [
        ("tasks/unet/.lock.holder", ["promote", "unet", "1"]),
        ("tasks/unet/.lock.holder", ["doctor"]),
        ("trash/.lock.holder", ["models", "remove", "unet-1"]),
        ("tasks/unet/.importing-436c95a9cd7e", ["list", "unet"]),
        ("tasks/unet/.importing-436c95a9cd7e", ["trash-unused", "unet"]),
    ],
)
def test_a_fifo_among_ckpts_own_files_never_hangs(ws: ckpt.Workspace, fifo: str, args: list[str]) -> None:
    import subprocess
    import sys

    make_task(ws, n=3)
    ws.promote("unet", 1, title="unet-1")
    os.mkfifo(ws.root / fifo)
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "-w", str(ws.root), *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode in (0, 6), r.stderr
    assert "Traceback" not in r.stderr


def test_a_task_folder_that_lost_its_manifest_is_reported_and_recreated(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=3)
    (ws.root / "tasks" / "unet" / "task.toml").unlink()
    r = run("tasks")
    assert "tasks/unet has no task.toml" in r.stderr
    plan = json.loads(run("doctor", "--json").stdout)["repairs"]
    assert any(p["path"] == "tasks/unet" and "--recreate-manifests" in p["action"] for p in plan)
    assert run("doctor", "--recreate-manifests").exit_code == 0
    assert run("scan", "unet", "--add").exit_code == 0
    assert [r["number"] for r in json.loads(run("list", "unet", "--json").stdout)] == [1, 2, 3]


def test_trash_unused_refuses_when_a_model_cannot_be_read(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=3)
    ws.promote("unet", 1, title="m")
    with open(ws.models_dir / "m" / "model.toml", "a") as f:
        f.write("broken = [\n")
    r = run("trash-unused", "unet")
    assert r.exit_code == 6 and "nothing was trashed" in r.stderr
    assert [cp.number for cp in ckpt.Workspace.open(ws.root).task("unet").checkpoints] == [1, 2, 3]


def test_a_record_with_a_control_character_is_refused(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=2)
    manifest = ws.root / "tasks" / "unet" / "task.toml"
    manifest.write_text(manifest.read_text().replace('file = "checkpoints/000001.pt"', 'file = "checkpoints/a\\nb"'))
    r = run("show", "unet", "2")
    assert r.exit_code == 6 and len(r.stderr.strip().splitlines()) == 1
