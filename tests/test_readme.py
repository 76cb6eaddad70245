"""Every command in the README's console blocks runs, in order, on a fresh workspace; examples/ run too."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def console_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    return [line[2:].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_readme_has_the_two_commands_first() -> None:
    text = (ROOT / "README.md").read_text()
    first_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert first_blocks[0].strip() == 'pip install "torch==2.13.0" -e ".[dev]" && ckpt demo'
    assert first_blocks[1].strip() == "python -m pytest -q"


def test_readme_console_commands_run(tmp_path: Path) -> None:
    commands = console_commands()
    assert len(commands) >= 5
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if k != "CKPT_WORKSPACE"}
    env["PYTHONPATH"] = str(tmp_path)  # arch entries such as examples.quickstart:mlp resolve from here
    bindir = Path(sys.executable).parent
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "ckpt":
            argv[0] = str(bindir / "ckpt") if (bindir / "ckpt").exists() else "ckpt"
        elif argv[0] == "python":
            argv[0] = sys.executable
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr, cmd


def test_quickstart_example(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from examples.quickstart import train
    finally:
        sys.path.remove(str(ROOT))
    task = train(str(tmp_path / "runs"), epochs=3)
    assert [c.number for c in task.checkpoints] == [1, 2, 3]
    assert task.status == "finished"
    assert task.ws.models["spirals-3"].checkpoint == 3
