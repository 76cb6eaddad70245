"""Checkpoints as they are in the wild (issue 17): DCP, sharded safetensors, DeepSpeed and Composer runs are
imported one checkpoint per step, shown from their metadata, verified, and exported to safetensors whose
tensors equal the originals."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt

from . import wild_runs as wr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _export(run: Any, *args: str) -> Any:
    result = run("export", *args)
    assert result.exit_code == 0, result.output
    return result


# --- DCP ----------------------------------------------------------------------------------------------


def test_dcp_run_imports_one_checkpoint_per_step_and_exports(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    made = wr.dcp_run(tmp_path / "fsdp")
    imported = run_json("import", str(tmp_path / "fsdp"), "--task", "fsdp")
    assert imported["format"] == "dcp"
    assert [(c["original_name"], c["step"], c["number"]) for c in imported["checkpoints"]] == [
        ("step_100", 100, 1),
        ("step_200", 200, 2),
    ]
    shown = run_json("show", "fsdp", "2")
    assert shown["format"] == "dcp" and shown["weights_under"] == "model"
    assert {t["name"]: t["shape"] for t in shown["tensors"]}["layer.0.weight"] == [6, 8]
    assert shown["other_tensors"] == {"optim": 1} and shown["other_items"] == ["step"]
    assert shown["parameters"] == sum(t.numel() for t in made[200].values())
    assert shown["tensor_bytes"] == sum(t.numel() * t.element_size() for t in made[200].values())
    assert run("verify", "fsdp").exit_code == 0
    _export(run, "fsdp", "2", "--out", str(tmp_path / "out.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "out.safetensors"), made[200])
    _export(run, "fsdp", "1", "--key", "optim", "--out", str(tmp_path / "optim.safetensors"))
    assert torch.equal(wr.load_safetensors(tmp_path / "optim.safetensors")["exp_avg"], torch.ones(4))


@pytest.mark.parametrize("grid", [(4,), (2, 3)], ids=["rows", "grid"])
def test_dcp_chunks_are_put_back_together(run: Any, ws: ckpt.Workspace, tmp_path: Path, grid: tuple[int, ...]) -> None:
    whole = torch.randn(8, 6)
    wr.dcp_split(tmp_path / "step_5", whole, grid)
    number = ws.create_task("split").save_file(tmp_path / "step_5", step=5)
    shown = json.loads(run("show", "split", str(number), "--json").stdout)
    assert shown["shards"] == len(torch.zeros(grid).flatten())
    assert shown["tensors"][0]["split"].startswith(f"{shown['shards']} chunks")
    _export(run, "split", str(number), "--out", str(tmp_path / "w.safetensors"))
    assert torch.equal(wr.load_safetensors(tmp_path / "w.safetensors")["w"], whole)


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned > pwned.txt",))


def test_dcp_metadata_naming_foreign_code_is_refused(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    folder = tmp_path / "step_1"
    wr.dcp_save(folder, {"model": {"w": torch.ones(2)}})
    # a real metadata object with a foreign object in a field DCP never fills with one
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    meta.planner_data = {"model.w": _Evil()}
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    ws.create_task("evil").save_file(folder)
    for args in (("show", "evil", "1"), ("export", "evil", "1", "--out", str(tmp_path / "x.safetensors"))):
        result = run(*args)
        assert result.exit_code == 6, result.output
        assert "posix.system" in result.output or "os.system" in result.output
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "x.safetensors").exists()


# --- Hugging Face sharded safetensors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Trainer-like output_dir whose checkpoint-8/ holds a tiny GPT-2 saved in 4 KB shards."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    root = tmp_path_factory.mktemp("hf") / "out"
    model.save_pretrained(root / "checkpoint-8", max_shard_size="4KB")
    (root / "checkpoint-8" / "trainer_state.json").write_text(
        json.dumps({"global_step": 8, "log_history": [{"epoch": 1.0, "step": 8, "loss": 0.5}]})
    )
    saved = wr.load_safetensors  # the shards, as transformers wrote them
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted((root / "checkpoint-8").glob("model-*.safetensors")):
        weights.update(saved(shard))
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in weights.items())
    return root, weights


def test_trainer_checkpoint_with_shards(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path, hf_model: Any
) -> None:
    root, weights = hf_model
    imported = run_json("import", str(root), "--task", "gpt")
    assert imported["format"] == "huggingface" and imported["checkpoints"][0]["step"] == 8
    shown = run_json("show", "gpt", "1")
    index = json.loads((root / "checkpoint-8" / "model.safetensors.index.json").read_text())
    assert shown["format"] == "safetensors-sharded"
    assert shown["shards"] == len(set(index["weight_map"].values())) > 1
    assert {t["name"]: t["shard"] for t in shown["tensors"]} == index["weight_map"]
    assert run("verify", "gpt").exit_code == 0
    _export(run, "gpt", "1", "--out", str(tmp_path / "gpt.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "gpt.safetensors"), weights)
    # and back into shards of at most 10 kB, with their index
    _export(run, "gpt", "1", "--out", str(tmp_path / "gpt"), "--max-shard-size", "3kB", "--dtype", "bf16")
    new_index = json.loads((tmp_path / "gpt" / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(new_index["weight_map"].values())):
        part = wr.load_safetensors(tmp_path / "gpt" / shard)
        assert (tmp_path / "gpt" / shard).stat().st_size <= 3_000 + 4096
        got.update(part)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    wr.assert_equal(got, {k: v.to(torch.bfloat16) for k, v in weights.items()})


@pytest.mark.parametrize("damage", ["missing", "truncated", "twice", "unlisted"])
def test_shards_that_disagree_with_their_index(run: Any, ws: ckpt.Workspace, tmp_path: Path, damage: str) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "step_3"
    folder.mkdir()
    a = {"a": torch.ones(100), "b": torch.zeros(3)}
    c = {"c": torch.ones(7)}
    save_file(a, folder / "model-00001-of-00002.safetensors")
    save_file(c, folder / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    weight_map["c"] = "model-00002-of-00002.safetensors"
    if damage == "missing":
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif damage == "truncated":
        p = folder / "model-00001-of-00002.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "twice":
        save_file({"c": torch.ones(7), "a": torch.ones(100)}, folder / "model-00002-of-00002.safetensors")
    else:
        del weight_map["b"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ws.create_task("sh").save_file(folder)
    out = tmp_path / "x.safetensors"
    for args in (("show", "sh", "1"), ("export", "sh", "1", "--out", str(out))):
        result = run(*args)
        assert result.exit_code == 6, result.output
    assert {"missing": "missing", "truncated": "truncated", "twice": "two shards", "unlisted": "does not list"}[
        damage
    ] in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- DeepSpeed ------------------------------------------------------------------------------------------


def test_deepspeed_run(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    made = wr.deepspeed_run(tmp_path / "ds")
    imported = run_json("import", str(tmp_path / "ds"), "--task", "ds")
    rows = imported["checkpoints"]
    assert imported["format"] == "deepspeed"
    assert [(r["original_name"], r["step"], r["action"]) for r in rows if r["action"] == "added"] == [
        ("global_step10", 10, "added"),
        ("global_step20", 20, "added"),
    ]
    (latest,) = [r for r in rows if r["action"] == "skipped"]
    assert latest["original_name"] == "latest" and "global_step20" in latest["note"]
    shown = run_json("show", "ds", "2")
    assert shown["format"] == "deepspeed" and shown["weights_under"] == "module"
    assert "ZeRO stage 2" in shown["layout"] and shown["shards"] == 3
    assert len(shown["tensors"]) == len(made[20])
    _export(run, "ds", "2", "--out", str(tmp_path / "ds.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "ds.safetensors"), made[20])
    assert run("verify", "ds").exit_code == 0
    # promote, trash and restore treat the step folder as any checkpoint
    assert run("promote", "ds", "1", "--title", "ds-first").exit_code == 0
    _export(run, "--model", "ds-first", "--out", str(tmp_path / "first.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "first.safetensors"), made[10])


def test_deepspeed_zero3_is_gathered_as_zero_to_fp32_does(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    made = wr.deepspeed_run(tmp_path / "ds3", steps=(5,), stage=3, ranks=3)[5]
    ws.create_task("z3").save_file(tmp_path / "ds3" / "global_step5", step=5)
    shown = json.loads(run("show", "z3", "1", "--json").stdout)
    assert {t["name"]: t["shape"] for t in shown["tensors"]} == {k: list(v.shape) for k, v in made.items()}
    assert "ZeRO stage 3" in shown["layout"] and shown["shards"] == 6
    out = tmp_path / "z.safetensors"
    result = run("export", "z3", "1", "--out", str(out))  # the optimizer states pickle DeepSpeed's classes
    assert result.exit_code == 6 and "ZeroStageEnum" in result.output and not out.exists()
    _export(run, "z3", "1", "--out", str(out), "--unsafe-load")
    want = {k: v.float() if v.is_floating_point() else v for k, v in made.items()}  # the fp32 master weights
    wr.assert_equal(wr.load_safetensors(out), want)


def test_deepspeed_zero3_with_a_rank_missing_says_so(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    wr.deepspeed_run(tmp_path / "ds3", steps=(5,), stage=3)
    (tmp_path / "ds3" / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    ws.create_task("z3").save_file(tmp_path / "ds3" / "global_step5", step=5)
    assert run("show", "z3", "1").exit_code == 0
    result = run("export", "z3", "1", "--out", str(tmp_path / "z.safetensors"), "--unsafe-load")
    assert result.exit_code == 1
    assert "2 rank(s) but 1 optimizer states file(s)" in result.output and "zero_to_fp32.py" in result.output
    assert not (tmp_path / "z.safetensors").exists()


def test_foreign_classes_need_unsafe_load(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """A ZeRO-0 run keeps its optimizer (and DeepSpeed's LossScaler) in the model states file."""
    sd = wr.state_dict(1)
    with wr.deepspeed_classes():
        torch.save(
            {"module": sd, "optimizer": {"loss_scaler": wr.LossScaler()}, "ds_version": "0.15.1"}, tmp_path / "m.pt"
        )
    ws.create_task("z0").save_file(tmp_path / "m.pt")
    out = tmp_path / "z0.safetensors"
    result = run("export", "z0", "1", "--out", str(out))
    assert result.exit_code == 6 and "deepspeed.runtime.fp16.loss_scaler.LossScaler" in result.output
    _export(run, "z0", "1", "--out", str(out), "--unsafe-load")
    wr.assert_equal(wr.load_safetensors(out), sd)


# --- Composer -------------------------------------------------------------------------------------------


def test_composer_run(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    made = wr.composer_run(tmp_path / "composer")
    imported = run_json("import", str(tmp_path / "composer"), "--task", "mosaic")
    assert imported["format"] == "composer"
    added = [(r["original_name"], r["epoch"], r["step"]) for r in imported["checkpoints"] if r["action"] == "added"]
    assert added == [("ep1-ba10-rank0.pt", 1, 10), ("ep2-ba20-rank0.pt", 2, 20)]
    (pointer,) = [r for r in imported["checkpoints"] if r["action"] == "skipped"]
    assert pointer["original_name"] == "latest-rank0.pt" and "ep2-ba20-rank0.pt" in pointer["note"]
    shown = run_json("show", "mosaic", "2")
    assert shown["weights_under"] == "state.model" and shown["other_tensors"] == {"rng": 1}
    assert sorted(t["name"] for t in shown["tensors"]) == sorted(made[20])
    _export(run, "mosaic", "--out", str(tmp_path / "c.safetensors"))  # the latest
    wr.assert_equal(wr.load_safetensors(tmp_path / "c.safetensors"), made[20])
    assert run("verify", "mosaic").exit_code == 0


def test_step_folders_go_to_the_trash_and_back(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    made = wr.deepspeed_run(tmp_path / "ds", steps=(1, 2, 3))
    run_json("import", str(tmp_path / "ds"), "--task", "ds", "--copy")
    size = run_json("show", "ds", "1")["size"]
    assert run("trash-unused", "ds", "--keep-last", "1").exit_code == 0
    assert [cp.number for cp in ws.task("ds").checkpoints] == [3]
    (entry,) = run_json("trash", "list")
    assert entry["size"] == 2 * size
    assert run("trash", "restore", entry["id"]).exit_code == 0
    assert run("verify", "ds").exit_code == 0
    assert run("du").exit_code == 0
    _export(run, "ds", "1", "--out", str(tmp_path / "back.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "back.safetensors"), made[1])


# --- plain torch files, dtypes, interruptions, buckets ----------------------------------------------------


def test_export_of_a_plain_file_needs_no_torch(ws: ckpt.Workspace, tmp_path: Path) -> None:
    sd = wr.state_dict(3)
    lightning = {"state_dict": sd, "epoch": 1, "global_step": 30, "pytorch-lightning_version": "2.4.0"}
    torch.save(lightning, tmp_path / "epoch=1-step=30.ckpt")
    ws.create_task("pl").save_file(tmp_path / "epoch=1-step=30.ckpt")
    env = dict(os.environ, CKPT_WORKSPACE=str(ws.root), PYTHONPROFILEIMPORTTIME="1")
    out = tmp_path / "pl.safetensors"
    cmd = [sys.executable, "-m", "ckpt", "export", "pl", "1", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in loaded and "ckpt.export" in loaded
    assert json.loads(proc.stdout)["key"] == "state_dict"
    wr.assert_equal(wr.load_safetensors(out), sd)
    # nor does showing a distributed checkpoint, nor exporting it
    wr.dcp_save(tmp_path / "step_9", {"model": sd})
    ws.create_task("dist").save_file(tmp_path / "step_9")
    for args in (["show", "dist", "1"], ["export", "dist", "1", "--out", str(tmp_path / "d.safetensors")]):
        proc = subprocess.run([sys.executable, "-m", "ckpt", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not [line for line in proc.stderr.splitlines() if line.endswith("| torch")]
    wr.assert_equal(wr.load_safetensors(tmp_path / "d.safetensors"), sd)


def test_dtype_conversion_rounds_as_torch_does(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, float("inf"), float("nan"), 3.0e38, 1e-40, 7.0])
    sd = {"x": torch.cat([special, torch.randn(1000)]), "i": torch.arange(4), "h": torch.randn(5).half()}
    torch.save(sd, tmp_path / "m.pt")
    ws.create_task("conv").save_file(tmp_path / "m.pt")
    for flag, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / f"{flag}.safetensors"
        _export(run, "conv", "1", "--out", str(out), "--dtype", flag)
        got = wr.load_safetensors(out)
        want = {"x": sd["x"].to(dtype), "i": sd["i"], "h": sd["h"].to(dtype)}
        for k, v in want.items():
            assert got[k].dtype == v.dtype, k
            bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.int64: torch.int64}[v.dtype]
            nan = v.isnan() if v.is_floating_point() else torch.zeros_like(v, dtype=torch.bool)
            assert torch.equal(got[k].isnan() if v.is_floating_point() else nan, nan), k
            assert torch.equal(got[k][~nan].view(bits), v[~nan].view(bits)), k  # the same bits, -0.0 included


def test_fp16_overflow_is_an_error_naming_the_tensor(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save({"fine": torch.ones(3), "big": torch.tensor([1.0, 70000.0])}, tmp_path / "m.pt")
    ws.create_task("ovf").save_file(tmp_path / "m.pt")
    result = run("export", "ovf", "1", "--out", str(tmp_path / "h.safetensors"), "--dtype", "fp16")
    assert result.exit_code == 2 and "'big'" in result.output and "70000" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "ws"]  # nothing half written is left


def test_an_interrupted_export_leaves_nothing_finished(
    ws: ckpt.Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt import export as ex
    from ckpt.sources import open_contents

    torch.save({f"t{i}": torch.randn(100) for i in range(5)}, tmp_path / "m.pt")
    contents = open_contents(tmp_path / "m.pt")
    real = contents.entries[3].pieces

    def broken() -> Any:
        yield next(iter(real()))[:100]
        raise KeyboardInterrupt

    contents.entries[3].pieces = broken
    with pytest.raises(KeyboardInterrupt):
        ex.export(contents, tmp_path / "out", max_shard_size=900)
    with pytest.raises(KeyboardInterrupt):
        ex.export(contents, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "ws"]


def test_export_refuses_to_overwrite(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "m.pt")
    ws.create_task("t").save_file(tmp_path / "m.pt")
    (tmp_path / "o.safetensors").write_bytes(b"mine")
    result = run("export", "t", "1", "--out", str(tmp_path / "o.safetensors"))
    assert result.exit_code == 4 and (tmp_path / "o.safetensors").read_bytes() == b"mine"


def test_scan_add_takes_step_folders(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    t = ws.create_task("live")
    made = wr.dcp_run(t.folder, steps=(30, 4))
    (t.folder / "notes").mkdir()  # a folder that is no checkpoint stays unknown
    (t.folder / "notes" / "todo.txt").write_text("x")
    scanned = run_json("scan", "live", "--add")
    assert [(c["original_name"], c["number"]) for c in scanned["added"]] == [("step_4", 1), ("step_30", 2)]
    assert [u["path"] for u in scanned["unknown"]] == ["tasks/live/notes"]
    assert [c["step"] for c in run_json("list", "live")] == [4, 30]
    shown = run_json("show", "live", "2")
    assert shown["format"] == "dcp" and len(shown["tensors"]) == len(made[30])


def test_bucket_workspace(
    run: Any, run_json: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    made = wr.dcp_run(tmp_path / "fsdp", steps=(7,))
    ws.create_task("remote").save_file(tmp_path / "fsdp" / "step_7", step=7)
    shown = run_json("show", "remote", "1")
    assert shown["format"] == "dcp" and shown["step"] == 7
    _export(run, "remote", "1", "--out", str(tmp_path / "r.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "r.safetensors"), made[7])


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_export_as_model(run: Any, run_json: Any, tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    if where == "bucket":
        location = request.getfixturevalue("s3_url")
        os.environ["CKPT_WORKSPACE"] = location  # restored by the autouse fixture's monkeypatch
    else:
        location = str(tmp_path / "ws")
    ws = ckpt.Workspace.init(location)
    made = wr.dcp_run(tmp_path / "fsdp", steps=(1, 2, 3))
    t = ws.create_task("fsdp")
    for step in (1, 2, 3):
        t.save_file(tmp_path / "fsdp" / f"step_{step}", step=step)
    res = run_json("export", "fsdp", "1", "--as-model", "fsdp-bf16", "--dtype", "bf16")
    assert res["as_model"] == "fsdp-bf16" and res["converted"] == 4  # the bf16 tensor stays as it is
    model = ckpt.Workspace.open(location).models["fsdp-bf16"]
    assert (model.task, model.checkpoint, model.file) == ("fsdp", 1, "model.safetensors")
    shown = run_json("models", "show", "fsdp-bf16")
    assert shown["sha256"] == model.sha256 != t.checkpoint(1).sha256
    assert run("verify", "--models").exit_code == 0
    got = wr.load_safetensors(ckpt.Workspace.open(location).model_local_path(model))
    wr.assert_equal(got, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in made[1].items()})
    assert run("trash-unused", "fsdp").exit_code == 0  # 2 goes; 1 is the model's, 3 the latest
    assert [cp.number for cp in ckpt.Workspace.open(location).task("fsdp").checkpoints] == [1, 3]
    assert run("export", "fsdp", "3", "--as-model", "fsdp-bf16").exit_code == 4


def test_hostile_shapes_are_refused_before_anything_is_made(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    # a view that repeats 4 bytes 10^10 times, and DCP metadata claiming a tensor of 10^12 elements
    torch.save({"w": torch.ones(1).expand(100_000, 100_000)}, tmp_path / "view.pt")
    folder = tmp_path / "step_1"
    wr.dcp_save(folder, {"model": {"w": torch.ones(2)}})
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    item = meta.state_dict_metadata["model.w"]
    item.size = torch.Size([10**6, 10**6])  # type: ignore[union-attr]
    item.chunks[0].sizes = torch.Size([10**6, 10**6])  # type: ignore[union-attr]
    item.chunks[0].offsets = torch.Size([0, 0])  # type: ignore[union-attr]
    meta.storage_data = {  # the index follows the chunk, as a writer of such a file would make it
        type(k)("model.w", torch.Size([0, 0]), 0): v for k, v in meta.storage_data.items()
    }
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    t = ws.create_task("hostile")
    t.save_file(tmp_path / "view.pt")
    t.save_file(folder)
    for number in ("1", "2"):
        result = run("export", "hostile", number, "--out", str(tmp_path / f"{number}.safetensors"))
        assert result.exit_code == 6, result.output
    assert "view of" in run("export", "hostile", "1", "--out", str(tmp_path / "x.safetensors")).output
    assert "chunks store" in run("show", "hostile", "2").output


def test_lightning_fsdp_run_and_one_step_folder(run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Lightning's FSDP strategy (state_dict_type="sharded") writes each checkpoint as a DCP folder named like a
    .ckpt file, with its `meta.pt` beside the shards; `last.ckpt/` is a copy of the newest."""
    ckpts = tmp_path / "proj" / "lightning_logs" / "version_0" / "checkpoints"
    for name, seed in (("epoch=0-step=50.ckpt", 50), ("epoch=1-step=100.ckpt", 100), ("last.ckpt", 100)):
        wr.dcp_save(ckpts / name, {"model": wr.state_dict(seed)})
        torch.save({"epoch": seed // 50 - 1, "global_step": seed}, ckpts / name / "meta.pt")
    shutil.copy(ckpts / "epoch=1-step=100.ckpt" / "__0_0.distcp", ckpts / "last.ckpt" / "__0_0.distcp")
    shutil.copy(ckpts / "epoch=1-step=100.ckpt" / ".metadata", ckpts / "last.ckpt" / ".metadata")
    imported = run_json("import", str(tmp_path / "proj" / "lightning_logs" / "version_0"))
    assert imported["format"] == "dcp" and imported["task"] == "proj-version_0"
    rows = [(r["original_name"], r["action"], r["epoch"], r["step"]) for r in imported["checkpoints"]]
    assert rows == [
        ("checkpoints/epoch=0-step=50.ckpt", "added", 0, 50),
        ("checkpoints/epoch=1-step=100.ckpt", "added", 1, 100),
        ("checkpoints/last.ckpt", "duplicate", None, None),
    ]
    one = run_json("import", str(ckpts / "epoch=0-step=50.ckpt"), "--task", "single")
    assert [(r["original_name"], r["step"]) for r in one["checkpoints"]] == [("epoch=0-step=50.ckpt", 50)]


def test_older_trainer_shards_of_pickled_files(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Trainers before safetensors wrote `pytorch_model-0000i-of-0000n.bin` shards and `pytorch_model.bin.index.json`
    (transformers 5 writes them no more: made here in that layout with torch.save)."""
    state = wr.state_dict(4)
    names = list(state)
    parts = [names[:2], names[2:4], names[4:]]
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ws.create_task("old").save_file(folder, step=4)
    shown = run_json("show", "old", "1")
    assert shown["format"] == "torch-sharded" and shown["shards"] == len(set(index["weight_map"].values())) > 1
    _export(run, "old", "1", "--out", str(tmp_path / "old.safetensors"))
    wr.assert_equal(wr.load_safetensors(tmp_path / "old.safetensors"), state)


def test_scan_add_on_both_backends(run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    from .conftest import put_bytes

    any_ws.create_task("seen")
    made = wr.dcp_run(tmp_path / "src", steps=(12, 3))
    for step in (12, 3):
        for f in sorted((tmp_path / "src" / f"step_{step}").iterdir()):
            put_bytes(any_ws, f"tasks/seen/step_{step}/{f.name}", f.read_bytes())
    scanned = run_json("scan", "seen", "--add")
    assert [(c["original_name"], c["number"]) for c in scanned["added"]] == [("step_3", 1), ("step_12", 2)]
    assert [c["step"] for c in run_json("list", "seen")] == [3, 12]
    shown = run_json("show", "seen", "2")
    assert shown["format"] == "dcp" and len(shown["tensors"]) == len(made[12])


def test_dcp_chunks_that_overlap_are_refused(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Rows 0-3 and 2-5 of 8: the right count of elements, but rows 6-7 are stored nowhere."""
    whole = torch.randn(8, 2)
    wr.dcp_split(tmp_path / "step_1", whole, (2,))
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(tmp_path / "step_1")).read_metadata()
    chunk = meta.state_dict_metadata["model.w"].chunks[1]  # type: ignore[union-attr]
    (index,) = [k for k in meta.storage_data if k.offset == chunk.offsets]
    info = meta.storage_data.pop(index)
    chunk.offsets = torch.Size([2, 0])
    meta.storage_data[type(index)("model.w", chunk.offsets, 1)] = info
    (tmp_path / "step_1" / ".metadata").write_bytes(pickle.dumps(meta))
    ws.create_task("overlap").save_file(tmp_path / "step_1")
    result = run("export", "overlap", "1", "--out", str(tmp_path / "o.safetensors"))
    assert result.exit_code == 6 and "exactly once" in result.output


def test_a_run_with_loose_files_beside_step_folders(run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Found by itself such a folder is plain files; with --format dcp, its step folders, the files left out."""
    made = wr.dcp_run(tmp_path / "mixed", steps=(1,))
    torch.save(made[1], tmp_path / "mixed" / "final.pt")
    assert run_json("import", str(tmp_path / "mixed"), "--task", "a")["format"] == "files"
    rows = run_json("import", str(tmp_path / "mixed"), "--task", "b", "--format", "dcp")["checkpoints"]
    assert [(r["original_name"], r["action"]) for r in rows] == [("step_1", "added"), ("final.pt", "skipped")]


def test_damaged_files_are_integrity_errors_never_crashes(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    """Bytes flipped or cut anywhere in .metadata, a .distcp file or a safetensors shard: exit 6 (or a clean
    export of what still reads), never an internal error."""
    import random

    from safetensors.torch import save_file

    rng = random.Random(17)
    base = tmp_path / "base"
    wr.dcp_save(base / "step_1", {"model": wr.state_dict(1)})
    (base / "step_2").mkdir()
    save_file({"a": torch.ones(50), "b": torch.zeros(3, 4)}, base / "step_2" / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (base / "step_2" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    t = ws.create_task("damaged")
    victims = [("step_1", ".metadata"), ("step_1", "__0_0.distcp"), ("step_2", "model-00001-of-00001.safetensors")]
    for i in range(24):
        folder, name = victims[i % len(victims)]
        work = tmp_path / f"case{i}" / folder
        shutil.copytree(base / folder, work)
        data = bytearray((work / name).read_bytes())
        if i % 2:
            del data[rng.randrange(len(data)) :]
        else:
            for _ in range(8):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (work / name).write_bytes(bytes(data))
        number = t.save_file(work)
        for args in (("show", "damaged", str(number)), ("export", "damaged", str(number), "--out", str(work) + ".st")):
            result = run(*args)
            assert result.exit_code in (0, 6), (i, name, result.output)


# --- found by review (issue 17 fixes) -------------------------------------------------------------------


def test_a_symlink_given_to_import_is_refused_and_links_in_a_run_are_skipped(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    wr.composer_run(tmp_path / "composer")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a checkpoint")
    for target, name in ((secret, "passwd.pt"), (tmp_path / "composer" / "ep1-ba10-rank0.pt", "l.pt")):
        (tmp_path / name).symlink_to(target)
        result = run("import", str(tmp_path / name), "--task", "t", "--move")
        assert result.exit_code == 6 and "is a symlink" in result.output, result.output
        assert target.exists()
    wr.dcp_run(tmp_path / "fsdp", steps=(1, 2))
    (tmp_path / "fsdp" / "step_7").symlink_to(tmp_path / "fsdp" / "step_1")
    shard = next((tmp_path / "fsdp" / "step_2").glob("*.distcp"))
    shutil.move(shard, tmp_path / "shard.distcp")
    shard.symlink_to(tmp_path / "shard.distcp")
    imported = run_json("import", str(tmp_path / "fsdp"), "--task", "f", "--move")
    assert [r["original_name"] for r in imported["checkpoints"] if r["action"] == "added"] == ["step_1"]
    skipped = {r["original_name"]: r["note"] for r in imported["checkpoints"] if r["action"] == "skipped"}
    assert sorted(skipped) == ["step_2", "step_7"] and all("symlink" in n for n in skipped.values())
    assert (tmp_path / "shard.distcp").is_file() and shard.is_symlink()
    assert "t" not in ws.task_names()


def test_a_latest_pointer_or_other_file_given_to_import_is_refused(
    run: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    wr.deepspeed_run(tmp_path / "ds", steps=(10,))
    result = run("import", str(tmp_path / "ds" / "latest"), "--task", "ds")
    assert result.exit_code == 2 and "latest pointer (to global_step10)" in result.output, result.output
    (tmp_path / "notes.txt").write_text("hello")
    result = run("import", str(tmp_path / "notes.txt"), "--task", "ds")
    assert result.exit_code == 2 and "not a checkpoint file" in result.output
    assert run("list", "ds").exit_code == 3


def _odd_dtypes() -> dict[str, torch.Tensor]:
    """Tensors torch saves through `_rebuild_tensor_v3` on an untyped storage (and complex64, safetensors' C64)."""
    ints = torch.tensor([1, 2, 300])
    return {
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "f8b": torch.tensor([0.5, -2.0, 57344.0]).to(torch.float8_e5m2),
        "e8m0": torch.tensor([0.5, 2.0, 1024.0]).to(torch.float8_e8m0fnu),
        "u16": ints.to(torch.uint16),
        "u32": ints.to(torch.uint32),
        "u64": ints.to(torch.uint64),
        "c64": torch.tensor([1 + 2j, -3j, 0.5], dtype=torch.complex64),
    }


def _bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("kind", ["pt", "dcp"])
def test_float8_unsigned_and_complex64_are_shown_and_exported(
    run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path, kind: str
) -> None:
    sd = _odd_dtypes()
    source = tmp_path / ("w.pt" if kind == "pt" else "step_1")
    if kind == "pt":
        torch.save(sd, source)
    else:
        wr.dcp_save(source, {"model": sd})
    ws.create_task("odd").save_file(source)
    shown = run_json("show", "odd", "1")
    assert {t["name"]: t["dtype"] for t in shown["tensors"]} == {k: str(v.dtype)[6:] for k, v in sd.items()}
    assert not shown["unsafe_globals"]
    out = tmp_path / "odd.safetensors"
    _export(run, "odd", "1", "--out", str(out), "--dtype", "bf16")  # none of them is converted
    _bitwise(wr.load_safetensors(out), sd)


def test_a_dtype_safetensors_cannot_hold_is_a_usage_error_naming_it(
    run: Any, ws: ckpt.Workspace, tmp_path: Path
) -> None:
    torch.save({"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    ws.create_task("c").save_file(tmp_path / "c.pt")
    result = run("export", "c", "1", "--out", str(tmp_path / "c.safetensors"))
    assert result.exit_code == 2 and "tensor 'z' is complex128" in result.output


def test_export_of_an_exported_model_writes_its_own_weights(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    sd = wr.state_dict(3)
    torch.save(sd, tmp_path / "w.pt")
    ws.create_task("t").save_file(tmp_path / "w.pt")
    assert run("export", "t", "1", "--as-model", "half", "--dtype", "fp16").exit_code == 0
    assert oct(os.stat(ws.models_dir / "half").st_mode & 0o777) == oct(0o777 & ~_umask())  # as promote makes them
    _export(run, "--model", "half", "--out", str(tmp_path / "half.safetensors"))
    got = wr.load_safetensors(tmp_path / "half.safetensors")
    wr.assert_equal(got, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    result = run("export", "--model", "half", "--as-model", "again")
    assert result.exit_code == 2 and "ckpt export t 1 --as-model again" in result.output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_out_inside_the_workspace_is_refused(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save(wr.state_dict(1), tmp_path / "w.pt")
    t = ws.create_task("t")
    t.save_file(tmp_path / "w.pt")
    ws.promote("t", 1, title="m")
    (tmp_path / "hop").symlink_to(ws.root / "tasks" / "t")
    before = sorted(p.name for p in (ws.root / "tasks" / "t").rglob("*"))
    for out in (
        t.path_of(t.checkpoint(1)).parent / "x.safetensors",
        ws.root / "models" / "m" / "model.safetensors",
        ws.root / "models" / ".." / "trash" / "x.safetensors",
        tmp_path / "hop" / "checkpoints" / "y.safetensors",
    ):
        result = run("export", "t", "1", "--out", str(out))
        assert result.exit_code == 2 and "inside the workspace" in result.output, (out, result.output)
    assert sorted(p.name for p in (ws.root / "tasks" / "t").rglob("*")) == before
    assert run("verify", "--models").exit_code == 0


def test_shard_folders_honour_the_umask(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save(wr.state_dict(1), tmp_path / "w.pt")
    ws.create_task("t").save_file(tmp_path / "w.pt")
    _export(run, "t", "1", "--out", str(tmp_path / "shards"), "--max-shard-size", "100")
    assert oct(os.stat(tmp_path / "shards").st_mode & 0o777) == oct(0o777 & ~_umask())


@pytest.mark.parametrize("damage", ["file-link", "shard-link", "bytes"])
def test_show_and_export_refuse_what_verify_refuses(
    run: Any, ws: ckpt.Workspace, tmp_path: Path, hf_model: tuple[Path, dict[str, torch.Tensor]], damage: str
) -> None:
    t = ws.create_task("t")
    if damage == "shard-link":
        t.save_file(hf_model[0] / "checkpoint-8")
        target = next(t.path_of(t.checkpoint(1)).glob("*-of-*.safetensors"))
    else:
        torch.save(wr.state_dict(1), tmp_path / "w.pt")
        t.save_file(tmp_path / "w.pt")
        target = t.path_of(t.checkpoint(1))
    if damage == "bytes":
        data = bytearray(target.read_bytes())
        data[-100] ^= 1  # inside the archive's last records: still readable, no longer the recorded bytes
        target.write_bytes(bytes(data))
    else:
        shutil.copy(target, tmp_path / "elsewhere")
        target.unlink()
        target.symlink_to(tmp_path / "elsewhere")
    assert run("verify", "t").exit_code == 6
    out = tmp_path / "o.safetensors"
    result = run("export", "t", "1", "--out", str(out))
    assert result.exit_code == 6 and not out.exists(), result.output
    if damage == "bytes":
        assert "does not match its recorded sha256; run: ckpt verify t" in result.output
        assert run("export", "t", "1", "--as-model", "m").exit_code == 6 and "m" not in ws.models
    else:
        assert "symlink" in result.output
        shown = run("show", "t", "1")
        assert shown.exit_code == 6 and "symlink" in shown.output


def test_export_messages_say_what_is_wrong(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    torch.save({"huge": torch.tensor([1e39], dtype=torch.float64)}, tmp_path / "big.pt")
    t = ws.create_task("t")
    for name in ("legacy.pt", "bare.pt", "big.pt"):
        t.save_file(tmp_path / name)
    out = str(tmp_path / "o.safetensors")
    legacy, bare = run("export", "t", "1", "--out", out), run("export", "t", "2", "--out", out)
    assert "legacy (non-zip) torch.save file" in legacy.output and "safetensors header" not in legacy.output
    assert "bare pickle" in bare.output and "safetensors header" not in bare.output
    assert "legacy (non-zip)" in run("show", "t", "1").output
    bf16 = run("export", "t", "3", "--out", out, "--dtype", "bf16")
    assert bf16.exit_code == 2 and "overflows bfloat16" in bf16.output and "bf16 or" not in bf16.output
    fp32 = run("export", "t", "3", "--out", out, "--dtype", "fp32")
    assert fp32.exit_code == 2 and "--dtype fp32" not in fp32.output.split(";", 1)[1]
    empty = run("export", "t", "3", "--out", "")
    assert empty.exit_code == 2 and "--out needs a path" in empty.output
    both = run("export", "t", "3", "--out", out, "--as-model", "m")
    assert both.exit_code == 2 and "not both" in both.output
    long = run("export", "t", "3", "--out", str(tmp_path / ("x" * 250)))
    assert long.exit_code == 2 and "too long" in long.output and "doctor" not in long.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt", "big.pt", "legacy.pt", "ws"]


_SIGTERM_MID_EXPORT = """
import os, signal, sys
from ckpt import export as ex
real = ex._write_file
def write_then_term(*args, **kwargs):
    n = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # after the first shard: the others not written yet
    return n
ex._write_file = write_then_term
from ckpt.cli import main
sys.argv = ["ckpt", *sys.argv[1:]]
main()
"""


def test_sigterm_during_export_leaves_no_partial_shards(ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch.save({f"t{i}": torch.randn(100) for i in range(5)}, tmp_path / "m.pt")
    ws.create_task("t").save_file(tmp_path / "m.pt")
    out = tmp_path / "out"
    args = ["export", "t", "1", "--out", str(out), "--max-shard-size", "900"]
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    res = subprocess.run([sys.executable, "-c", _SIGTERM_MID_EXPORT, *args], capture_output=True, text=True, env=env)
    assert res.returncode == 143 and res.stderr.strip() == "terminated", res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "ws"]


_INTERRUPT_WHILE_LOADING = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "ckpt.cli.plot":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from ckpt.cli import main
"""


def test_ctrl_c_while_the_commands_load_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", _INTERRUPT_WHILE_LOADING], capture_output=True, text=True)
    assert res.returncode == 130 and res.stderr == "interrupted\n", res.stderr
