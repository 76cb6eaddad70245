from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ckpt
from ckpt.cli import app


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own workspace location and a short lock timeout; nothing leaks from the user."""
    monkeypatch.setenv("CKPT_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("CKPT_LOCK_TIMEOUT", "10")
    monkeypatch.delenv("CKPT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ws(tmp_path: Path) -> ckpt.Workspace:
    return ckpt.Workspace.init(tmp_path / "ws")


@pytest.fixture
def run() -> Callable[..., Any]:
    """Run a ckpt command through Typer's CliRunner; stdout and stderr kept apart."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Any:
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture
def run_json(run: Callable[..., Any]) -> Callable[..., Any]:
    def invoke(*args: str) -> Any:
        result = run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    return invoke


def make_task(
    ws: ckpt.Workspace, name: str = "unet", n: int = 5, metric: str = "val_iou", size: int = 1000
) -> ckpt.Task:
    """A task with `n` checkpoints of plain bytes; metric rises with the number (loss falls)."""
    task = ws.create_task(name, arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2})
    for i in range(1, n + 1):
        task.save(os.urandom(size), step=i * 100, epoch=i, metrics={metric: i / 10, "loss": 1 / i})
    return task
