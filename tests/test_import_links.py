"""Symlinks inside a run's step folders (issue 17 review): the step is a skipped row naming the link and the
other steps are imported; the step given on its own, a checkpoint-N link, or a link loop are refused (exit 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ckpt


def _dcp_step(folder: Path, shards: int = 2) -> None:
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"meta " + str(folder).encode())
    for i in range(shards):
        (folder / f"__{i}_0.distcp").write_bytes(f"shard {i} of {folder}".encode())


def _trainer_step(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights " + folder.name.encode())
    (folder / "sub" / "extra.bin").write_bytes(b"extra " + folder.name.encode())


def _replace_with_link(path: Path, tmp_path: Path) -> None:
    outside = tmp_path / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


def _rows(imported: dict[str, Any], action: str) -> dict[str, str]:
    return {r["original_name"]: r["note"] for r in imported["checkpoints"] if r["action"] == action}


@pytest.mark.parametrize("where", ["__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"])
def test_a_link_in_a_dcp_step_skips_that_step_only(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path, where: str
) -> None:
    root = tmp_path / "fsdp"
    for n in (1, 2, 3):
        _dcp_step(root / f"step_{n}" / "pytorch_model_fsdp_0" if "/" in where else root / f"step_{n}")
    _replace_with_link(root / "step_2" / where, tmp_path)
    imported = run_json("import", str(root), "--task", "f")
    assert sorted(_rows(imported, "added")) == ["step_1", "step_3"]
    skipped = _rows(imported, "skipped")
    assert list(skipped) == ["step_2"] and f"holds the symlink {where}" in skipped["step_2"]
    alone = run("import", str(root / "step_2"), "--task", "g")
    assert alone.exit_code == 6 and "__1_0.distcp' is a symlink" in alone.output, alone.output
    assert "g" not in ws.task_names()


@pytest.mark.parametrize("where", ["model.safetensors", "sub/extra.bin"])
def test_a_link_in_a_trainer_checkpoint_skips_that_checkpoint_only(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path, where: str
) -> None:
    root = tmp_path / "out"
    for n in (10, 20, 30):
        _trainer_step(root / f"checkpoint-{n}")
    _replace_with_link(root / "checkpoint-20" / where, tmp_path)
    imported = run_json("import", str(root), "--task", "hf")
    assert imported["format"] == "huggingface"
    assert sorted(_rows(imported, "added")) == ["checkpoint-10", "checkpoint-30"]
    skipped = _rows(imported, "skipped")
    assert list(skipped) == ["checkpoint-20"] and f"holds the symlink {where}" in skipped["checkpoint-20"]
    alone = run("import", str(root / "checkpoint-20"), "--task", "g")
    assert alone.exit_code == 6 and f"{Path(where).name}' is a symlink" in alone.output, alone.output
    assert "g" not in ws.task_names()


def test_a_sharded_step_with_a_linked_shard_is_skipped(run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    root = tmp_path / "sharded"
    for n in (1, 2):
        step = root / f"step_{n}"
        step.mkdir(parents=True)
        (step / "model.safetensors.index.json").write_text('{"weight_map": {}}')
        for i in (1, 2):
            (step / f"model-0000{i}-of-00002.safetensors").write_bytes(f"{n}{i}".encode())
    _replace_with_link(root / "step_2" / "model-00002-of-00002.safetensors", tmp_path)
    imported = run_json("import", str(root), "--task", "s")
    assert list(_rows(imported, "added")) == ["step_1"] and list(_rows(imported, "skipped")) == ["step_2"]


def test_a_checkpoint_folder_that_is_a_link_is_listed_as_skipped(
    run_json: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    root = tmp_path / "out"
    _trainer_step(root / "checkpoint-1")
    _trainer_step(tmp_path / "elsewhere" / "checkpoint-2")
    (root / "checkpoint-2").symlink_to(tmp_path / "elsewhere" / "checkpoint-2")
    imported = run_json("import", str(root), "--task", "hf")
    assert list(_rows(imported, "added")) == ["checkpoint-1"]
    assert "a symlink (to " in _rows(imported, "skipped")["checkpoint-2"]
    (root / "checkpoint-1").rename(tmp_path / "elsewhere" / "checkpoint-1")  # only a link is left
    imported = run_json("import", str(root), "--task", "only")
    assert imported["format"] == "huggingface" and list(_rows(imported, "skipped")) == ["checkpoint-2"]


def test_a_symlink_loop_given_to_import_is_refused_as_a_link(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    (tmp_path / "l1.pt").symlink_to("l2.pt")
    (tmp_path / "l2.pt").symlink_to("l1.pt")
    result = run("import", str(tmp_path / "l1.pt"))
    assert result.exit_code == 6 and "is a symlink" in result.output, result.output
    assert "internal error" not in result.output
