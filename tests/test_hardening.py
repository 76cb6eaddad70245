"""Hostile names, symlinks that leave the workspace, lock waits with a real (and a killed) holder, and the
consistency checks of `ckpt doctor`. Every command runs through the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import trash

from .conftest import make_task


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under `root` (links not followed): kind, size and mtime; what "nothing written" compares."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = "link" if os.path.islink(p) else "dir" if os.path.isdir(p) else "file"
            out[os.path.relpath(p, root)] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_error(result: Any, code: int) -> None:
    """The documented exit code and one `error:` line on stderr; never a traceback or an internal error."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stderr.startswith("error: "), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output


# --- hostile names ------------------------------------------------------------------------------------

HOSTILE = [
    "a/b",
    "../x",
    "..",
    ".",
    "a\\b",
    "a\0b",
    "a\nb",
    "unet\n",
    "x" * 10_000,
    "\u202eunet",  # right-to-left override
    "unet\u200f",  # right-to-left mark
    "",
    " unet",
    ".hidden",
    "tasks/../../etc",
]

# every command that takes a task name or a title; "NAME" is replaced by the hostile value
NAME_COMMANDS = [
    ["list", "NAME"],
    ["list", "NAME", "--json"],
    ["show", "NAME", "1"],
    ["finish", "NAME"],
    ["finish", "unet", "--title", "NAME"],
    ["promote", "NAME", "1", "--title", "ok"],
    ["promote", "unet", "1", "--title", "NAME"],
    ["promote", "unet", "--best", "val_iou", "--title", "NAME"],
    ["trash-unused", "NAME"],
    ["trash-unused", "NAME", "--dry-run"],
    ["scan", "NAME"],
    ["scan", "NAME", "--add"],
    ["verify", "NAME"],
    ["import", "SRC", "--task", "NAME"],
    ["models", "show", "NAME"],
    ["models", "rename", "NAME", "ok"],
    ["models", "rename", "unet-1", "NAME"],
    ["models", "remove", "NAME"],
    ["trash", "restore", "NAME"],
    ["trash", "empty", "NAME", "--yes"],
]


def test_hostile_names_are_refused_and_nothing_is_written(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]
) -> None:
    make_task(ws, n=3, size=100)
    ws.promote("unet", 1, title="unet-1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "epoch=1-step=10.ckpt").write_bytes(b"weights")
    before = snapshot(tmp_path)
    tried = 0
    for name in HOSTILE:
        for template in NAME_COMMANDS:
            args = [str(src) if a == "SRC" else name if a == "NAME" else a for a in template]
            result = run(*args)
            # usage (2); the trash takes ids, not names: also 2; an empty title is "missing --title": 2
            assert_clean_error(result, 2)
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert len(result.stderr) < 400, "the message does not echo 10,000 characters"
            tried += 1
    assert snapshot(tmp_path) == before
    assert tried == len(HOSTILE) * len(NAME_COMMANDS)


def test_the_library_refuses_hostile_task_names(ws: ckpt.Workspace, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    for name in HOSTILE:
        with pytest.raises(ckpt.UsageError):
            ws.create_task(name)
        with pytest.raises(ckpt.UsageError):
            ws.task(name)
    assert snapshot(tmp_path) == before


def test_names_differing_only_in_case_are_refused(ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]) -> None:
    make_task(ws, "unet", n=2, size=100)
    ws.promote("unet", 1, title="best")
    before = snapshot(tmp_path / "ws")
    with pytest.raises(ckpt.ConflictError, match="only in case"):
        ws.create_task("UNet")
    assert_clean_error(run("promote", "unet", "2", "--title", "BEST"), 4)
    assert_clean_error(run("promote", "unet", "2", "-t", "bEsT"), 4)
    src = tmp_path / "run"
    src.mkdir()
    (src / "a.pt").write_bytes(b"x")
    assert_clean_error(run("import", str(src), "--task", "UNET"), 4)
    assert snapshot(tmp_path / "ws") == before
    # a model renamed to another case of its own title is fine; to another model's title in another case is not
    ws.promote("unet", 2, title="other")
    assert run("models", "rename", "best", "Best").exit_code == 0
    assert_clean_error(run("models", "rename", "other", "BEST"), 4)
    # finish chooses the next free title rather than one differing only in case
    ws.promote("unet", 1, title="UNET-2")
    result = run("finish", "unet", "--json")
    assert result.exit_code == 0, result.output
    assert "unet-2-2" in result.stdout


def test_tasks_differing_only_in_case_created_at_once_give_one_task(ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Two processes creating `runN` and `RUNn` at the same moment: one wins, the other gets a conflict."""
    script = (
        "import sys, time, ckpt\n"
        "ws = ckpt.Workspace.open(sys.argv[1])\n"
        "start = float(sys.argv[2])\n"
        "for i in range(12):\n"
        "    while time.time() < start + 0.25 * i: pass\n"
        "    name = f'run{i}' if sys.argv[3] == 'lower' else f'RUN{i}'\n"
        "    try:\n"
        "        ws.create_task(name)\n"
        "    except ckpt.ConflictError:\n"
        "        pass\n"
    )
    start = time.time() + 1.0
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(ws.root), repr(start), case]) for case in ("lower", "upper")
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    names = ckpt.Workspace.open(ws.root).task_names()
    for i in range(12):
        assert len([n for n in names if n.lower() == f"run{i}"]) == 1, names


# --- symlinks that leave the workspace -------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.pt").write_bytes(b"outside bytes" * 100)
    return d


def test_a_checkpoint_symlinked_outside(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    task = make_task(ws, n=4, size=100)
    target = outside / "precious.pt"
    digest = sha(target)
    path = task.path_of(task.checkpoint(2))
    path.unlink()
    path.symlink_to(target)
    result = run("list", "unet")
    assert result.exit_code == 0 and "checkpoint 2 is reached through symlink" in result.stderr
    assert_clean_error(run("promote", "unet", "2", "--title", "x"), 6)
    result = run("trash-unused", "unet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trashed"] == [1, 3] and path.is_symlink()
    entry = trash.list_entries(ckpt.Workspace.open(ws.root))[0][0]
    assert run("trash", "restore", entry.id).exit_code == 0
    assert run("trash", "empty", "--yes").exit_code == 0
    assert path.is_symlink() and sha(target) == digest and os.listdir(outside) == ["precious.pt"]


def test_a_checkpoints_folder_symlinked_outside(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    task = make_task(ws, n=3, size=100)
    cdir = task.folder / "checkpoints"
    for p in cdir.iterdir():
        os.replace(p, outside / p.name)
    cdir.rmdir()
    cdir.symlink_to(outside)
    before = snapshot(outside)
    # a linked checkpoints/ is one of the workspace's own paths: every command refuses it, naming it (exit 6)
    for args in (["list", "unet"], ["promote", "unet", "1", "--title", "x"], ["trash-unused", "unet"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "tasks/unet/checkpoints' is a symlink" in result.stderr
    with pytest.raises(ckpt.IntegrityError, match="symlink"):
        ckpt.Workspace.open(ws.root).task("unet").save(b"x")
    assert snapshot(outside) == before


def test_a_task_folder_symlinked_outside(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    other = ckpt.Workspace.init(outside / "ws2")
    make_task(other, "far", n=3, size=100)
    (ws.tasks_dir / "far").symlink_to(other.tasks_dir / "far")
    before = snapshot(outside)
    for args in (["list", "far"], ["trash-unused", "far"], ["promote", "far", "1", "-t", "x"], ["show", "far", "1"]):
        result = run(*args)
        assert_clean_error(result, 6)
        assert "'tasks/far' is a symlink" in result.stderr
    result = run("tasks")  # the others are listed; the link is reported
    assert "'tasks/far' is a symlink" in result.stderr
    assert run("trash", "empty", "--yes").exit_code == 0
    assert snapshot(outside) == before


def test_trash_entries_pointing_outside(ws: ckpt.Workspace, outside: Path, run: Callable[..., Any]) -> None:
    task = make_task(ws, n=3, size=100)
    entry_id = trash.trash_unused(ws, "unet").entry
    assert entry_id is not None
    # 1. an entry folder that is a link to a copy outside
    fake = "20200101-000000-abcdef"
    decoy = outside / "decoy"
    decoy.mkdir()
    (decoy / "entry.toml").write_bytes((ws.trash_dir / entry_id / "entry.toml").read_bytes())
    (ws.trash_dir / fake).symlink_to(decoy)
    # 2. the files/ folder of a real entry swapped for a link to a folder outside holding the same names
    real_files = ws.trash_dir / entry_id / "files"
    moved = outside / "files"
    os.replace(real_files, moved)
    real_files.symlink_to(moved)
    before = snapshot(outside)
    result = run("trash", "list")
    assert result.exit_code == 0 and f"trash entry '{fake}' is a symlink" in result.stderr
    assert_clean_error(run("trash", "restore", fake), 6)
    assert_clean_error(run("trash", "restore", entry_id), 6)
    assert snapshot(outside) == before
    assert [cp.number for cp in task.checkpoints] == [3]
    result = run("trash", "empty", "--yes")
    assert result.exit_code == 0, result.output
    assert snapshot(outside) == before  # the links went, never what they point at
    assert not os.path.lexists(ws.trash_dir / entry_id)


# --- lock waits -----------------------------------------------------------------------------------------

HOLDER = """
import sys, time
import ckpt
task = ckpt.Workspace.open(sys.argv[1]).task("unet")
with task.lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def _hold(ws: ckpt.Workspace, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_wait_ends_with_exit_5_naming_the_holder_and_a_killed_holder_frees_the_lock(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]
) -> None:
    make_task(ws, n=3, size=100)
    holder = _hold(ws, tmp_path)
    try:
        t0 = time.monotonic()
        result = run("--wait", "0.3", "trash-unused", "unet")
        waited = time.monotonic() - t0
        assert_clean_error(result, 5)
        assert f"pid {holder.pid}" in result.stderr and "holder.py" in result.stderr, result.stderr
        assert "--wait" in result.stderr
        assert "gave up after waiting 0.3 s" in result.stderr  # the wait asked for, not the default 30 s
        assert waited >= 0.3
        os.environ["CKPT_LOCK_TIMEOUT"] = "0.2"  # the environment form, when --wait is not given
        assert_clean_error(run("promote", "unet", "1", "-t", "m"), 5)
        # reading commands take no lock
        assert run("list", "unet").exit_code == 0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result = run("--wait", "0", "trash-unused", "unet")  # one try, no wait
        assert result.exit_code == 0, result.output  # the kernel dropped the dead holder's lock at once
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not (ws.tasks_dir / "unet" / ".lock.holder").exists()


def test_the_holder_file_is_written_while_held_and_removed_after(ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=1)
    from ckpt import locks

    with task.lock():
        text = locks.lock_holder(task.folder / ".lock")
        assert text is not None and f"pid {os.getpid()}" in text
    assert locks.lock_holder(task.folder / ".lock") is None


# --- doctor: records and files --------------------------------------------------------------------------


def test_doctor_cuts_an_incomplete_last_record(ws: ckpt.Workspace, run: Callable[..., Any], run_json: Any) -> None:
    task = make_task(ws, n=3, size=100)
    data = task.manifest.read_bytes()
    last = data.rfind(b"[[checkpoints]]")
    for cut_at in (last + 3, data.rfind(b"sha256") + 12, data.rfind(b"created") + 5):
        for tail in (b"", b"\0" * 50):
            task.manifest.write_bytes(data[:cut_at] + tail)
            assert_clean_error(run("list", "unet"), 6)
            assert "ckpt doctor" in run("list", "unet").stderr
            dry = run_json("doctor", "--dry-run")
            assert [r["action"] for r in dry["repairs"]] == ["would cut it off"]
            assert task.manifest.read_bytes() == data[:cut_at] + tail
            repairs = run_json("doctor")["repairs"]
            assert repairs[0]["action"].startswith("cut it off")
            assert repairs[1]["path"] == "tasks/unet/checkpoints/000003.pt"
            assert [c["number"] for c in run_json("list", "unet")] == [1, 2]
            # the file of the cut record is still there; the next save does not reuse its number
            assert (task.folder / "checkpoints" / "000003.pt").is_file()
    n = ckpt.Workspace.open(ws.root).task("unet").save(b"after")
    assert n == 4


def test_doctor_reports_missing_and_unrecorded_files(ws: ckpt.Workspace, run_json: Any) -> None:
    task = make_task(ws, n=4, size=100)
    ws.promote("unet", 4, title="m")
    task.path_of(task.checkpoint(2)).unlink()
    (task.folder / "checkpoints" / "stray.pt").write_bytes(b"stray")
    (ws.models_dir / "m" / "000004.pt").unlink()
    repairs = run_json("doctor")["repairs"]
    kinds = sorted(r["problem"] for r in repairs)
    assert any("checkpoint 2 of task 'unet' has no file" in k for k in kinds)
    assert any("no record of task 'unet' names" in k for k in kinds)
    assert any("model 'm' has no weights file" in k for k in kinds)
    assert [c["number"] for c in run_json("list", "unet")] == [1, 2, 3, 4]  # reported, not changed
    run_json("doctor", "--forget-missing")
    assert [c["number"] for c in run_json("list", "unet")] == [1, 3, 4]
    assert ckpt.Workspace.open(ws.root).task("unet").save(b"x") == 5
    assert (task.folder / "checkpoints" / "stray.pt").read_bytes() == b"stray"


# --- read-only commands after an interrupted trash -----------------------------------------------------


@pytest.mark.parametrize("command", ["list", "show"])
def test_read_only_commands_finish_an_interrupted_trash_first(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any], command: str
) -> None:
    """After a trash-unused that failed at any step, `list` and `show` see records and files that agree."""
    from .test_trash_crash import Injector, check_consistent, originals

    task = make_task(ws, n=5, size=300)
    ws.promote("unet", 2, title="unet-2")
    template = ws.root.parent / "template"
    shutil.copytree(ws.root, template, symlinks=True)
    cps = originals(task)
    interrupted = 0
    for at in range(1, 9):
        root = ws.root.parent / f"{command}-{at}"
        shutil.copytree(template, root, symlinks=True)
        with monkeypatch.context() as m:
            inj = Injector(m, at, sticky=True)
            with contextlib.suppress(OSError):
                trash.trash_unused(ckpt.Workspace.open(root), "unet")
            inj.active = False
        interrupted += any(p.name.startswith(".pending-") for p in (root / "tasks" / "unet").iterdir())
        if command == "list":
            result = run("-w", str(root), "list", "unet", "--json")
            assert result.exit_code == 0, result.output
            listed = [row["path"] for row in json.loads(result.stdout)]
        else:
            result = run("-w", str(root), "show", "unet", "1", "--json")
            assert result.exit_code in (0, 3), result.output  # 3: checkpoint 1 went to the trash
            listed = [json.loads(result.stdout)["path"]] if result.exit_code == 0 else []
        for rel in listed:
            assert (root / rel).is_file(), f"{command} showed {rel}, whose file is not in the task"
        check_consistent(root, "unet", cps)
    assert interrupted >= 3  # the failures left markers that only the read command cleared


def test_a_file_where_a_folder_belongs_is_a_clean_error(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]
) -> None:
    make_task(ws, n=3, size=100)
    folder = ws.root / "tasks" / "unet" / "checkpoints"
    shutil.rmtree(folder)
    folder.write_text("not a folder")

    def files() -> dict[str, tuple[str, int, int]]:  # derived caches (dot files) may be rewritten
        return {k: v for k, v in snapshot(ws.root).items() if v[0] != "dir" and not os.path.basename(k).startswith(".")}

    before = files()
    for args in (["trash-unused", "unet"], ["promote", "unet", "1", "-t", "m"], ["show", "unet", "1"]):
        result = run(*args)
        assert result.exit_code in (1, 3, 6), (args, result.output)
        assert_clean_error(result, result.exit_code)
    assert files() == before
