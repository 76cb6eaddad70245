"""What import learns beyond file names: Lightning's callback state and CSVLogger log, the Trainer's
training_args.bin, and where a task's files came from. Files are made with torch.save in the shapes
those libraries write (tests/test_real_runs.py checks the same against the real libraries)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.import_names import trainer_modes
from ckpt.lightning_state import read_lightning_state, read_training_args

KEY = "ModelCheckpoint{{'monitor': '{monitor}', 'mode': '{mode}', 'every_n_train_steps': 0, 'every_n_epochs': 1}}"


def callback(monitor: str, mode: str, current: Any, kept: dict[str, Any], last: str = "") -> dict[str, Any]:
    best = min(kept, key=lambda k: float(kept[k]) * (1 if mode == "min" else -1)) if kept else ""
    return {
        KEY.format(monitor=monitor, mode=mode): {
            "monitor": monitor,
            "best_model_score": kept.get(best),
            "best_model_path": best,
            "current_score": current,
            "dirpath": "/runs/x/checkpoints",
            "best_k_models": kept,
            "kth_best_model_path": "",
            "kth_value": None,
            "last_model_path": last,
        }
    }


def save(path: Path, epoch: int, step: int, callbacks: dict[str, Any]) -> None:
    """A file shaped as Lightning's Trainer.save_checkpoint writes it."""
    torch.save(
        {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": "2.6.0",
            "state_dict": {"w": torch.zeros(2, 2)},
            "callbacks": callbacks,
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )


CSV = """epoch,step,train_loss,val_acc,val_loss
0,0,5.5,,
0,1,4.25,,
0,1,,0.25,0.73521
1,2,3.5,,
1,3,2.0,,
1,3,,nan,0.11914
"""


def run_folder(tmp_path: Path) -> Path:
    """lightning_logs/version_0 of two epochs of 2 steps, ModelCheckpoint(monitor="val_loss", save_top_k=-1,
    save_last=True): the CSVLogger logs validation at step 1 and 3, the files say step 2 and 4."""
    version = tmp_path / "lightning_logs" / "version_0"
    cdir = version / "checkpoints"
    cdir.mkdir(parents=True)
    (version / "metrics.csv").write_text(CSV)
    first, second = str(cdir / "epoch=0-step=2.ckpt"), str(cdir / "epoch=1-step=4-val_loss=0.12.ckpt")
    scores = {first: torch.tensor(0.73521), second: torch.tensor(0.11914)}
    save(Path(first), 0, 2, callback("val_loss", "min", scores[first], {first: scores[first]}))
    save(Path(second), 1, 4, callback("val_loss", "min", scores[second], scores))
    # last.ckpt: saved after the top-k file, by the same callback; its current_score is not its own record
    stale = callback("val_loss", "min", torch.tensor(9.0), scores, last=str(cdir / "last.ckpt"))
    save(cdir / "last.ckpt", 1, 4, stale)
    return version


def test_two_versions_each_read_their_own_log(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    """lightning_logs/version_0 and version_1 repeat file names: each file joins its own metrics.csv."""
    run_folder(tmp_path)
    v1 = tmp_path / "lightning_logs" / "version_1"
    (v1 / "checkpoints").mkdir(parents=True)
    (v1 / "metrics.csv").write_text("epoch,step,train_loss,val_loss\n1,3,8.5,\n1,3,,0.5\n")
    path = v1 / "checkpoints" / "epoch=1-step=4-val_loss=0.12.ckpt"  # version_0's best's name, other bytes
    save(path, 1, 4, callback("val_loss", "min", torch.tensor(0.5), {str(path): torch.tensor(0.5)}))
    res = run_json("import", str(tmp_path / "lightning_logs"), "--task", "pl")
    rows = {r["original_name"]: r for r in res["checkpoints"]}
    assert rows["version_0/checkpoints/epoch=1-step=4-val_loss=0.12.ckpt"]["metrics"]["train_loss"] == 2.0
    assert rows["version_1/checkpoints/epoch=1-step=4-val_loss=0.12.ckpt"]["metrics"] == {
        "train_loss": 8.5,
        "val_loss": 0.5,
    }
    # the latest file (version_0's step 4) names its own run's best, not version_1's file of a repeated name
    assert [r["original_name"] for r in res["checkpoints"] if r["note"] and "best_model_path" in r["note"]] == [
        "version_0/checkpoints/epoch=1-step=4-val_loss=0.12.ckpt"
    ]


def test_metrics_from_state_name_and_log(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    version = run_folder(tmp_path)
    res = run_json("import", str(version), "--task", "pl")
    rows = {r["original_name"]: r for r in res["checkpoints"]}
    first = rows["checkpoints/epoch=0-step=2.ckpt"]["metrics"]
    # the log's last value in the file's epoch at a step <= the file's: validation logged one step early
    assert first == {"train_loss": 4.25, "val_acc": 0.25, "val_loss": pytest.approx(0.73521, rel=1e-6)}
    second = rows["checkpoints/epoch=1-step=4-val_loss=0.12.ckpt"]["metrics"]
    # val_loss: the name's rounded 0.12, the log's 0.11914, the file's float32 record: the file's wins
    assert second["val_loss"] == pytest.approx(0.11914, rel=1e-6) and second["val_loss"] != 0.11914
    assert second["train_loss"] == 2.0 and second["val_acc"] is None  # NaN in the log: null in JSON
    assert math.isnan(ws.task("pl").checkpoint(2).metrics["val_acc"])
    last = rows["checkpoints/last.ckpt"]
    assert last["action"] == "added" and last["metrics"]["val_loss"] == 0.11914  # from the log, not the stale 9.0
    assert rows["checkpoints/epoch=1-step=4-val_loss=0.12.ckpt"]["note"] == "Lightning's best_model_path (val_loss)"
    header = ws.task("pl").header
    assert header.metric_modes == {"val_loss": "min"}
    assert header.source == {"path": str(version.resolve()), "how": "link"}
    assert (ws.task("pl").manifest.read_text()).count("[metric_modes]") == 1


def test_name_wins_over_a_log_that_disagrees(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    """A value in the name that the log's value does not round to is the file's own; a metrics.csv beside
    the files (no checkpoints folder) is read too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,val_acc\n0,9,0.9012\n")
    save(run / "epoch=0-step=10-val_acc=0.5.ckpt", 0, 10, {})
    save(run / "epoch=0-step=11-val_acc=0.90.ckpt", 0, 11, {})
    res = run_json("import", str(run), "--task", "t")
    assert [r["metrics"] for r in res["checkpoints"]] == [{"val_acc": 0.5}, {"val_acc": 0.9012}]  # 0.90 rounds it
    assert ws.task("t").header.metric_modes == {}  # no callback state: nothing recorded, the name rule decides


def test_scores_of_every_dtype_and_views(tmp_path: Path) -> None:
    values = torch.arange(4, dtype=torch.float64) / 8
    cases = {
        "f64": values[3],  # a view: offset 3 into a storage of 4
        "bf16": torch.tensor(0.375, dtype=torch.bfloat16),
        "f16": torch.tensor(0.625, dtype=torch.float16),
        "i64": torch.tensor(7),
    }
    for name, score in cases.items():
        path = tmp_path / f"{name}.ckpt"
        save(path, 2, 30, callback("m", "max", score, {str(path): score}))
        (mon,) = read_lightning_state(path).monitors
        assert (mon.monitor, mon.mode, mon.score, mon.current_score) == ("m", "max", float(score), float(score)), name
    state = read_lightning_state(tmp_path / "f64.ckpt")
    assert (state.epoch, state.global_step, state.monitors[0].best_model_name) == (2, 30, "f64.ckpt")


def test_modes_recorded_both_ways_are_left_out(tmp_path: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save(run / "epoch=0-step=1.ckpt", 0, 1, callback("score", "min", 1.0, {}))
    save(run / "epoch=1-step=2.ckpt", 1, 2, callback("score", "max", 2.0, {}) | callback("loss", "min", 1.0, {}))
    run_json("import", str(run), "--task", "t")
    assert ws.task("t").header.metric_modes == {"loss": "min"}


def test_a_task_keeps_its_directions_and_learns_the_latest_source(
    tmp_path: Path, ws: ckpt.Workspace, run_json: Any
) -> None:
    ws.create_task("pl", metric_modes={"val_loss": "max"})  # what the user said stays
    version = run_folder(tmp_path)
    run_json("import", str(version), "--task", "pl", "--copy")
    header = ws.task("pl").header
    assert header.metric_modes == {"val_loss": "max"}
    assert header.source == {"path": str(version.resolve()), "how": "copy"}
    before = ws.task("pl").manifest.read_bytes()
    run_json("import", str(version), "--task", "pl")  # nothing new: nothing rewritten
    assert ws.task("pl").manifest.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    save(other / "epoch=5-step=50.ckpt", 5, 50, callback("val_acc", "max", 0.5, {}))
    run_json("import", str(other / "epoch=5-step=50.ckpt"), "--task", "pl", "--move")
    header = ws.task("pl").header
    assert header.metric_modes == {"val_loss": "max", "val_acc": "max"}
    assert header.source == {"path": str(other.resolve()), "how": "move"}
    assert len(ws.task("pl").checkpoints) == 4


@dataclasses.dataclass
class TrainingArguments:  # the fields of transformers' TrainingArguments that import reads
    output_dir: str = "out"
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    learning_rate: float = 5e-5


@pytest.mark.parametrize(
    ("metric", "greater", "expected"),
    [
        ("f1", True, {"eval_f1": "max"}),
        ("eval_wer", False, {"eval_wer": "min"}),
        ("loss", None, {"eval_loss": "min"}),  # the Trainer compares with `<` unless greater_is_better
        (None, None, {}),
    ],
)
def test_trainer_modes(tmp_path: Path, metric: str | None, greater: bool | None, expected: dict[str, str]) -> None:
    path = tmp_path / "training_args.bin"
    torch.save(TrainingArguments(metric_for_best_model=metric, greater_is_better=greater), path)
    assert read_training_args(path)["learning_rate"] == 5e-5
    assert trainer_modes(path) == expected


def test_unreadable_training_args(tmp_path: Path) -> None:
    bad = tmp_path / "training_args.bin"
    bad.write_bytes(b"PK\x03\x04garbage")
    assert read_training_args(bad) == {} and trainer_modes(bad) == {}
    assert trainer_modes(tmp_path / "missing.bin") == {}


def test_header_on_each_backend(tmp_path: Path, any_ws: ckpt.Workspace, run_json: Any) -> None:
    version = run_folder(tmp_path)
    run_json("import", str(version), "--task", "pl")
    header = any_ws.task("pl").header
    assert header.metric_modes == {"val_loss": "min"}
    assert header.source == {"path": str(version.resolve()), "how": "link"}
    other = tmp_path / "other"
    other.mkdir()
    save(other / "epoch=5-step=50.ckpt", 5, 50, callback("val_acc", "max", 0.5, {}))
    run_json("import", str(other), "--task", "pl", "--copy")
    fresh = ckpt.Workspace.open(any_ws.location).task("pl")  # as another process reads it
    assert fresh.header.metric_modes == {"val_loss": "min", "val_acc": "max"}
    assert fresh.header.source == {"path": str(other.resolve()), "how": "copy"}
    assert [cp.number for cp in fresh.checkpoints] == [1, 2, 3, 4]
