"""`ckpt import` of runs made by the real libraries (tests/real_runs.py): a Lightning fit with the default
checkpoint name and a CSVLogger, and a Hugging Face Trainer run with metric_for_best_model. Each run
happens once per module, in its own process (lightning and transformers come with the dev extra)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt

RUNS = Path(__file__).with_name("real_runs.py")


def _train(kind: str, where: Path, needs: str) -> Path:
    if importlib.util.find_spec(needs) is None:
        if os.environ.get("CI"):  # .ci/run installs the dev extra: a skip there would hide a broken install
            pytest.fail(f"{needs} is not installed; the dev extra brings it")
        pytest.skip(f"needs {needs} (pip install -e '.[dev]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [sys.executable, str(RUNS), kind, str(where)], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return where


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("lightning", tmp_path_factory.mktemp("lightning"), "lightning")


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("trainer", tmp_path_factory.mktemp("trainer") / "out", "transformers")


def test_lightning_default_names_get_every_logged_metric(
    lightning_run: Path, ws: ckpt.Workspace, run_json: Any
) -> None:
    version = lightning_run / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (version / "checkpoints").iterdir()) == [
        "epoch=0-step=4.ckpt",
        "epoch=1-step=8.ckpt",
        "epoch=2-step=12.ckpt",
    ]
    # what Lightning reported at each of its saves (two callbacks save at the end of each epoch)
    truth = {(s["epoch"], s["step"]): s["metrics"] for s in json.loads((lightning_run / "saved.json").read_text())}
    res = run_json("import", str(version), "--task", "pl")
    assert res["added"] == 3
    got = {(r["epoch"], r["step"]): r["metrics"] for r in res["checkpoints"]}
    assert set(got) == {(0, 4), (1, 8), (2, 12)}
    for key, metrics in got.items():
        assert metrics == pytest.approx(truth[key], rel=1e-6), key
        assert set(metrics) == {"train_loss", "val_loss", "val_acc"}
    # the CSVLogger writes validation one step before the checkpoint's step: the join takes it anyway
    with open(version / "metrics.csv", newline="") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert val_steps == [3, 7, 11]
    header = ws.task("pl").header
    # both callbacks' modes are in every file: val_loss from its monitor, val_acc from the other's
    assert header.metric_modes == {"val_loss": "min", "val_acc": "max"}
    assert header.source == {"path": str(version.resolve()), "how": "link"}
    best = min(got, key=lambda k: got[k]["val_loss"])
    notes = {(r["epoch"], r["step"]): r["note"] for r in res["checkpoints"]}
    assert notes[best] == "Lightning's best_model_path (val_loss)"
    # no flag needed: the lowest val_loss (by Lightning's own mode) and the highest val_acc are chosen
    model = run_json("promote", "pl", "--best", "val_loss", "--title", "pl-loss")
    assert (model["epoch"], model["step"], model["direction"], model["direction_source"]) == (*best, "min", "task")
    model = run_json("promote", "pl", "--best", "val_acc", "--title", "pl-acc")
    assert model["direction"] == "max" and model["direction_source"] == "task"


def test_lightning_named_file_takes_the_monitored_value_from_the_file(
    lightning_run: Path, ws: ckpt.Workspace, run_json: Any
) -> None:
    """A '{epoch}-{val_acc:.2f}' name rounds the value; the callback's own record in the file is exact."""
    truth = {s["step"]: s["metrics"] for s in json.loads((lightning_run / "saved.json").read_text())}
    res = run_json("import", str(lightning_run / "best_acc"), "--task", "acc", "--copy")
    (row,) = res["checkpoints"]
    name_value = float(row["original_name"].rsplit("val_acc=", 1)[1][: -len(".ckpt")])
    exact = truth[row["step"]]["val_acc"]
    assert name_value != exact and round(exact, 2) == name_value
    assert row["metrics"]["val_acc"] == pytest.approx(exact, rel=1e-7)
    assert ws.task("acc").header.metric_modes == {"val_loss": "min", "val_acc": "max"}
    assert ws.task("acc").header.source == {"path": str((lightning_run / "best_acc").resolve()), "how": "copy"}


def test_trainer_direction_comes_from_training_args(trainer_run: Path, ws: ckpt.Workspace, run_json: Any) -> None:
    res = run_json("import", str(trainer_run), "--task", "bert")
    assert res["format"] == "huggingface" and res["added"] == 3
    history = json.loads((trainer_run / "saved.json").read_text())
    evals = {h["step"]: h["eval_score"] for h in history if "eval_score" in h}
    got = {r["step"]: r["metrics"] for r in res["checkpoints"]}
    assert set(got) == {2, 4, 6} == set(evals)
    for step, metrics in got.items():
        assert metrics["eval_score"] == evals[step]
        assert "eval_loss" in metrics and "loss" in metrics
    header = ws.task("bert").header
    # "eval_score" says nothing by its name: greater_is_better=False in training_args.bin does
    assert header.metric_modes == {"eval_score": "min"}
    assert header.source == {"path": str(trainer_run.resolve()), "how": "link"}
    model = run_json("promote", "bert", "--best", "eval_score", "--title", "bert-best")
    assert (model["step"], model["direction"], model["direction_source"]) == (min(evals, key=evals.get), "min", "task")


def test_trainer_unreadable_training_args_fall_back_to_the_name_rule(
    trainer_run: Path, tmp_path: Path, ws: ckpt.Workspace, run: Any, run_json: Any
) -> None:
    out = tmp_path / "out"
    for d in sorted(trainer_run.glob("checkpoint-*")):
        (out / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (out / d.name / f.name).write_bytes(f.read_bytes())
        (out / d.name / "training_args.bin").write_bytes(b"PK\x03\x04 not a torch archive")
    res = run_json("import", str(out), "--task", "bert")
    assert res["added"] == 3
    assert ws.task("bert").header.metric_modes == {}
    result = run("promote", "bert", "--best", "eval_score", "--title", "x")
    assert result.exit_code == 2, result.output  # nothing says which way: --min or --max is asked for
    assert "--min or --max" in result.output


def test_show_of_a_lightning_file_counts_only_the_weights(
    lightning_run: Path, ws: ckpt.Workspace, run_json: Any
) -> None:
    import torch

    version = lightning_run / "lightning_logs" / "version_0"
    run_json("import", str(version), "--task", "pl")
    shown = run_json("show", "pl", "3")
    state = torch.load(version / "checkpoints" / "epoch=2-step=12.ckpt", weights_only=True)["state_dict"]
    assert shown["weights_under"] == "state_dict"
    assert [t["name"] for t in shown["tensors"]] == list(state)  # the state dict's own keys, nothing else
    assert shown["parameters"] == sum(v.numel() for v in state.values())
    assert shown["other_tensors"].get("callbacks", 0) > 0  # the callbacks' scores: not parameters
