"""The library: workspace discovery, tasks, saving, manifests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import ckpt
from ckpt import fsutil
from ckpt.errors import ConflictError, ManifestError, UsageError, WorkspaceNotFound
from ckpt.workspace_base import find_workspace

from .conftest import make_task


def test_init_creates_layout(tmp_path: Path) -> None:
    ws = ckpt.Workspace.init(tmp_path / "runs")
    for sub in ("tasks", "models", "trash"):
        assert (ws.root / sub).is_dir()
    assert (ws.root / "ckpt.toml").read_text().startswith("format = 1")
    # init again opens the same workspace
    assert ckpt.Workspace.init(tmp_path / "runs").root == ws.root


def test_find_workspace_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = ckpt.Workspace.init(tmp_path / "a").root
    b = ckpt.Workspace.init(tmp_path / "b").root
    (b / "tasks" / "deep").mkdir(parents=True)
    monkeypatch.delenv("CKPT_WORKSPACE")
    assert find_workspace(None, cwd=b / "tasks" / "deep") == b.resolve()
    monkeypatch.setenv("CKPT_WORKSPACE", str(a))
    assert find_workspace(None, cwd=b / "tasks" / "deep") == a.resolve()
    assert find_workspace(str(b)) == b.resolve()
    monkeypatch.delenv("CKPT_WORKSPACE")
    with pytest.raises(WorkspaceNotFound, match="ckpt init"):
        find_workspace(None, cwd=tmp_path)


def test_save_numbers_files_and_records(ws: ckpt.Workspace) -> None:
    task = ws.create_task("unet", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2, "dropout": None})
    payload = b"weights" * 100
    assert task.save(payload, step=10, epoch=1, metrics={"val_iou": 0.5}) == 1
    assert task.save(payload + b"2", step=20) == 2
    cps = ws.task("unet").checkpoints
    assert [c.number for c in cps] == [1, 2]
    first = cps[0]
    path = task.path_of(first)
    assert path.name == "000001.pt" and path.read_bytes() == payload
    assert first.sha256 == hashlib.sha256(payload).hexdigest() and first.size == len(payload)
    assert first.metrics == {"val_iou": 0.5} and first.step == 10 and first.epoch == 1
    # keyword arguments round-trip exactly, None included
    reopened = ckpt.Workspace.open(ws.root).task("unet")
    assert reopened.header.arch_kwargs == {"classes": 2, "dropout": None}
    assert not list(path.parent.glob("*.tmp"))


def test_save_state_dict_and_file(ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    task = ws.create_task("t")
    n = task.save({"w": torch.ones(2, 3)}, step=1)
    loaded = torch.load(task.path_of(task.checkpoint(n)), weights_only=True)
    assert torch.equal(loaded["w"], torch.ones(2, 3))
    src = tmp_path / "external.safetensors"
    src.write_bytes(b"x" * 50)
    m = task.save_file(src, step=2, metrics={"loss": 0.1})
    cp = task.checkpoint(m)
    assert cp.file == "checkpoints/000002.safetensors" and cp.original_name == "external.safetensors"
    assert src.read_bytes() == b"x" * 50


def test_numbers_never_reused_and_orphans_skipped(ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=2)
    # a file without a record (crash after the rename): its number is not reused
    (task.folder / "checkpoints" / "000003.pt").write_bytes(b"orphan")
    assert task.save(b"new") == 4
    assert (task.folder / "checkpoints" / "000003.pt").read_bytes() == b"orphan"


def test_concurrent_appends_seen_by_other_reader(ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    other = ckpt.Workspace.open(ws.root).task("unet")
    assert len(other.checkpoints) == 3
    ws.task("unet").save(b"more")
    assert [c.number for c in other.checkpoints] == [1, 2, 3, 4]


def test_bad_names_write_nothing(ws: ckpt.Workspace) -> None:
    before = sorted(p.name for p in ws.tasks_dir.iterdir())
    for bad in ["", ".hidden", "a/b", "..", "a\\b", "x" * 101, "new\nline", "trail\n", "nul\0", "sp ace"]:
        with pytest.raises(UsageError):
            ws.create_task(bad)
    assert sorted(p.name for p in ws.tasks_dir.iterdir()) == before


def test_duplicate_task_is_conflict(ws: ckpt.Workspace) -> None:
    ws.create_task("a")
    with pytest.raises(ConflictError):
        ws.create_task("a")
    assert ws.create_task("a", exist_ok=True).name == "a"


def test_finished_task_takes_no_checkpoints(ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=1)
    task.finish()
    with pytest.raises(ConflictError, match="finished"):
        task.save(b"late")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"format = 1\nname = ", "not valid TOML"),
        (b"\xff\xfe", "UTF-8"),
        (b"format = 99\nname='unet'\nstatus='running'\ncreated='x'\n", "newer"),
        (b"format = 1\nname = 3\nstatus='running'\ncreated='x'\n", "wrong type"),
        (b"format = 1\nname='unet'\nstatus='bogus'\ncreated='x'\n", "unknown status"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML"),
        (
            b"format = 1\nname='unet'\nstatus='running'\ncreated='x'\n[[checkpoints]]\nnumber=1\nfile='../../x'\n"
            b"size=1\nsha256='a'\ncreated='x'\n",
            "inside the task folder",
        ),
        *(
            (
                b"format = 1\nname='unet'\nstatus='running'\ncreated='x'\n[[checkpoints]]\nnumber=1\n"
                + f"file='{name}'\nsize=1\nsha256='a'\ncreated='x'\n".encode(),
                "not the folder itself or one of ckpt's own files",
            )
            for name in ("", ".", "./", "task.toml", "./task.toml", ".lock", ".pending-20260101-000000-abcdef")
        ),
    ],
)
def test_broken_manifest_is_one_clear_error(ws: ckpt.Workspace, content: bytes, match: str) -> None:
    make_task(ws, n=1)
    manifest = ws.tasks_dir / "unet" / "task.toml"
    manifest.write_bytes(content)
    (ws.tasks_dir / "unet" / ".task.cache.json").unlink(missing_ok=True)
    with pytest.raises(ManifestError, match=match):
        _ = ckpt.Workspace.open(ws.root).task("unet").checkpoints


def test_atomic_write_leaves_nothing_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.toml"
    target.write_bytes(b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_save_failure_leaves_no_record_and_no_temp(ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task(ws, n=1)

    def boom(*a: object, **k: object) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(fsutil, "append_durably", boom)
    with pytest.raises(OSError):
        task.save(b"abc")
    monkeypatch.undo()
    fresh = ckpt.Workspace.open(ws.root).task("unet")
    assert [c.number for c in fresh.checkpoints] == [1]
    assert not list((task.folder / "checkpoints").glob(".*.tmp"))


def test_library_models_api(ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    m = ws.promote("unet", 2, title="unet-2")
    assert m.checkpoint == 2 and m.storage == "hardlink"
    assert "unet-2" in ws.models and len(ws.models) == 1
    assert ws.models["unet-2"].sha256 == ws.task("unet").checkpoint(2).sha256
    assert [x.title for x in ws.models] == ["unet-2"]
    done = ws.task("unet").finish()
    assert done is not None and done.title == "unet-3" and ws.task("unet").status == "finished"


def test_missing_task_manifest_is_named(ws: ckpt.Workspace) -> None:
    make_task(ws, n=1)
    (ws.tasks_dir / "unet" / "task.toml").unlink()
    with pytest.raises(ManifestError, match="task.toml is missing"):
        ckpt.Workspace.open(ws.root).task("unet")


def test_the_manifest_check_knows_every_file_of_the_task_folder() -> None:
    """A record may not name the task's own files: manifest.py's list (it cannot import workspace.py) is whole."""
    from ckpt import manifest, workspace

    assert manifest._TASK_FILE == workspace.TASK_FILE
    for own in (workspace.LOCK_FILE, workspace.CACHE_FILE, workspace.LIST_CACHE_FILE, workspace.STAGING_PREFIX):
        assert own.startswith(manifest._OWN_PREFIXES), own
    assert (workspace.PENDING_PREFIX + "x").startswith(manifest._OWN_PREFIXES)
