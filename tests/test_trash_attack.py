"""What an attack on the trash written once over ws.storage found, one test each: a full disk, a file where
trash/ belongs, damage doctor must report, entries edited or grown by hand, SIGTERM, and a restore racing an
empty."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import ckpt
import ckpt.task
from ckpt import placing, trash, trash_entry

from .conftest import make_task
from .test_trash_crash import SLOW_CKPT, check_consistent, originals


def test_a_full_disk_while_making_the_entry_names_the_file_and_leaves_nothing(
    ws: ckpt.Workspace, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_task(ws, n=4)

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write raises it: no file named

    monkeypatch.setattr(placing, "link_new", full)
    r = run("trash-unused", "unet")
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "/trash/" in r.stderr, r.stderr
    assert [p.name for p in ws.trash_dir.iterdir() if not p.name.startswith(".")] == []  # no entry folder left
    assert not [p for p in (ws.root / "tasks" / "unet").iterdir() if p.name.startswith(".pending-")]
    assert len(ws.task("unet").checkpoints) == 4


def test_a_file_where_trash_belongs_is_exit_6_with_a_way_out(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=2)
    shutil.rmtree(ws.trash_dir)
    ws.trash_dir.write_text("not ckpt's")
    for args in (["doctor"], ["list", "unet"], ["trash", "list"]):
        r = run(*args)
        assert r.exit_code == 6 and "is not a folder" in r.stderr and "move that file aside" in r.stderr, r.stderr
    ws.trash_dir.unlink()
    assert run("doctor").exit_code == 0 and ws.trash_dir.is_dir()


def test_doctor_reports_an_entry_whose_files_are_behind_a_link_and_a_file_named_as_an_entry(
    ws: ckpt.Workspace, run_json: Any, tmp_path: Path
) -> None:
    make_task(ws, n=3)
    entry = run_json("trash-unused", "unet")["entry"]
    files = ws.trash_dir / entry / "files" / "checkpoints"
    outside = tmp_path / "outside"
    files.rename(outside)
    files.symlink_to(outside)
    (ws.trash_dir / "20200101-000000-abcdef").write_text("a file, not an entry")
    repairs = {r["path"]: (r["problem"], r["action"]) for r in run_json("doctor")["repairs"]}
    problem, action = repairs[f"trash/{entry}"]
    assert "files/checkpoints' is a symlink" in problem and action.startswith("left alone")
    (ws.trash_dir / entry / "files" / "checkpoints").unlink()  # the files deleted by hand: the entry lacks them
    repairs = {r["path"]: (r["problem"], r["action"]) for r in run_json("doctor")["repairs"]}
    problem, action = repairs[f"trash/{entry}"]
    assert "lacks the files of 2 of its 2 checkpoint(s)" in problem
    assert action.startswith("left alone") and f"ckpt trash empty {entry}" in action
    assert any("is a file, not a trash entry's folder" in p for p, _ in repairs.values())
    assert sorted(p.name for p in outside.iterdir()) == ["000001.pt", "000002.pt"]  # never touched


def test_an_entry_edited_by_hand_says_how_to_get_rid_of_it(ws: ckpt.Workspace, run: Any) -> None:
    make_task(ws, n=3)
    entry = trash.trash_unused(ws, "unet").entry
    path = ws.trash_dir / str(entry) / "entry.toml"
    path.write_text(path.read_text().replace('state = "complete"', 'state = "weird"'))
    r = run("trash", "restore", str(entry))
    assert r.exit_code == 6
    assert "unknown state 'weird'" in r.stderr and "by hand" in r.stderr and "out of the workspace" in r.stderr


def test_an_entry_too_large_is_refused_before_it_is_parsed(
    ws: ckpt.Workspace, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_task(ws, n=3)
    entry = trash.trash_unused(ws, "unet").entry
    path = ws.trash_dir / str(entry) / "entry.toml"
    monkeypatch.setattr(trash_entry, "MAX_ENTRY_BYTES", path.stat().st_size + 10)
    with open(path, "a") as f:
        f.write("# " + "x" * 100 + "\n")
    r = run("trash", "restore", str(entry))
    assert r.exit_code == 6 and "more than any entry ckpt writes" in r.stderr
    listed = run("trash", "list")
    assert listed.exit_code == 0 and "more than any entry" in listed.stderr


def test_sigterm_during_trash_unused_unwinds_as_ctrl_c(ws: ckpt.Workspace, tmp_path: Path) -> None:
    task = make_task(ws, n=30, size=100)
    cps = originals(task)
    script = tmp_path / "slow_ckpt.py"
    script.write_text(SLOW_CKPT)
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_WORKSPACE", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.Popen(
        [sys.executable, str(script), "-w", str(ws.root), "trash-unused", "unet"],
        env={**env, "SLOW_STEP": "0.01"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    assert proc.stderr.readline() == b"go\n"
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read().decode()
    proc.wait()
    assert proc.returncode == 143 and "terminated" in err, (proc.returncode, err)
    # put right by the command itself: no marker, no pending entry, every checkpoint in one place
    check_consistent(ws.root, "unet", cps)


def test_a_restore_that_loses_to_an_empty_says_so(ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    make_task(ws, n=3)
    entry = trash.trash_unused(ws, "unet").entry
    assert entry is not None
    real = trash.locate

    def empty_meanwhile(storage: Any, base: str, cps: Any) -> Any:
        if base.startswith(f"trash/{entry}/"):  # the restore lists the entry's files: an empty runs first
            monkeypatch.setattr(trash, "locate", real)
            trash.empty(ckpt.Workspace.open(ws.root), trash.plan_empty(ckpt.Workspace.open(ws.root), [entry]))
        return real(storage, base, cps)

    monkeypatch.setattr(trash, "locate", empty_meanwhile)
    with pytest.raises(ckpt.errors.ConflictError, match="emptied or changed by another command meanwhile"):
        trash.restore(ckpt.Workspace.open(ws.root), entry)
    assert [cp.number for cp in ckpt.Workspace.open(ws.root).task("unet").checkpoints] == [3]


def test_doctor_dry_run_does_not_call_files_an_interrupted_trash_moved_missing(
    ws: ckpt.Workspace, run_json: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trash-unused killed after it moved its files, before its commit: the dry run says it would settle it,
    not that the records' files are missing (the real run puts them back)."""
    make_task(ws, n=4)

    class Killed(BaseException):
        pass

    def killed(self: Any, change: Any) -> Any:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(ckpt.task.FolderTask, "update", killed)
        with pytest.raises(Killed):
            trash.trash_unused(ckpt.Workspace.open(ws.root), "unet")
    dry = run_json("doctor", "--dry-run")["repairs"]
    assert not [r for r in dry if "has no file" in r["problem"]], dry
    assert [r["action"] for r in dry if ".pending-" in r["path"]] == ["would finish or undo it"]
    real = run_json("doctor")["repairs"]
    assert not [r for r in real if "has no file" in r["problem"]]
    assert run_json("doctor")["repairs"] == []
    assert len(ckpt.Workspace.open(ws.root).task("unet").checkpoints) == 4


KILLED_WHILE_PLACING = """
import os, signal, sys
import ckpt.adding
from ckpt.cli import main

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)  # a kill: no cleanup runs, the staged files stay staged

ckpt.adding._place_locked = die
sys.argv = ["ckpt", *sys.argv[1:]]
main()
"""


def _killed_run(tmp_path: Path, *args: str) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WHILE_PLACING)
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_WORKSPACE", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_an_import_run_again_after_a_kill_takes_every_file_in_one_run(
    ws: ckpt.Workspace, run_json: Any, tmp_path: Path
) -> None:
    src = tmp_path / "run"
    src.mkdir()
    for i in range(1, 7):
        (src / f"model_{i:04d}.pt").write_bytes(b"weights %d" % i)
    ws.create_task("x")
    _killed_run(tmp_path, "-w", str(ws.root), "import", str(src), "--task", "x", "--move")
    assert len(list(src.iterdir())) < 6  # the killed run had moved (staged) some of them
    again = run_json("import", str(src), "--task", "x", "--move")
    assert len(again["checkpoints"]) == 6 and list(src.iterdir()) == []
    assert len(ckpt.Workspace.open(ws.root).task("x").checkpoints) == 6
    assert run_json("doctor")["repairs"] == [] and run_json("verify")["ok"]


def test_scan_add_run_again_after_a_kill_takes_every_file_in_one_run(
    ws: ckpt.Workspace, run_json: Any, tmp_path: Path
) -> None:
    task = ws.create_task("a")
    for i in range(1, 7):
        (task.folder / "checkpoints" / f"epoch={i}-step={i * 10}.ckpt").write_bytes(b"weights %d" % i)
    _killed_run(tmp_path, "-w", str(ws.root), "scan", "a", "--add")
    again = run_json("scan", "a", "--add")
    assert len(again["added"]) == 6, again
    assert len(ckpt.Workspace.open(ws.root).task("a").checkpoints) == 6
    assert run_json("doctor")["repairs"] == [] and run_json("verify")["ok"]


def test_doctor_reports_a_model_folder_without_its_record(ws: ckpt.Workspace, run_json: Any) -> None:
    make_task(ws, n=2)
    (ws.models_dir / "ghost").mkdir()
    (ws.models_dir / "ghost" / "000001.pt").write_bytes(b"z")
    for args in (["doctor", "--dry-run"], ["doctor"]):
        repairs = run_json(*args)["repairs"]
        assert [(r["path"], r["action"][:10]) for r in repairs] == [("models/ghost", "left alone")]
        assert "title 'ghost' is taken" in repairs[0]["problem"]
    assert (ws.models_dir / "ghost" / "000001.pt").read_bytes() == b"z"


def test_an_unreachable_s3_endpoint_is_one_line_with_a_next_step(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    env = {
        **{k: v for k, v in os.environ.items() if k != "CKPT_WORKSPACE"},
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "-w", "s3://bkt/ws", "list", "a"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.startswith("error: cannot reach the S3 endpoint (http://127.0.0.1:9)")
        and "AWS_ENDPOINT_URL" in r.stderr
    )


def test_a_library_save_on_a_full_disk_is_a_write_error_naming_the_task(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt.errors import WriteError

    task = make_task(ws, n=2)

    def full(self: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write raises it: no file named

    monkeypatch.setattr(ckpt.fsutil.HashingWriter, "write", full)
    with pytest.raises(WriteError) as e:
        task.save(b"weights")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC  # still an OSError, for `except OSError`
    assert "cannot save to task 'unet': No space left on device (tasks/unet/checkpoints)" in str(e.value)
    assert "trash-unused" in (e.value.hint or "")
    assert sorted(p.name for p in (ws.root / "tasks/unet/checkpoints").iterdir()) == ["000001.pt", "000002.pt"]
    assert len(ckpt.Workspace.open(ws.root).task("unet").checkpoints) == 2


@pytest.mark.parametrize(
    ("code", "hint"), [(errno.ENOSPC, "ckpt trash-unused unet"), (errno.EROFS, "make the file system writable")]
)
def test_a_full_disk_at_the_record_of_a_save_is_a_write_error_and_leaves_nothing(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    from ckpt.errors import WriteError

    task = make_task(ws, n=2)
    real = ckpt.fsutil.make_file_new

    def full(path: Path, data: bytes = b"") -> None:
        real(path, b"")  # made, then the disk is full
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt.fsutil, "make_file_new", full)
    with pytest.raises(WriteError) as e:
        task.save(b"weights")
    assert "cannot save to task 'unet'" in str(e.value) and hint in (e.value.hint or "")
    monkeypatch.undo()
    assert not (ws.root / "tasks/unet/.saving.toml").exists()
    assert sorted(p.name for p in (ws.root / "tasks/unet/checkpoints").iterdir()) == ["000001.pt", "000002.pt"]
    assert ckpt.Workspace.open(ws.root).task("unet").save(b"next") == 3
