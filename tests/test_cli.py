"""The foundation commands through Typer's runner and through the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt

from .conftest import make_task

LIST_KEYS = {"number", "step", "epoch", "metrics", "size", "created", "path", "sha256", "latest", "models"}


def test_init_and_tasks(run: Any, run_json: Any, tmp_path: Path) -> None:
    r = run("init", str(tmp_path / "ws"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ws" / "ckpt.toml").is_file()
    assert run_json("tasks") == []


def test_list_json_keys_and_values(run_json: Any, ws: ckpt.Workspace) -> None:
    task = make_task(ws, n=3)
    rows = run_json("list", "unet")
    assert [r["number"] for r in rows] == [1, 2, 3]
    assert all(set(r) == LIST_KEYS for r in rows)
    last = rows[-1]
    assert last["latest"] is True and rows[0]["latest"] is False
    assert last["path"] == "tasks/unet/checkpoints/000003.pt"
    assert last["size"] == 1000 and last["metrics"] == {"val_iou": 0.3, "loss": 1 / 3}
    assert last["sha256"] == task.checkpoint(3).sha256 and last["models"] == []
    assert last["created"].startswith("20") and "T" in last["created"]


def test_list_sort(run_json: Any, run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=4)
    assert [r["number"] for r in run_json("list", "unet", "--sort", "loss")] == [4, 3, 2, 1]
    assert [r["number"] for r in run_json("list", "unet", "--sort", "val_iou", "--desc")] == [4, 3, 2, 1]
    assert [r["number"] for r in run_json("list", "unet", "--sort", "number", "--desc")] == [4, 3, 2, 1]
    r = run("list", "unet", "--sort", "nope")
    assert r.exit_code == 2 and "val_iou" in r.stderr


def test_list_table(run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    r = run("list", "unet")
    assert r.exit_code == 0, r.output
    assert "val_iou" in r.stdout and "latest" in r.stdout and "1000 B" in r.stdout


def test_tasks_json_and_broken_task_warns(run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    make_task(ws, name="other", n=1)
    (ws.tasks_dir / "other" / "task.toml").write_text("format = 1\nname = [")
    (ws.tasks_dir / "other" / ".task.cache.json").unlink(missing_ok=True)
    r = run("tasks", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == ["unet"]
    assert {"name", "status", "checkpoints", "size"} <= set(rows[0])
    assert rows[0]["checkpoints"] == 2 and rows[0]["size"] == 2000 and rows[0]["status"] == "running"
    assert "other" in r.stderr and "not valid TOML" in r.stderr and "Traceback" not in r.output
    r = run("list", "other")
    assert r.exit_code == 6 and r.stderr.count("\n") == 1 and "task.toml" in r.stderr


def test_show(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    torch = __import__("torch")
    task = ws.create_task("t")
    task.save({"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4, dtype=torch.float16)}, step=5)
    data = run_json("show", "t", "1")
    assert data["parameters"] == 4 * 27 + 4 and data["format"] == "torch-zip"
    assert {"name": "conv.bias", "shape": [4], "dtype": "float16"} in data["tensors"]
    assert data["unsafe_globals"] == []
    r = run("show", "t", "1")
    assert r.exit_code == 0 and "conv.weight" in r.stdout and "112" in r.stdout


def test_show_safetensors_and_unsafe(run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    st = tmp_path / "m.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    task = ws.create_task("t")
    task.save_file(st)

    import torch

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, evil)
    task.save_file(evil)
    assert run_json("show", "t", "1")["tensors"] == [{"name": "w", "shape": [2, 2], "dtype": "float32"}]
    data = run_json("show", "t", "2")
    assert any("system" in g for g in data["unsafe_globals"])
    assert not (tmp_path / "pwned").exists()


def test_exit_codes(run: Any, ws: ckpt.Workspace, tmp_path: Path, monkeypatch: Any) -> None:
    make_task(ws, n=2)
    r = run("list", "missing")
    assert r.exit_code == 3 and "ckpt tasks" in r.stderr
    r = run("show", "unet", "12")
    assert r.exit_code == 3 and "1–2" in r.stderr and "ckpt list unet" in r.stderr
    r = run("list", "../etc")
    assert r.exit_code == 2 and "invalid task name" in r.stderr
    r = run("list")
    assert r.exit_code == 2
    monkeypatch.setenv("CKPT_WORKSPACE", str(tmp_path / "nowhere"))
    r = run("tasks")
    assert r.exit_code == 3 and "ckpt init" in r.stderr


def test_workspace_option_and_discovery(run: Any, tmp_path: Path, monkeypatch: Any) -> None:
    other = ckpt.Workspace.init(tmp_path / "other")
    make_task(other, name="x", n=1)
    r = run("-w", str(other.root), "tasks", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "x"
    monkeypatch.delenv("CKPT_WORKSPACE")
    monkeypatch.chdir(other.root / "tasks")
    r = run("tasks", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "x"


def test_finish_cli(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    make_task(ws, name="bad", n=2)
    data = run_json("finish", "unet")
    assert data["status"] == "finished" and data["model"]["title"] == "unet-3"
    assert data["model"]["checkpoint"] == 3
    data = run_json("finish", "bad", "--failed")
    assert data["status"] == "failed" and data["model"] is None
    assert {t["name"]: t["status"] for t in run_json("tasks")} == {"bad": "failed", "unet": "finished"}
    assert [m["title"] for m in run_json("models")] == ["unet-3"]


def test_installed_script_and_module(ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    bindir = Path(sys.executable).parent
    script = bindir / "ckpt" if (bindir / "ckpt").exists() else "ckpt"
    res = subprocess.run([str(script), "list", "unet", "--json"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert [r["number"] for r in json.loads(res.stdout)] == [1, 2]
    res = subprocess.run([sys.executable, "-m", "ckpt", "--version"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.startswith("ckpt ")
    res = subprocess.run([str(script), "list", "nope"], capture_output=True, text=True, env=env)
    assert res.returncode == 3 and res.stdout == "" and "Traceback" not in res.stderr
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "promote" in res.stdout


def test_the_process_ends_at_once_with_its_output_whole(ws: ckpt.Workspace) -> None:
    """`main` ends the process without the interpreter's teardown: every byte written is still flushed,
    the exit codes are the commands' own, and a reader that goes away early gives exit 1, quietly."""
    task = make_task(ws, n=3)
    for i in range(400):
        task.save(b"x", step=i, metrics={"a_rather_long_metric_name_to_fill_the_pipe": i / 7})
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    cmd = [sys.executable, "-m", "ckpt"]
    res = subprocess.run([*cmd, "list", "unet"], capture_output=True, text=True, env=env)  # the table, buffered
    assert res.returncode == 0 and res.stdout.rstrip().endswith("latest") and "403" in res.stdout  # the last row
    res = subprocess.run([*cmd, "list", "unet", "--json"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and len(json.loads(res.stdout)) == 403
    res = subprocess.run([*cmd, "show", "unet", "99999"], capture_output=True, text=True, env=env)
    assert res.returncode == 3 and res.stderr.count("\n") == 1 and res.stdout == ""
    res = subprocess.run([*cmd, "list"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "Missing argument" in res.stderr
    # a reader that reads nothing and goes away: the write (or the last flush) meets a closed pipe
    proc = subprocess.Popen([*cmd, "list", "unet", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1 and "Traceback" not in stderr and "Exception ignored" not in stderr


@pytest.mark.parametrize(
    ("argv", "collecting"), [(["list", "t"], False), (["-w", "x", "preview", "t", "1"], True), (["demo"], True)]
)
def test_short_commands_run_without_the_cyclic_collector(argv: list[str], collecting: bool) -> None:
    """`main` turns the cyclic garbage collector off for short commands, not for those that run networks."""
    code = (
        "import gc, sys, typer, ckpt.cli as c\n"
        "def run(self, *args, **kwargs): sys.stdout.write(f'{gc.isenabled()}\\n'); raise SystemExit(0)\n"
        "typer.Typer.__call__ = run\n"
        f"sys.argv = ['ckpt', *{argv!r}]\n"
        "c.main()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == f"{collecting}\n", res.stderr


def test_a_tilde_of_no_user_is_a_name_as_in_bash(run: Any, tmp_path: Path) -> None:
    res = run("init", "~no-such-user-of-ckpt")  # the tests run in tmp_path
    assert res.exit_code == 0, res.output
    assert (tmp_path / "~no-such-user-of-ckpt" / "ckpt.toml").is_file()
    assert run("-w", "~no-such-user-of-ckpt", "tasks").exit_code == 0


def test_the_commands_doctor_and_scan_suggest_name_the_workspace_as_given(run: Any, tmp_path: Path) -> None:
    ws = ckpt.Workspace.init(tmp_path / "my ws")
    make_task(ws, n=2)
    (ws.root / "tasks/lost/checkpoints").mkdir(parents=True)
    (ws.root / "tasks/lost/checkpoints/000001.pt").write_bytes(b"w")
    (ws.root / "tasks/unet/checkpoints/stray.pt").write_bytes(b"s")
    res = run("-w", str(ws.root), "doctor", "--dry-run")
    assert f"ckpt -w '{ws.root}' doctor --recreate-manifests" in res.stdout.replace("\n", " "), res.output
    res = run("-w", str(ws.root), "scan", "unet")
    assert f"add them with: ckpt -w '{ws.root}' scan unet --add" in res.stderr, res.output
    res = run("-w", str(ws.root), "tasks")
    assert f"see: ckpt -w '{ws.root}' doctor" in res.stderr, res.output
