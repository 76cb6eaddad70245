"""`ckpt export` racing another export to the same --out, and killed by a hangup (issue 17 review)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import export as ex


def _task(ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save({f"t{i}": torch.randn(100) for i in range(5)}, tmp_path / "m.pt")
    ws.create_task("t").save_file(tmp_path / "m.pt")


@pytest.mark.parametrize("winner", ["full", "empty", "file"])
def test_a_shard_folder_export_that_loses_a_race_is_a_conflict(
    run: Any, ws: ckpt.Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    _task(ws, tmp_path)
    out = tmp_path / "race"
    real = ex._write_file

    def write_while_another_finishes(*args: Any, **kwargs: Any) -> int:
        if not os.path.lexists(out):  # the other export renames its folder into place meanwhile
            if winner == "file":
                out.write_bytes(b"theirs")
            else:
                out.mkdir()
                if winner == "full":
                    (out / "model.safetensors").write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_write_file", write_while_another_finishes)
    result = run("export", "t", "1", "--out", str(out), "--max-shard-size", "900")
    assert result.exit_code == 4 and f"'{out}' already exists" in result.output, result.output
    assert "doctor" not in result.output
    if winner == "full":
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    elif winner == "empty":
        assert list(out.iterdir()) == []  # an empty folder is not replaced either
    else:
        assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "race", "ws"]  # no .race.tmp-* left


_SIGNAL_MID_EXPORT = """
import os, signal, sys
from ckpt import export as ex
real = ex._write_file
def write_then_signal(*args, **kwargs):
    n = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed after the first shard
    return n
ex._write_file = write_then_signal
from ckpt.cli import main
sys.argv = ["ckpt", *sys.argv[1:]]
main()
"""


def test_a_hangup_during_export_leaves_no_partial_shards(ws: ckpt.Workspace, tmp_path: Path) -> None:
    _task(ws, tmp_path)
    args = ["export", "t", "1", "--out", str(tmp_path / "out"), "--max-shard-size", "900"]
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    res = subprocess.run([sys.executable, "-c", _SIGNAL_MID_EXPORT, *args], capture_output=True, text=True, env=env)
    assert res.returncode == 129 and res.stderr.strip() == "terminated", res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "ws"]


_KILLED_MID_EXPORT = """
import os, signal, sys
from ckpt import export as ex
real = ex._write_file
SIG = getattr(signal, sys.argv.pop())
def write_then_die(*args, **kwargs):
    n = real(*args, **kwargs)
    os.kill(os.getpid(), SIG)  # SIGKILL: nothing cleans up
    return n
ex._write_file = write_then_die
from ckpt.cli import main
sys.argv = ["ckpt", *sys.argv[1:]]
main()
"""


def _export_as_model_killed(ws: ckpt.Workspace, tmp_path: Path, signame: str) -> subprocess.CompletedProcess[str]:
    _task(ws, tmp_path)
    args = ["export", "t", "1", "--as-model", "m", signame]
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    return subprocess.run([sys.executable, "-c", _KILLED_MID_EXPORT, *args], capture_output=True, text=True, env=env)


def test_a_hangup_during_export_as_model_leaves_no_staging_folder(ws: ckpt.Workspace, tmp_path: Path) -> None:
    res = _export_as_model_killed(ws, tmp_path, "SIGHUP")
    assert res.returncode == 129 and res.stderr.strip() == "terminated", res.stderr
    assert [p.name for p in ws.models_dir.iterdir() if p.name.startswith(".staging-")] == []
    assert not (ws.models_dir / "m").exists()


def test_doctor_deletes_a_killed_export_as_models_staging_folder_once_stale(
    run_json: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    res = _export_as_model_killed(ws, tmp_path, "SIGKILL")
    assert res.returncode == -9, res.stderr
    (staging,) = [p for p in ws.models_dir.iterdir() if p.name.startswith(".staging-m-")]
    tree = sorted(staging.rglob("*")) + [staging]
    assert any(p.is_file() for p in tree)
    old = time.time() - 2 * 3600
    os.utime(staging, (old, old))  # the folder alone made old: a file in it was written just now
    repairs = run_json("doctor")
    assert staging.is_dir() and "may be in use" in json.dumps(repairs)
    for p in tree:  # age is the newest mtime of anything in it: all of it untouched for 2 hours
        os.utime(p, (old, old), follow_symlinks=False)
    repairs = run_json("doctor")
    assert not staging.exists() and "staging folder" in json.dumps(repairs)
