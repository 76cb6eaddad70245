"""ckpt import: Lightning, Hugging Face Trainer and plain folders, built as those libraries write them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.import_names import hf_metrics, parse_lightning_name, parse_plain_name


class AttributeDict(dict):  # type: ignore[type-arg]
    """Like lightning.fabric.utilities.data.AttributeDict: a dict subclass in `hyper_parameters`."""


def lightning_ckpt(path: Path, epoch: int, step: int, seed: int) -> None:
    """A file shaped like Lightning's Trainer.save_checkpoint output (torch.save of this dict)."""
    g = torch.Generator().manual_seed(seed)
    torch.save(
        {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.zeros(4)},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": epoch}}}},
            "callbacks": {
                "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
                "'every_n_epochs': 1, 'train_time_interval': None}": {
                    "monitor": "val_loss",
                    "best_model_score": torch.tensor(0.301),
                    "best_model_path": str(path.parent / "epoch=1-step=100-val_loss=0.301.ckpt"),
                }
            },
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": AttributeDict(lr=0.01, hidden=4),
        },
        path,
    )


def lightning_tree(root: Path) -> Path:
    """lightning_logs/version_0/checkpoints/ with save_top_k=3 on val_loss, save_last=True, filename
    '{epoch}-{step}-{val_loss:.3f}' (auto_insert_metric_name), as ModelCheckpoint names them."""
    version = root / "lightning_logs" / "version_0"
    cdir = version / "checkpoints"
    cdir.mkdir(parents=True)
    (version / "hparams.yaml").write_text("lr: 0.01\nhidden: 4\n")
    (version / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"\0" * 64)
    for epoch, step, loss in [(0, 50, "0.512"), (1, 100, "0.301"), (2, 150, "0.347")]:
        lightning_ckpt(cdir / f"epoch={epoch}-step={step}-val_loss={loss}.ckpt", epoch, step, seed=epoch)
    (cdir / "last.ckpt").write_bytes((cdir / "epoch=2-step=150-val_loss=0.347.ckpt").read_bytes())
    return version


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def hf_tree(root: Path, steps: tuple[int, ...] = (4, 8, 12), losses: tuple[float, ...] = (0.9, 0.4, 0.6)) -> Path:
    """A Trainer output_dir: checkpoint-N/ folders (save_strategy="steps", eval_strategy="steps") with the
    files and trainer_state.json the Trainer writes; best_model_checkpoint is the lowest eval_loss."""
    out = root / "out"
    out.mkdir()
    best = min(zip(losses, steps, strict=True))
    history: list[dict[str, Any]] = []
    for i, (step, eval_loss) in enumerate(zip(steps, losses, strict=True)):
        epoch = step / 8
        history.append(
            {"epoch": epoch, "grad_norm": 1.5 - i / 10, "learning_rate": 5e-05, "loss": 1.0 - i / 10, "step": step}
        )
        history.append(
            {
                "epoch": epoch,
                "eval_loss": eval_loss,
                "eval_runtime": 0.1234,
                "eval_samples_per_second": 810.3,
                "eval_steps_per_second": 101.3,
                "step": step,
            }
        )
        d = out / f"checkpoint-{step}"
        d.mkdir()
        g = torch.Generator().manual_seed(step)
        (d / "model.safetensors").write_bytes(safetensors_bytes({"w": torch.randn(8, 8, generator=g)}))
        (d / "config.json").write_text(json.dumps({"architectures": ["Tiny"], "model_type": "tiny"}))
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            (d / name).write_bytes(os.urandom(256))
        state = {
            "best_global_step": best[1],
            "best_metric": best[0] if step >= best[1] else None,
            "best_model_checkpoint": f"out/checkpoint-{best[1]}" if step >= best[1] else None,
            "epoch": epoch,
            "eval_steps": 4,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": list(history),
            "logging_steps": 4,
            "max_steps": steps[-1],
            "num_input_tokens_seen": 0,
            "num_train_epochs": 2,
            "save_steps": 4,
            "stateful_callbacks": {"TrainerControl": {"args": {"should_save": True}, "attributes": {}}},
            "total_flos": 1234.0,
            "train_batch_size": 8,
            "trial_name": None,
            "trial_params": None,
        }
        (d / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return out


# --- name and state parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("epoch=3-step=120-val_loss=0.230.ckpt", (3, 120, {"val_loss": 0.23})),
        ("epoch=3-step=120.ckpt", (3, 120, {})),
        ("epoch=3-step=120-v1.ckpt", (3, 120, {})),
        ("epoch=0-step=10-val_loss=-0.500-val_acc=1e-05.ckpt", (0, 10, {"val_loss": -0.5, "val_acc": 1e-05})),
        ("unet-epoch=2-val_iou=0.7100000262260437.ckpt", (2, None, {"val_iou": 0.7100000262260437})),
        ("last.ckpt", (None, None, {})),
        ("03-0.23.ckpt", (None, None, {})),
    ],
)
def test_parse_lightning_name(name: str, expected: tuple[Any, ...]) -> None:
    assert parse_lightning_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model_epoch5_step500.pt", (5, 500)),
        ("step-7.bin", (None, 7)),
        ("it100.safetensors", (None, 100)),
        ("split_3.pt", (None, None)),
        ("final.pth", (None, None)),
    ],
)
def test_parse_plain_name(name: str, expected: tuple[Any, ...]) -> None:
    assert parse_plain_name(name) == expected


def test_hf_metrics_at_step() -> None:
    state = {
        "global_step": 12,
        "epoch": 1.5,
        "log_history": [
            {"epoch": 0.5, "loss": 0.9, "step": 4},
            {"epoch": 1.0, "eval_loss": 0.4, "eval_runtime": 1.0, "eval_samples_per_second": 3.0, "step": 8},
            {"epoch": 1.0, "loss": 0.7, "learning_rate": 1e-5, "step": 8},
        ],
    }
    assert hf_metrics(state, 8) == (1, {"eval_loss": 0.4, "loss": 0.7, "learning_rate": 1e-5})
    assert hf_metrics(state, 4) == (None, {"loss": 0.9, "hf_epoch": 0.5})
    assert hf_metrics(state, 12) == (None, {"hf_epoch": 1.5})


# --- Lightning ------------------------------------------------------------------------------------


def test_lightning_import_best_and_last(tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    version = lightning_tree(tmp_path)
    res = run_json("import", str(version), "--task", "pl")
    assert res["format"] == "lightning" and res["created_task"] is True and res["added"] == 3
    rows = {r["original_name"]: r for r in res["checkpoints"]}
    assert rows["checkpoints/last.ckpt"]["action"] == "duplicate"
    assert "epoch=2-step=150" in rows["checkpoints/last.ckpt"]["note"]
    cps = run_json("list", "pl")
    assert [(c["number"], c["step"], c["epoch"], c["metrics"]) for c in cps] == [
        (1, 50, 0, {"val_loss": 0.512}),
        (2, 100, 1, {"val_loss": 0.301}),
        (3, 150, 2, {"val_loss": 0.347}),
    ]
    # links by default: the record's file is the source's inode, and the source is untouched
    src = version / "checkpoints" / "epoch=1-step=100-val_loss=0.301.ckpt"
    assert os.stat(ws.root / cps[1]["path"]).st_ino == os.stat(src).st_ino
    assert ws.task("pl").checkpoint(2).original_name == "checkpoints/epoch=1-step=100-val_loss=0.301.ckpt"
    model = run_json("promote", "pl", "--best", "val_loss", "--min", "--title", "pl-best")
    assert model["checkpoint"] == 2
    show = run_json("show", "pl", "2")
    assert show["format"] == "torch-zip" and "layer.weight" in {t["name"] for t in show["tensors"]}
    assert show["weights_under"] == "state_dict"


def test_lightning_reimport_changes_nothing(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    version = lightning_tree(tmp_path)
    run_json("import", str(version), "--task", "pl")
    manifest = ws.task("pl").manifest
    before = manifest.read_bytes()
    files_before = sorted(p.name for p in (manifest.parent / "checkpoints").iterdir())
    again = run_json("import", str(version), "--task", "pl")
    assert again["added"] == 0
    assert {r["action"] for r in again["checkpoints"]} == {"already", "duplicate"}
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in (manifest.parent / "checkpoints").iterdir()) == files_before


def test_lightning_reads_epoch_and_step_inside_without_torch(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """A template without metric names ('{epoch:02d}') and a last.ckpt that repeats nothing: the file's
    own epoch/global_step fill in, read in a process that never imports torch."""
    cdir = tmp_path / "run" / "checkpoints"
    cdir.mkdir(parents=True)
    lightning_ckpt(cdir / "07.ckpt", 7, 700, seed=1)
    lightning_ckpt(cdir / "03.ckpt", 3, 300, seed=2)
    lightning_ckpt(cdir / "last.ckpt", 8, 800, seed=3)
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from ckpt.cli import app\n"
        f"r = CliRunner().invoke(app, ['import', {str(cdir)!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules\n"
        "print(r.stdout)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["task"] == "run"  # named after the run folder, not 'checkpoints'
    assert [(r["original_name"], r["number"], r["step"], r["epoch"]) for r in res["checkpoints"]] == [
        ("03.ckpt", 1, 300, 3),
        ("07.ckpt", 2, 700, 7),
        ("last.ckpt", 3, 800, 8),
    ]


def test_lightning_symlinked_last_is_skipped(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    cdir = tmp_path / "ck"
    cdir.mkdir()
    lightning_ckpt(cdir / "epoch=0-step=5.ckpt", 0, 5, seed=0)
    (cdir / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")  # save_last="link"
    res = run_json("import", str(cdir), "--task", "t")
    assert [(r["original_name"], r["action"]) for r in res["checkpoints"]] == [
        ("epoch=0-step=5.ckpt", "added"),
        ("last.ckpt", "skipped"),
    ]


# --- Hugging Face ---------------------------------------------------------------------------------


def test_hf_import_numeric_order_metrics_and_promote(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    out = hf_tree(tmp_path)
    res = run_json("import", str(out), "--task", "hf")
    assert res["format"] == "huggingface" and res["added"] == 3
    cps = run_json("list", "hf")
    # numeric order: checkpoint-12 comes after checkpoint-8 (string order would put it first)
    assert [(c["number"], c["step"]) for c in cps] == [(1, 4), (2, 8), (3, 12)]
    assert cps[1]["metrics"]["eval_loss"] == 0.4 and cps[1]["epoch"] == 1
    assert cps[0]["metrics"]["hf_epoch"] == 0.5 and cps[0]["epoch"] is None
    assert "eval_runtime" not in cps[1]["metrics"] and "eval_samples_per_second" not in cps[1]["metrics"]
    assert cps[1]["path"] == "tasks/hf/checkpoints/000002"
    folder = out / "checkpoint-8"
    assert cps[1]["size"] == sum(p.stat().st_size for p in folder.iterdir())
    assert ws.task("hf").checkpoint(2).sha256 == ckpt.hashing.hash_tree(folder)[0]
    notes = {r["original_name"]: r["note"] for r in res["checkpoints"]}
    assert notes["checkpoint-8"] == "the Trainer's best_model_checkpoint"

    model = run_json("promote", "hf", "--best", "eval_loss", "--min", "--title", "hf-best")
    assert model["checkpoint"] == 2 and model["size"] == cps[1]["size"]
    mdir = ws.root / model["path"]
    assert mdir.is_dir()
    for name in ("model.safetensors", "trainer_state.json", "optimizer.pt"):
        assert os.stat(mdir / name).st_ino == os.stat(folder / name).st_ino  # linked file by file
    show = run_json("show", "hf", "2")
    assert show["format"] == "safetensors" and show["tensors"] == [{"name": "w", "shape": [8, 8], "dtype": "float32"}]
    assert run_json("verify", "hf", "--models")["ok"] is True
    again = run_json("import", str(out), "--task", "hf")
    assert again["added"] == 0


def test_hf_import_one_checkpoint_folder_and_copy(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    out = hf_tree(tmp_path)
    res = run_json("import", str(out / "checkpoint-12"), "--task", "one", "--copy")
    assert res["added"] == 1 and res["checkpoints"][0]["step"] == 12
    dst = ws.root / "tasks/one/checkpoints/000001/model.safetensors"
    assert dst.read_bytes() == (out / "checkpoint-12" / "model.safetensors").read_bytes()
    assert os.stat(dst).st_ino != os.stat(out / "checkpoint-12" / "model.safetensors").st_ino
    model = run_json("promote", "one", "1", "--title", "one-copy", "--copy")
    assert model["storage"] == "copy"


# --- plain files ----------------------------------------------------------------------------------


def test_plain_files_numeric_and_mtime_order(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for n in (10, 9, 3):
        (numbered / f"model_step{n}.pt").write_bytes(os.urandom(100 + n))
    (numbered / "notes.txt").write_text("not a checkpoint")
    res = run_json("import", str(numbered), "--task", "num")
    assert res["format"] == "files"
    assert [(r["number"], r["original_name"], r["step"]) for r in res["checkpoints"]] == [
        (1, "model_step3.pt", 3),
        (2, "model_step9.pt", 9),
        (3, "model_step10.pt", 10),
    ]
    by_time = tmp_path / "by_time"
    by_time.mkdir()
    for i, name in enumerate(["final.safetensors", "warmup.bin", "best.pth"]):
        p = by_time / name
        p.write_bytes(os.urandom(64))
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
    res = run_json("import", str(by_time), "--task", "time")
    assert [r["original_name"] for r in res["checkpoints"]] == ["final.safetensors", "warmup.bin", "best.pth"]
    cps = run_json("list", "time")
    assert [c["path"].rsplit("/", 1)[1] for c in cps] == ["000001.safetensors", "000002.bin", "000003.pth"]
    assert cps[0]["created"].startswith("2023-11-14T22:13:20")  # the file's modification time


def test_move_takes_the_files(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    src = tmp_path / "moveme"
    src.mkdir()
    (src / "a_1.pt").write_bytes(b"one")
    (src / "a_2.pt").write_bytes(b"two")
    res = run_json("import", str(src), "--task", "mv", "--move")
    assert res["added"] == 2 and not list(src.iterdir())
    assert (ws.root / "tasks/mv/checkpoints/000002.pt").read_bytes() == b"two"


def test_import_errors(tmp_path: Path, ws: ckpt.Workspace, run: Any) -> None:
    r = run("import", str(tmp_path / "nope"))
    assert r.exit_code == 3 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("import", str(tmp_path / "empty"))
    assert r.exit_code == 3 and "no files checkpoints" in r.stderr
    r = run("import", str(tmp_path / "empty"), "--copy", "--move")
    assert r.exit_code == 2
    r = run("import", str(tmp_path / "empty"), "--format", "tf")
    assert r.exit_code == 2


def test_import_into_finished_task_is_a_conflict(tmp_path: Path, ws: ckpt.Workspace, run: Any) -> None:
    ws.create_task("done").finish()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "w_1.pt").write_bytes(b"w")
    r = run("import", str(tmp_path / "x"), "--task", "done")
    assert r.exit_code == 4 and "finished" in r.stderr
    assert (tmp_path / "x" / "w_1.pt").exists() and not list((ws.root / "tasks/done/checkpoints").iterdir())


def test_failed_commit_leaves_no_staging_and_puts_moved_files_back(
    tmp_path: Path, ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt import fsutil
    from ckpt.importer import import_path

    src = tmp_path / "src"
    src.mkdir()
    (src / "w_1.pt").write_bytes(b"one")

    def broken(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "append_durably", broken)
    with pytest.raises(OSError):
        import_path(ws, src, task="t", mode="move")
    assert (src / "w_1.pt").read_bytes() == b"one"  # nothing was recorded: the moved file went back
    assert not (ws.root / "tasks/t").exists()  # nor the task the failed import created
    monkeypatch.undo()
    assert import_path(ws, src, task="t", mode="move").added == 1
    assert ws.task("t").checkpoint(1).original_name == "w_1.pt"


# --- trash-unused keeps what was promoted -----------------------------------------------------------


def _needs_trash(run: Any) -> None:
    if run("trash-unused", "--help").exit_code != 0:
        pytest.skip("ckpt trash-unused is not there yet")


def test_trash_unused_keeps_promoted_lightning_import(
    tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any
) -> None:
    _needs_trash(run)
    version = lightning_tree(tmp_path)
    run_json("import", str(version), "--task", "pl")
    run_json("promote", "pl", "--best", "val_loss", "--min", "--title", "pl-best")
    r = run("trash-unused", "pl", "--json")
    assert r.exit_code == 0, r.output
    assert [c["number"] for c in run_json("list", "pl")] == [2, 3]  # the promoted best and the latest
    assert run_json("verify", "pl", "--models")["ok"] is True
    assert len(list((version / "checkpoints").iterdir())) == 4  # the source is never touched


def test_trash_unused_keeps_promoted_hf_import(tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    _needs_trash(run)
    out = hf_tree(tmp_path, steps=(4, 8, 12, 16), losses=(0.9, 0.3, 0.6, 0.7))
    run_json("import", str(out), "--task", "hf")
    run_json("promote", "hf", "--best", "eval_loss", "--min", "--title", "hf-best")
    r = run("trash-unused", "hf", "--json")
    assert r.exit_code == 0, r.output
    left = [c["number"] for c in run_json("list", "hf")]
    assert 2 in left and 4 in left  # the promoted best and the latest are kept in any case
    assert run_json("verify", "hf", "--models")["ok"] is True
    assert (out / "checkpoint-4" / "model.safetensors").exists()  # the source is never touched
    assert left == [2, 4]


def test_fast_record_bytes_match_tomli_w() -> None:
    """Import writes thousands of records; its fast writer must give exactly what tomli-w gives."""
    from ckpt.adding import record_bytes_fast
    from ckpt.manifest import Checkpoint, record_bytes

    base = {
        "number": 7,
        "file": "checkpoints/000007",
        "size": 10,
        "sha256": "ab" * 32,
        "created": "2024-01-01T00:00:00+00:00",
    }
    cases = [
        Checkpoint(**base),
        Checkpoint(**base, step=5, epoch=0, original_name="checkpoint-5", metrics={"eval_loss": 0.25, "n": 3}),
        Checkpoint(**base, original_name='we"ird\\name é.ckpt', metrics={"val/loss": float("nan"), "a b": 1e-05}),
        Checkpoint(**base, metrics={"x": float("inf"), "y": -0.0, "z": 1e300}),
        Checkpoint(**base, epoch=3, original_name="epoch=3-val_loss=0.5.ckpt", metrics={"val_loss": 0.5, "k": -2}),
        Checkpoint(**base, step=0, original_name="a\tb.ckpt"),
        Checkpoint(**{**base, "created": "2024-01-01T00:00:00.000001+00:00"}, step=12, epoch=1),
    ]
    for cp in cases:
        assert record_bytes_fast(cp) == record_bytes(cp)


def test_two_imports_at_once_add_each_checkpoint_once(tmp_path: Path, ws: ckpt.Workspace) -> None:
    version = lightning_tree(tmp_path)
    ws.create_task("pl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "ckpt", "import", str(version), "--task", "pl", "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert sum(json.loads(o[0])["added"] for o in outs) == 3
    cps = ws.task("pl").checkpoints
    assert [cp.step for cp in cps] == [50, 100, 150]
    assert not [p for p in (ws.root / "tasks/pl/checkpoints").iterdir() if p.name.startswith(".")]


def test_import_from_inside_the_workspace_is_refused(ws: ckpt.Workspace, run: Any) -> None:
    task = ws.create_task("t")
    task.save(b"abc")
    r = run("import", str(task.folder / "checkpoints"), "--task", "again")
    assert r.exit_code == 2 and "ckpt scan" in r.stderr


def test_lightning_version_folder_named_after_project(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    cdir = tmp_path / "segproj" / "lightning_logs" / "version_2" / "checkpoints"
    cdir.mkdir(parents=True)
    (cdir / "epoch=0-step=10.ckpt").write_bytes(b"a" * 10)
    (cdir / "epoch=1-step=20.ckpt").write_bytes(b"b" * 10)
    res = run_json("import", str(cdir.parent), "--format", "lightning")
    assert res["task"] == "segproj-version_2"
