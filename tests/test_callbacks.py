"""ckpt's callbacks driving real training runs (tests/callback_runs.py, each in its own process): a Lightning fit
that crashes and is restarted into the same task, and a Hugging Face Trainer run whose checkpoint folders are
taken into a task. After training, `ckpt list` shows what the policy kept, with metrics; the rest is in the
trash and restores byte for byte; the finished model exists."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import ckpt

RUNS = Path(__file__).with_name("callback_runs.py")


def _train(needs: str, *args: str) -> None:
    if importlib.util.find_spec(needs) is None:
        if os.environ.get("CI"):  # .ci/run installs the dev extra: a skip there would hide a broken install
            pytest.fail(f"{needs} is not installed; the dev extra brings it")
        pytest.skip(f"needs {needs} (pip install -e '.[dev]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("CKPT_WORKSPACE", None)
    p = subprocess.run([sys.executable, str(RUNS), *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.fixture(scope="module")
def lightning_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("lightning") / "ws"
    _train("lightning", "lightning", str(ws))
    return ws


@pytest.fixture(scope="module")
def trainer_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    _train("transformers", "trainer", str(root / "ws"), str(root / "out"))
    return root / "ws"


def _restore_all(run: Any, run_json: Any, ws: Path) -> None:
    for entry in run_json("-w", str(ws), "trash", "list"):
        run_json("-w", str(ws), "trash", "restore", entry["id"])
    verified = run("-w", str(ws), "verify", "--models")  # every file against the sha256 recorded at save
    assert verified.exit_code == 0, verified.output


def test_lightning_callback_saves_restarts_and_applies_the_policy(
    lightning_ws: Path, run: Any, run_json: Any, tmp_path: Path
) -> None:
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(lightning_ws, ws, symlinks=True)
    truth = json.loads(lightning_ws.with_name("lightning.json").read_text())
    seen = {s["step"]: s for s in truth["seen"]}
    # the first process saved 1 and 2 and crashed in epoch 2; the restart resumed from 2 and saved 3 and 4
    assert truth["resumed_from"].endswith("tasks/tiny/checkpoints/000002.ckpt")
    rows = run_json("-w", str(ws), "list", "tiny")
    assert [r["number"] for r in rows] == [3, 4]  # keep-last 2 (the best, 4, is the latest too)
    for r in rows:
        assert r["metrics"] == pytest.approx(seen[r["step"]]["metrics"], rel=1e-6)
        assert r["epoch"] == seen[r["step"]]["epoch"]
    task = ckpt.Workspace.open(ws).task("tiny")
    assert task.status == "finished" and task.header.metric_modes == {"val_loss": "min"}
    assert run_json("-w", str(ws), "models", "show", "tiny-4")["checkpoint"] == 4
    trashed = sorted(n for e in run_json("-w", str(ws), "trash", "list") for n in e["checkpoints"])
    assert trashed == [1, 2]
    by_steps = run_json("-w", str(ws), "list", "by-steps")
    # steps 3 and 6, and the fit's last state (step 8), which `finish` makes the model
    assert [(r["step"], r["epoch"]) for r in by_steps] == [(3, 0), (6, 1), (8, 1)]
    assert "train_loss" in by_steps[0]["metrics"]
    assert [m["checkpoint"] for m in run_json("-w", str(ws), "models") if m["task"] == "by-steps"] == [3]
    _restore_all(run, run_json, ws)
    rows = run_json("-w", str(ws), "list", "tiny")
    assert [(r["number"], r["step"], r["epoch"]) for r in rows] == [(1, 4, 0), (2, 8, 1), (3, 12, 2), (4, 16, 3)]


def test_trainer_callback_takes_checkpoints_in_and_frees_what_it_trashes(
    trainer_ws: Path, run: Any, run_json: Any
) -> None:
    ws = trainer_ws
    out = ws.with_name("out")
    truth = json.loads(ws.with_name("trainer.json").read_text())
    evals = {h["step"]: h for h in truth["log_history"] if "eval_score" in h}
    rows = run_json("-w", str(ws), "list", "bert")
    best_step = min(evals, key=lambda s: evals[s]["eval_score"])  # greater_is_better=False
    assert [r["step"] for r in rows] == sorted({best_step, 8})  # keep-best 1 by eval_score, and the latest
    for r in rows:
        assert r["metrics"]["eval_score"] == pytest.approx(evals[r["step"]]["eval_score"], rel=1e-6)
    task = ckpt.Workspace.open(ws).task("bert")
    assert task.status == "finished" and task.header.metric_modes == {"eval_score": "min"}
    assert run_json("-w", str(ws), "models", "show", "bert-4")["step"] == 8
    # no copy lingers in the output folder: each checkpoint-N is a link to the task (or, trashed, dangles)
    links = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in links] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert all(p.is_symlink() for p in links)
    assert {p.name for p in links if p.exists()} == {f"checkpoint-{r['step']}" for r in rows}
    assert truth["last"] == str(out / "checkpoint-8")  # what resume_from_checkpoint finds: the latest
    latest = ckpt.Workspace.open(ws).task("bert").latest()
    assert latest is not None and Path(truth["last"]).resolve() == (ws / "tasks" / "bert" / latest.file).resolve()
    assert truth["best"] == str(out / f"checkpoint-{best_step}")
    _restore_all(run, run_json, ws)
    assert [r["step"] for r in run_json("-w", str(ws), "list", "bert")] == [2, 4, 6, 8]
    assert all(p.exists() for p in links)  # restored: the links lead to them again


def test_import_ckpt_stays_free_of_the_training_libraries() -> None:
    code = (
        "import sys, ckpt, ckpt.integrations, ckpt.policy, ckpt.budget; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_trainer_callback_into_a_bucket(s3_url: str, tmp_path: Path, run_json: Any) -> None:
    out = tmp_path / "out"
    _train("transformers", "trainer", s3_url, str(out))
    rows = run_json("-w", s3_url, "list", "bert")
    assert rows[-1]["step"] == 8 and all("eval_score" in r["metrics"] for r in rows)
    trashed = [n for e in run_json("-w", s3_url, "trash", "list") for n in e["checkpoints"]]
    assert len(rows) == 2 and len(trashed) == 2  # keep-last 1 and keep-best 1 (the best is not the latest)
    assert run_json("-w", s3_url, "models", "show", "bert-4")["step"] == 8
    # the folders uploaded stay only where the Trainer needs them: its latest and its best
    truth = json.loads((tmp_path / "trainer.json").read_text())
    kept = {p.name for p in out.glob("checkpoint-*")}
    assert kept == {"checkpoint-8", Path(truth["best"]).name}
    assert not any(p.is_symlink() for p in out.glob("checkpoint-*"))


# --- the callbacks' checks at train start, called directly (no training) --------------------------------------------


def _hf_args(tmp_path: Path, **kw: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(tmp_path / "out"), metric_for_best_model=None, **kw)


def _hf_state() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(is_world_process_zero=True, global_step=0, best_model_checkpoint=None)


def test_trainer_callback_warns_that_save_total_limit_without_a_policy_keeps_everything(
    ws: ckpt.Workspace, tmp_path: Path
) -> None:
    hf = pytest.importorskip("ckpt.integrations.transformers")
    with pytest.warns(UserWarning, match="save_total_limit=2 .*keeps every one.*keep_last"):
        hf.CkptCallback(ws, task="bert").on_train_begin(_hf_args(tmp_path, save_total_limit=2), _hf_state(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = hf.CkptCallback(ws, task="other", policy={"keep_last": 2})  # a policy: nothing to say
        cb.on_train_begin(_hf_args(tmp_path, save_total_limit=2), _hf_state(), None)
        hf.CkptCallback(ws, task="third").on_train_begin(_hf_args(tmp_path, save_total_limit=None), _hf_state(), None)


def test_callbacks_refuse_a_finished_task_before_training(ws: ckpt.Workspace, tmp_path: Path) -> None:
    from types import SimpleNamespace

    hf = pytest.importorskip("ckpt.integrations.transformers")
    pl = pytest.importorskip("ckpt.integrations.lightning")
    ws.create_task("done").save(b"w", step=1)
    ws.task("done").finish()
    with pytest.raises(ckpt.ConflictError, match="task 'done' is finished.*") as e:
        pl.CkptCallback(ws, task="done").on_fit_start(SimpleNamespace(is_global_zero=True), None)
    assert "new task name" in (e.value.hint or "")
    with pytest.raises(ckpt.ConflictError, match="task 'done' is finished"):
        hf.CkptCallback(ws, task="done").on_train_begin(_hf_args(tmp_path), _hf_state(), None)
    pl.CkptCallback(ws, task="fresh").on_fit_start(SimpleNamespace(is_global_zero=True), None)  # a running one: fine
    assert ws.task("fresh").status == "running"
