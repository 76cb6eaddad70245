"""The command line's own manners: one-line parser errors, help with examples, completion, small wording."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt
from tests.conftest import make_task

CKPT = [sys.executable, "-m", "ckpt"]


def ckpt_cmd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CKPT, *args], cwd=cwd, capture_output=True, text=True, env=env or dict(os.environ))


@pytest.mark.parametrize(
    ("args", "message", "where"),
    [
        (["list", "unet", "--bogus"], "No such option", "ckpt list --help"),
        (["promote", "unet", "seven"], "'seven' is not a valid integer", "ckpt promote --help"),
        (["models", "show"], "Missing argument 'TITLE'", "ckpt models show --help"),
        (["nosuch"], "No such command 'nosuch'", "ckpt --help"),
        (["trash", "empty", "--later"], "No such option", "ckpt trash empty --help"),
    ],
)
def test_parser_errors_are_one_line(tmp_path: Path, args: list[str], message: str, where: str) -> None:
    ckpt.Workspace.init(tmp_path)
    r = ckpt_cmd(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and message.split("'")[0] in lines[0] and lines[0].endswith(f"see: {where}")


def _commands() -> list[list[str]]:
    from ckpt.cli import app

    out: list[list[str]] = []
    for c in app.registered_commands:
        out.append([c.name or ""])
    for g in app.registered_groups:
        assert g.typer_instance is not None
        out.append([g.name or ""])
        for c in g.typer_instance.registered_commands:
            out.append([g.name or "", c.name or ""])
    return out


def test_every_command_has_a_summary_an_example_and_argument_text(run: Any) -> None:
    commands = _commands()
    assert len(commands) >= 20
    for words in commands:
        r = run(*words, "--help")
        assert r.exit_code == 0, (words, r.output)
        text = r.stdout
        assert "Example: ckpt " in text, words
        if "\nArguments:\n" in text:  # every argument has its text: `name <type>  what it is`
            block = text.split("\nArguments:\n", 1)[1].split("\n\n", 1)[0]
            rows = [line for line in block.splitlines() if line.startswith("  ") and not line.startswith("    ")]
            for row in rows:
                assert len(row.split()) > 2, (words, row)


def test_help_lists_commands_in_the_order_a_user_meets_them(run: Any) -> None:
    text = run("--help").stdout
    listed = [line.split()[0] for line in text.split("Commands:", 1)[1].splitlines() if line.startswith("  ")]
    order = [listed.index(name) for name in ("init", "list", "finish", "promote", "trash-unused", "import", "preview")]
    assert order == sorted(order)
    groups = " ".join(text.split())
    for group in (
        "Tasks: init, tasks, list, show, finish.",
        "Models: promote, models.",
        "Files: import, scan, verify, export.",
    ):
        assert group in groups


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_installs_and_completes_names(tmp_path: Path) -> None:
    ws = ckpt.Workspace.init(tmp_path / "ws")
    make_task(ws, "unet-shapes", n=2)
    make_task(ws, "resnet", n=1)
    ws.promote("unet-shapes", 2, title="unet-best")
    home = tmp_path / "home"
    home.mkdir()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "HOME": str(home), "SHELL": "/bin/bash", "PATH": f"{bindir}:{os.environ['PATH']}"}
    env.pop("CKPT_WORKSPACE", None)
    exe = shutil.which("ckpt", path=env["PATH"])
    assert exe is not None
    r = subprocess.run([exe, "--install-completion", "bash"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    script = f"""
source {home}/.bashrc
complete -p ckpt
cd {ws.root}
COMP_WORDS=(ckpt list un); COMP_CWORD=2; _ckpt_completion ckpt; echo "tasks: ${{COMPREPLY[*]}}"
COMP_WORDS=(ckpt models show ""); COMP_CWORD=3; _ckpt_completion ckpt; echo "titles: ${{COMPREPLY[*]}}"
COMP_WORDS=(ckpt trash-u); COMP_CWORD=1; _ckpt_completion ckpt; echo "commands: ${{COMPREPLY[*]}}"
"""
    r = subprocess.run(["bash", "--norc", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "complete -o default -F _ckpt_completion ckpt" in r.stdout
    assert "tasks: unet-shapes" in r.stdout
    assert "titles: unet-best" in r.stdout
    assert "commands: trash-unused" in r.stdout


def test_small_wording(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    make_task(ws, "unet", n=3)
    r = run("trash-unused", "unet", "--keep-last", "1")
    assert "moved 2 checkpoints of task 'unet'" in r.stdout
    assert "undo with: ckpt trash restore " in r.stderr
    r = run("trash", "empty", "--yes")
    assert "deleted 1 trash entry;" in r.stdout
    # the undo hint keeps the -w the user gave
    make_task(ws, "other", n=2)
    r = subprocess.run(
        [*CKPT, "-w", str(ws.root), "trash-unused", "other"], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert f"undo with: ckpt -w {ws.root} trash restore " in r.stderr


def test_options_that_mean_nothing_are_usage_errors(run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, "unet", n=3)
    r = run("trash-unused", "unet", "--min")
    assert r.exit_code == 2 and "--keep-best" in r.stderr
    r = run("promote", "unet", "2", "--max")
    assert r.exit_code == 2 and "--best" in r.stderr
    # --desc without --sort: by number, newest first
    r = run("list", "unet", "--desc", "--json")
    assert [row["number"] for row in json.loads(r.stdout)] == [3, 2, 1]


def _snapshot(ws: ckpt.Workspace) -> dict[str, Any]:
    """Every task's records and status, every model, every trash entry: what a dry run must leave alone."""
    from ckpt.trash import list_entries

    fresh = ckpt.Workspace.open(ws.location)
    tasks = {t: (fresh.task(t).status, [c.number for c in fresh.task(t).checkpoints]) for t in ("unet", "other")}
    entries, _ = list_entries(fresh)
    return {
        "tasks": tasks,
        "models": sorted((m.title, m.checkpoint) for m in fresh.models),
        "trash": sorted((e.id, e.state) for e in entries),
    }


def test_dry_run_on_every_command_that_changes(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=4)
    make_task(any_ws, "other", n=2)
    any_ws.promote("unet", 2, title="unet-2")
    entry = run_json("trash-unused", "other", "--keep-last", "1")["entry"]
    before = _snapshot(any_ws)
    plans = {
        "promote": run_json("promote", "unet", "3", "--dry-run"),
        "finish": run_json("finish", "unet", "--dry-run"),
        "rename": run_json("models", "rename", "unet-2", "unet-best", "--dry-run"),
        "remove": run_json("models", "remove", "unet-2", "--dry-run"),
        "restore": run_json("trash", "restore", entry, "--dry-run"),
        "empty": run_json("trash", "empty", "--dry-run"),
        "trash-unused": run_json("trash-unused", "unet", "--dry-run"),
    }
    assert _snapshot(any_ws) == before
    assert plans["promote"]["title"] == "unet-3" and plans["promote"]["dry_run"] and not plans["promote"]["unchanged"]
    assert plans["finish"]["would"] == [
        "mark task 'unet' finished",
        "promote checkpoint 4 of task 'unet' as model 'unet-4'",
    ]
    assert plans["rename"]["would"] == ["rename model 'unet-2' to 'unet-best'"]
    assert plans["restore"]["would"] == ["restore checkpoint 1 of task 'other'"]
    assert plans["empty"]["would"][0].startswith(f"delete trash entry {entry}")
    # a dry run refuses what the command would refuse, with the same exit code
    assert run("promote", "unet", "3", "--title", "unet-2", "--dry-run").exit_code == 4
    assert run("models", "rename", "unet-2", "UNET-2", "--dry-run").exit_code == 0  # its own case: allowed
    assert run("models", "rename", "unet-2", "Unet-2", "--dry-run", "--json").exit_code == 0
    assert run("models", "remove", "nope", "--dry-run").exit_code == 3
    assert run("trash", "restore", "20200101-000000-abcdef", "--dry-run").exit_code == 3
    # and the real commands then do what the plans said
    assert run_json("promote", "unet", "3")["title"] == "unet-3"
    assert run_json("trash", "restore", entry)["checkpoints"] == [1]


@pytest.mark.parametrize("url", ["gs://b/ws", "az://c/ws", "memory://ws", "file:///tmp/ws", "s3a://b/ws", "S3://b/ws"])
def test_unsupported_url_schemes_are_refused(tmp_path: Path, url: str) -> None:
    r = ckpt_cmd("init", url, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "unsupported workspace URL scheme" in r.stderr and "s3://bucket/prefix" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL
    with pytest.raises(ckpt.UsageError):
        ckpt.Workspace.open(url)


def test_missing_s3_credentials_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"))
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), HOME=str(tmp_path))
    r = ckpt_cmd("-w", "s3://no-such-bucket/ws", "tasks", cwd=tmp_path, env=env)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "AWS_ACCESS_KEY_ID" in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["list", "unet"], ["list", "unet", "--json"], ["tasks"], ["promote", "unet", "1"]])
def test_a_full_stdout_is_named_as_such(ws: ckpt.Workspace, args: list[str]) -> None:
    make_task(ws, "unet", n=2)
    with open("/dev/full", "w") as full:
        r = subprocess.run([*CKPT, *args], cwd=ws.root, stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("error: cannot write the output: No space left on device (stdout)")
    assert "Traceback" not in r.stderr and "ckpt doctor" not in r.stderr


def test_import_and_scan_dry_runs_change_nothing(
    run: Any, run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path
) -> None:
    src = tmp_path / "theirs"
    src.mkdir()
    for i in range(1, 4):
        (src / f"epoch{i}.pt").write_bytes(b"w" * 100 * i)
    plan = run_json("import", str(src), "--task", "lit", "--move", "--dry-run")
    assert plan["dry_run"] and plan["created_task"] and plan["added"] == 0
    assert [r["action"] for r in plan["checkpoints"]] == ["would add"] * 3
    assert sorted(p.name for p in src.iterdir()) == ["epoch1.pt", "epoch2.pt", "epoch3.pt"]  # nothing moved
    assert run("list", "lit").exit_code == 3  # no task was made
    assert run_json("import", str(src), "--task", "lit")["added"] == 3
    again = run_json("import", str(src), "--task", "lit", "--dry-run")
    assert [r["action"] for r in again["checkpoints"]] == ["already"] * 3
    if not any_ws.remote:  # a file a script wrote into the task folder by itself
        stray = any_ws.root / "tasks" / "lit" / "checkpoints" / "extra.pt"
        stray.write_bytes(b"extra")
        plan = run_json("scan", "lit", "--add", "--dry-run")
        assert plan == {"dry_run": True, "would": ["add tasks/lit/checkpoints/extra.pt as a new checkpoint"]}
        assert stray.exists() and len(run_json("list", "lit")) == 3
        assert run("scan", "lit", "--dry-run").exit_code == 2


def test_cli_findings_of_the_last_attack(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    task = ws.create_task("a")
    for i, v in enumerate([3, 1, 2], 1):
        task.save(b"w%d" % i, step=i, metrics={"count": v})
    ws.promote("a", 1, title="a-1")
    # --top of a metric whose direction ckpt cannot tell: --asc / --desc say which end is best
    assert run("list", "a", "--sort", "count", "--top", "2").exit_code == 2
    assert [r["number"] for r in run_json("list", "a", "--sort", "count", "--top", "2", "--desc")] == [1, 3]
    # options given to the group are refused, not silently dropped
    r = run("models", "--json", "show", "a-1")
    assert r.exit_code == 2 and "after the subcommand" in r.stderr
    # a dry run refuses what the command refuses: a finished task takes no new files
    task.finish()
    (task.folder / "checkpoints" / "extra.pt").write_bytes(b"x")
    assert run("scan", "a", "--add", "--dry-run").exit_code == 4
    assert run("scan", "a", "--add").exit_code == 4
    # a name with a newline or an escape sequence in an error stays on one line, escaped
    r = ckpt_cmd("-w", str(tmp_path / "x\ny\x1b[2J"), "tasks", cwd=tmp_path)
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1 and "\x1b" not in r.stderr
