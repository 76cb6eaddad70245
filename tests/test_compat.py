"""Workspaces written by ckpt as it was at commit 7cd0301 (tests/data/*-7cd0301: a folder, and a bucket's
objects) open and work unchanged: list, show, promote, restore, save, verify, doctor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import ckpt

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def old_ws(backend: str, tmp_path: Path) -> ckpt.Workspace:
    """The old workspace, copied into this test's folder or bucket prefix."""
    if backend.startswith("s3://"):
        src = DATA / "s3-7cd0301"
        from ckpt.storage import open_storage

        storage = open_storage(backend)
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            storage.put(path.relative_to(src).as_posix(), path.read_bytes())
    else:
        shutil.copytree(DATA / "ws-7cd0301", backend)
    return ckpt.Workspace.open(backend)


def test_an_old_workspace_works(old_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    tasks = {t["name"]: t for t in run_json("tasks")}
    assert tasks["unet"]["status"] == "finished" and tasks["unet"]["latest"] == 5
    rows = run_json("list", "unet")
    assert [(r["number"], r["models"]) for r in rows] == [(3, ["unet-3"]), (5, ["unet-5"])]
    assert run_json("list", "unet", "--sort", "val_loss")[0]["number"] == 5  # lower is better, by the name
    shown = run_json("show", "unet", "3")
    assert shown["sha256"] == rows[0]["sha256"] and shown["metrics"]["val_iou"] == pytest.approx(0.3)
    assert run_json("promote", "unet", "3", "--title", "unet-3")["unchanged"] is True
    entry = run_json("trash", "list")[0]
    assert entry["checkpoints"] == [1, 2, 4] and entry["state"] == "complete"
    assert run_json("trash", "restore", entry["id"])["checkpoints"] == [1, 2, 4]
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3, 4, 5]
    verify = run("verify", "--models")
    assert verify.exit_code == 0, verify.output
    small = ckpt.Workspace.open(old_ws.location).task("small")
    next_number = small.save(b"new weights", step=3, metrics={"val_loss": 0.5})
    assert next_number == (3 if old_ws.remote is False else 2)
    assert [r["number"] for r in run_json("list", "small")][-1] == next_number
    doctor = run("doctor", "--json")
    assert doctor.exit_code == 0, doctor.output
    assert json.loads(doctor.stdout)["repairs"] == []
