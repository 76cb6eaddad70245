"""Crash safety of the trash: failures injected after each step, SIGKILL of real `ckpt` processes at
random moments, and a real training process saving while trash-unused runs."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import fsutil, trash, trash_models

from .conftest import make_task

STEPS = (
    "atomic_write",
    "make_file_new",
    "move_noreplace",
    "rename_in",
    "remove_file",
    "make_dirs",
    "make_dirs_durably",
    "make_dir_new",
)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def originals(task: ckpt.Task) -> dict[int, tuple[str, str]]:
    return {cp.number: (cp.file, cp.sha256) for cp in task.checkpoints}


def entry_folders(root: Path) -> list[Path]:
    trash_dir = root / "trash"
    return sorted(p for p in trash_dir.iterdir() if trash.ENTRY_ID.fullmatch(p.name))


def check_nothing_lost(root: Path, task: str, cps: dict[int, tuple[str, str]]) -> None:
    """Right after a crash: every checkpoint's file is in its task or in the trash, once, byte-identical."""
    folder = root / "tasks" / task
    for number, (rel, digest) in cps.items():
        places = []
        for candidate in [folder / rel, *(e / "files" / rel for e in entry_folders(root))]:
            if candidate.is_file() and not candidate.is_symlink():
                assert sha(candidate) == digest, f"checkpoint {number} changed at {candidate}"
                places.append(candidate)
        assert len(places) == 1, f"checkpoint {number} found at {places}"


def check_consistent(root: Path, task: str, cps: dict[int, tuple[str, str]]) -> None:
    """After recovery: no markers, every entry complete, records and files agree, each checkpoint in one place."""
    check_nothing_lost(root, task, cps)
    folder = root / "tasks" / task
    assert not [p for p in folder.iterdir() if p.name.startswith(".pending-")]
    manifest = tomllib.loads((folder / "task.toml").read_text())
    in_task = {r["number"]: r for r in manifest.get("checkpoints", [])}
    files_in_task = {f"checkpoints/{p.name}" for p in (folder / "checkpoints").iterdir() if not p.name.endswith(".tmp")}
    assert files_in_task == {r["file"] for r in in_task.values()}
    seen = dict.fromkeys(in_task, "task")
    for entry in entry_folders(root):
        if not (entry / "entry.toml").exists():
            assert not [p for p in entry.rglob("*") if p.is_file() and not p.name.endswith(".tmp")], entry
            continue
        doc = tomllib.loads((entry / "entry.toml").read_text())
        assert doc["state"] == "complete", entry
        if doc["kind"] != "checkpoints":
            continue
        files = {p.relative_to(entry / "files").as_posix() for p in (entry / "files").rglob("*") if p.is_file()}
        assert files == {r["file"] for r in doc["checkpoints"]}
        for r in doc["checkpoints"]:
            assert r["number"] not in seen, f"checkpoint {r['number']} recorded twice"
            seen[r["number"]] = entry.name
    assert set(cps) <= set(seen)


class Injector:
    """Makes the `at`-th call of the fsutil steps raise (and every later one too when `sticky`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, sticky: bool):
        self.calls = 0
        self.at = at
        self.sticky = sticky
        self.fired = False
        self.active = True
        for name in STEPS:
            monkeypatch.setattr(fsutil, name, self._wrap(getattr(fsutil, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls += 1
                if self.calls == self.at + 1 or (self.sticky and self.calls > self.at):
                    self.fired = True
                    raise OSError(5, "injected failure")
            return fn(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("sticky", [False, True], ids=["once", "sticky"])
def test_failure_after_each_step_of_trash_unused(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, sticky: bool
) -> None:
    task = make_task(ws, n=5, size=300)
    ws.promote("unet", 2, title="unet-2")
    template = ws.root.parent / "template"
    shutil.copytree(ws.root, template, symlinks=True)
    cps = originals(task)
    at = 0
    while True:
        root = ws.root.parent / f"run-{at}"
        shutil.copytree(template, root, symlinks=True)
        w = ckpt.Workspace.open(root)
        with monkeypatch.context() as m:
            inj = Injector(m, at, sticky)
            try:
                trash.trash_unused(w, "unet")
            except OSError:
                pass
            inj.active = False
        check_nothing_lost(root, "unet", cps)
        if not sticky:
            check_consistent(root, "unet", cps)  # the failed command put things right itself
        # the next command that locks the task recovers
        with ckpt.Workspace.open(root).task("unet").lock():
            pass
        check_consistent(root, "unet", cps)
        numbers = [cp.number for cp in ckpt.Workspace.open(root).task("unet").checkpoints]
        assert numbers in ([1, 2, 3, 4, 5], [2, 5])
        if not inj.fired:
            assert numbers == [2, 5]
            break
        at += 1
    assert at >= 8  # marker, entry, dirs, 3 moves, manifest, complete, marker removal


@pytest.mark.parametrize("sticky", [False, True], ids=["once", "sticky"])
def test_failure_after_each_step_of_restore(ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, sticky: bool) -> None:
    task = make_task(ws, n=5, size=300)
    cps = originals(task)
    entry = trash.trash_unused(ws, "unet").entry
    assert entry is not None
    template = ws.root.parent / "template"
    shutil.copytree(ws.root, template, symlinks=True)
    at = 0
    while True:
        root = ws.root.parent / f"run-{at}"
        shutil.copytree(template, root, symlinks=True)
        w = ckpt.Workspace.open(root)
        with monkeypatch.context() as m:
            inj = Injector(m, at, sticky)
            try:
                trash.restore(w, entry)
            except OSError:
                pass
            inj.active = False
        check_nothing_lost(root, "unet", cps)
        trash.recover_trash(ckpt.Workspace.open(root))
        check_consistent(root, "unet", cps)
        numbers = [cp.number for cp in ckpt.Workspace.open(root).task("unet").checkpoints]
        # a restore that failed before its marker changed nothing; after it, recovery finishes it
        assert numbers in ([5], [1, 2, 3, 4, 5])
        if not inj.fired:
            assert numbers == [1, 2, 3, 4, 5]
            break
        at += 1
    assert at >= 6


def test_failure_while_removing_a_model(ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    make_task(ws, n=2)
    ws.promote("unet", 1, title="unet-1")
    for at in range(4):
        with monkeypatch.context() as m:
            Injector(m, at, sticky=True)
            with pytest.raises(OSError):
                trash_models.trash_model(ws, "unet-1")
        trash.recover_trash(ws)
        there = (ws.models_dir / "unet-1").is_dir()
        entries, _ = trash.list_entries(ws)
        assert [e.state for e in entries] == ([] if there else ["complete"])
        if not there:
            trash.restore(ws, entries[0].id)
        assert ws.models["unet-1"].checkpoint == 1


# --- SIGKILL of real processes ------------------------------------------------------------------------

# A real `ckpt`, whose file-system steps are optionally slowed down, that says "go" on stderr when its
# first step starts: the kill then lands at a random moment of the operation, not of Python's start-up.
SLOW_CKPT = """
import os, sys, time
import ckpt.fsutil as f
from ckpt.cli import main
delay = float(os.environ.get("SLOW_STEP", "0"))
started = []
for name in ("atomic_write", "move_noreplace", "rename_in", "remove_file", "make_dirs", "make_dirs_durably",
             "fsync_dir", "make_dir_new"):
    def step(*a, _fn=getattr(f, name), **k):
        if not started:
            started.append(1)
            sys.stderr.write("go\\n")
            sys.stderr.flush()
        if delay:
            time.sleep(delay)
        return _fn(*a, **k)
    setattr(f, name, step)
sys.argv = ["ckpt", *sys.argv[1:]]
main()
"""

KILL_RUNS = 60


def test_sigkill_at_random_moments(ws: ckpt.Workspace, tmp_path: Path, run: Any) -> None:
    rng = random.Random(int(os.environ.get("CKPT_TEST_SEED", "0")) or None)
    task = make_task(ws, n=6, size=200)
    ws.promote("unet", 2, title="unet-2")
    cps = originals(task)
    trashed_template = tmp_path / "with-entry"
    shutil.copytree(ws.root, tmp_path / "fresh", symlinks=True)
    shutil.copytree(ws.root, trashed_template, symlinks=True)
    entry = trash.trash_unused(ckpt.Workspace.open(trashed_template), "unet").entry
    script = tmp_path / "slow_ckpt.py"
    script.write_text(SLOW_CKPT)
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_WORKSPACE", "PYTHONDONTWRITEBYTECODE")}
    outcomes = {"killed": 0, "finished": 0, "mid-operation": 0}
    for i in range(KILL_RUNS):
        restoring = i % 3 == 2
        root = tmp_path / f"kill-{i}"
        shutil.copytree(trashed_template if restoring else tmp_path / "fresh", root, symlinks=True)
        args = ["trash", "restore", str(entry)] if restoring else ["trash-unused", "unet"]
        slow = "0" if i % 5 == 4 else "0.003"  # every fifth run at full speed
        proc = subprocess.Popen(
            [sys.executable, str(script), "-w", str(root), *args],
            env={**env, "SLOW_STEP": slow},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        assert proc.stderr.readline() == b"go\n"
        time.sleep(rng.uniform(0, 0.05 if slow != "0" else 0.004))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        outcomes["killed" if proc.returncode == -signal.SIGKILL else "finished"] += 1
        check_nothing_lost(root, "unet", cps)
        if any(p.name.startswith(".pending-") for p in (root / "tasks" / "unet").iterdir()):
            outcomes["mid-operation"] += 1
        # the next command recovers: a doctor, another trash-unused, or a save (which takes the lock)
        match i % 3:
            case 0:
                r = run("-w", str(root), "doctor")
                assert r.exit_code == 0, r.output
            case 1:
                r = run("-w", str(root), "trash-unused", "unet")
                assert r.exit_code == 0, r.output
            case _:
                ckpt.Workspace.open(root).task("unet").save(b"after the crash")
        check_consistent(root, "unet", cps)
        shutil.rmtree(root)
    print(outcomes)
    assert outcomes["killed"] >= KILL_RUNS // 2, outcomes
    assert outcomes["mid-operation"] >= 5, outcomes  # the slowed steps make the kills land inside the operation


# --- a real writer saving while trash-unused runs --------------------------------------------------------

WRITER = """
import hashlib, os, sys, time
import ckpt
task = ckpt.Workspace.open(sys.argv[1]).task("unet")
for i in range(int(sys.argv[2])):
    data = os.urandom(300)
    n = task.save(data, step=i, metrics={"val_iou": (i * 7 % 11) / 10})
    print(n, hashlib.sha256(data).hexdigest(), flush=True)
    time.sleep(0.002)
"""


def test_trash_unused_while_a_writer_saves(ws: ckpt.Workspace, tmp_path: Path) -> None:
    task = make_task(ws, n=3, size=300)
    first = {cp.number: cp.sha256 for cp in task.checkpoints}
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen(
        [sys.executable, str(script), str(ws.root), "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    entries: list[str] = []
    rounds = 0
    while writer.poll() is None:
        other = ckpt.Workspace.open(ws.root)  # as another process would: its own reader
        res = trash.trash_unused(other, "unet", trash.KeepRules(keep_best=2, metric="val_iou"))
        rounds += 1
        if res.entry:
            entries.append(res.entry)
        if rounds % 4 == 0 and entries:
            trash.restore(other, entries.pop(0))  # restores race the writer too
        time.sleep(0.003)
    out, errs = writer.communicate()
    assert writer.returncode == 0, errs
    saved = dict(first)
    for line in out.splitlines():
        n, digest = line.split()
        assert int(n) not in saved, "a number was reused"
        saved[int(n)] = digest
    assert sorted(saved) == list(range(1, len(saved) + 1))
    print(f"{rounds} rounds, {len(saved)} checkpoints")
    assert rounds >= 3
    final = ckpt.Workspace.open(ws.root).task("unet")
    cps = {n: (f"checkpoints/{n:06d}.pt", d) for n, d in saved.items()}
    check_consistent(ws.root, "unet", cps)
    assert final.latest() is not None and final.latest().number == max(saved)  # type: ignore[union-attr]
