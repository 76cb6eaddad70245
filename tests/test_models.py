"""Models: promote, list, show, rename, finish; storage and races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import fsutil, hashing, placing

from .conftest import make_task

MODEL_KEYS = {"title", "task", "checkpoint", "metrics", "size", "created", "storage", "sha256"}


def test_promote_hardlink_and_models_json(run_json: Any, ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=5)
    data = run_json("promote", "unet", "3", "--title", "unet-3")
    assert data["title"] == "unet-3" and data["checkpoint"] == 3 and data["storage"] == "hardlink"
    src = task.path_of(task.checkpoint(3))
    dst = ws.root / data["path"]
    assert os.stat(src).st_ino == os.stat(dst).st_ino
    rows = run_json("models")
    assert len(rows) == 1 and MODEL_KEYS <= set(rows[0])
    assert rows[0]["sha256"] == task.checkpoint(3).sha256 and rows[0]["size"] == 1000
    listed = run_json("list", "unet")
    assert listed[2]["models"] == ["unet-3"] and listed[0]["models"] == []
    toml = (ws.models_dir / "unet-3" / "model.toml").read_text()
    assert 'task = "unet"' in toml and "checkpoint = 3" in toml and "sha256" in toml


def test_promote_best(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=5)
    r = run("promote", "unet", "--best", "val_iou", "--title", "best-iou")
    assert r.exit_code == 0, r.output
    assert "checkpoint 5" in r.stderr and "highest val_iou" in r.stderr
    assert run_json("models", "show", "best-iou")["checkpoint"] == 5
    data = run_json("promote", "unet", "--best", "loss", "--min", "--title", "best-loss")
    assert data["checkpoint"] == 5
    data = run_json("promote", "unet", "--best", "loss", "--max", "--title", "worst-loss")
    assert data["checkpoint"] == 1
    assert (data["direction"], data["direction_source"]) == ("max", "flag")
    r = run("promote", "unet", "--best", "nope", "--title", "x")
    assert r.exit_code == 2 and "val_iou" in r.stderr


def test_promote_best_of_a_task_without_checkpoints_is_not_found(run: Any, ws: ckpt.Workspace) -> None:
    ws.create_task("empty")
    r = run("promote", "empty", "--best", "val_iou", "--title", "x")
    assert r.exit_code == 3, r.output
    assert "task 'empty' has no checkpoints yet" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_promote_copy_is_verified(run_json: Any, ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=2)
    data = run_json("promote", "unet", "1", "--title", "copied", "--copy")
    assert data["storage"] == "copy"
    assert os.stat(ws.root / data["path"]).st_ino != os.stat(task.path_of(task.checkpoint(1))).st_ino
    assert hashing.sha256_file(ws.root / data["path"]) == data["sha256"]


def test_copy_of_changed_file_is_refused(run: Any, ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=2)
    task.path_of(task.checkpoint(1)).write_bytes(b"tampered")
    r = run("promote", "unet", "1", "--title", "bad", "--copy")
    assert r.exit_code == 6 and "sha256" in r.stderr
    assert not (ws.models_dir / "bad").exists()
    assert [p.name for p in ws.models_dir.iterdir()] == []


def test_promote_falls_back_to_copy_without_links(run_json: Any, ws: ckpt.Workspace, monkeypatch: Any) -> None:
    make_task(ws, n=1)

    def no_link(src: Path, dst: Path) -> None:
        raise OSError("links not supported")

    monkeypatch.setattr(placing, "link_new", no_link)
    data = run_json("promote", "unet", "1", "--title", "c")
    assert data["storage"] in ("reflink", "copy")
    assert not list(ws.models_dir.glob(".staging-*"))


def test_titles_validated_and_conflicts(run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    for bad in ["../x", ".hidden", "a/b", "x" * 101, "a b", "tab\t"]:
        r = run("promote", "unet", "1", "--title", bad)
        assert r.exit_code == 2, (bad, r.output)
    assert list(ws.models_dir.iterdir()) == []
    assert run("promote", "unet", "1", "--title", "m").exit_code == 0
    r = run("promote", "unet", "2", "--title", "m")
    assert r.exit_code == 4 and "already exists" in r.stderr
    assert ws.models["m"].checkpoint == 1
    r = run("promote", "unet", "9", "--title", "n")
    assert r.exit_code == 3 and "1–2" in r.stderr


def test_rename_keeps_source(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=2)
    run_json("promote", "unet", "1", "--title", "a")
    run_json("promote", "unet", "2", "--title", "b")
    r = run("models", "rename", "a", "b")
    assert r.exit_code == 4
    data = run_json("models", "rename", "a", "c")
    assert data["title"] == "c" and data["checkpoint"] == 1
    assert sorted(m["title"] for m in run_json("models")) == ["b", "c"]
    assert task.path_of(task.checkpoint(1)).is_file()
    assert run("models", "show", "a").exit_code == 3


def test_finish_title_rules(ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    ws.promote("unet", 1, title="unet-3")  # taken by another checkpoint
    from ckpt.models import finish

    res = finish(ws, "unet")
    assert res.model is not None and res.model.title == "unet-3-2" and res.model.checkpoint == 3
    again = finish(ws, "unet")  # finishing again makes nothing new
    assert again.model is not None and again.model.title == "unet-3-2"
    assert sorted(ws.models.titles()) == ["unet-3", "unet-3-2"]


def test_finish_empty_task(ws: ckpt.Workspace) -> None:
    ws.create_task("empty")
    assert ws.task("empty").finish() is None
    assert ws.task("empty").status == "finished"


def test_model_load_state_dict(ws: ckpt.Workspace) -> None:
    torch = pytest.importorskip("torch")
    task = ws.create_task("t")
    task.save({"w": torch.arange(6.0)})
    m = ws.promote("t", 1, title="m")
    assert torch.equal(m.load_state_dict()["w"], torch.arange(6.0))


_PROMOTE = """
import sys, ckpt
from ckpt.errors import CkptError
ws = ckpt.Workspace.open(sys.argv[1])
try:
    ws.promote("unet", int(sys.argv[2]), title="same")
    print("won")
except CkptError as e:
    print("lost", e.exit_code)
"""


def test_concurrent_promote_same_title_one_wins(ws: ckpt.Workspace) -> None:
    make_task(ws, n=4)
    for _ in range(3):
        if (ws.models_dir / "same").exists():
            fsutil.remove_tree(ws.models_dir / "same")
        procs = [
            subprocess.Popen([sys.executable, "-c", _PROMOTE, str(ws.root), str(n)], stdout=subprocess.PIPE, text=True)
            for n in (1, 2, 3, 4)
        ]
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(outs) == ["lost 4", "lost 4", "lost 4", "won"], outs
        model = ws.models["same"]
        assert model.sha256 == ws.task("unet").checkpoint(model.checkpoint).sha256
        assert not list(ws.models_dir.glob(".staging-*"))


def test_concurrent_promote_cli_processes(ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ckpt", "promote", "unet", str(n), "--title", "dup", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in (1, 2)
    ]
    results = [(p.wait(timeout=60), p.communicate()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 4], results
    winner = next(json.loads(out) for rc, (out, _) in results if rc == 0)
    assert ws.models["dup"].checkpoint == winner["checkpoint"]
