"""Scripts can trust the answer: metric direction, NaN and missing values last, re-runnable promote,
honest bytes. Every choice by metric runs on both backends (the `any_ws` fixture)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt.metrics import direction, mode_from_name
from tests.conftest import make_task  # noqa: F401

LOSSES = [0.5, float("nan"), 0.2, 0.9, 0.1, 0.4]


def nan_task(ws: ckpt.Workspace, name: str = "T", **kw: Any) -> ckpt.workspace.Task:
    """val_loss 0.5, nan, 0.2, 0.9, 0.1, 0.4, then a checkpoint without it (#7), and val_acc here and there."""
    task = ws.create_task(name, **kw)
    for i, loss in enumerate(LOSSES, 1):
        task.save(f"weights {i}".encode(), step=i * 10, metrics={"val_loss": loss, "val_acc": i / 10})
    task.save(b"weights 7", step=70, metrics={"val_acc": 0.05})
    return task


def numbers(rows: list[dict[str, Any]]) -> list[int]:
    return [r["number"] for r in rows]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("val_loss", "min"),
        ("train/loss", "min"),
        ("eval_wer", "min"),
        ("test-ppl", "min"),
        ("val.mse", "min"),
        ("val_acc", "max"),
        ("val_miou", "max"),
        ("eval_f1", "max"),
        ("bleu", "max"),
        ("loss_acc", None),  # tokens of both lists: unknown
        ("score", None),
        ("glossary", None),  # a token, not a substring
    ],
)
def test_direction_from_the_name(name: str, mode: str | None) -> None:
    assert mode_from_name(name) == mode


def test_direction_precedence() -> None:
    assert direction("score", flag="max", task_modes={"score": "min"}).source == "flag"
    d = direction("score", task_modes={"score": "min"}, workspace_modes={"score": "max"})
    assert (d.mode, d.source) == ("min", "task")
    d = direction("val_loss", workspace_modes={"val_loss": "max"})
    assert (d.mode, d.source) == ("max", "workspace")
    with pytest.raises(ckpt.UsageError, match="--min or --max"):
        direction("score")


def test_list_sort_puts_nan_and_missing_last(run: Any, any_ws: ckpt.Workspace) -> None:
    nan_task(any_ws)

    def order(*flags: str) -> tuple[list[int], str]:
        r = run("list", "T", "--sort", "val_loss", *flags, "--json")
        assert r.exit_code == 0, r.output
        return numbers(json.loads(r.stdout)), r.stderr

    best_first, said = order()
    assert best_first == [5, 3, 6, 1, 4, 2, 7]  # lowest loss first: the name says lower is better
    assert "lowest first" in said and "metric's name" in said
    assert order("--asc")[0] == [5, 3, 6, 1, 4, 2, 7]
    assert order("--desc")[0] == [4, 1, 6, 3, 5, 2, 7]  # NaN (#2) and missing (#7) last either way
    r = run("list", "T", "--sort", "val_acc", "--json")
    assert numbers(json.loads(r.stdout)) == [6, 5, 4, 3, 2, 1, 7]  # higher is better
    r = run("list", "T", "--sort", "step", "--desc", "--json")
    assert numbers(json.loads(r.stdout)) == [7, 6, 5, 4, 3, 2, 1]  # a plain field, in the asked order


def test_unknown_direction_is_a_usage_error(run: Any, any_ws: ckpt.Workspace) -> None:
    task = any_ws.create_task("T")
    for v in (0.3, 0.1, 0.2):
        task.save(b"w%f" % v, metrics={"score": v})
    for args, flags in [
        (("promote", "T", "--best", "score"), "--min or --max"),
        (("trash-unused", "T", "--keep-best", "1", "--metric", "score"), "--min or --max"),
        (("list", "T", "--sort", "score"), "--asc or --desc"),
    ]:
        r = run(*args)
        assert r.exit_code == 2, r.output
        assert "cannot tell whether a higher or lower 'score' is better" in r.stderr and flags in r.stderr
    r = run("promote", "T", "--best", "score", "--max", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["checkpoint"], data["title"], data["direction"], data["direction_source"]) == (1, "T-1", "max", "flag")
    assert run("promote", "T", "--best", "score", "--min", "--max").exit_code == 2
    r = run("promote", "T", "2", "--min")
    assert r.exit_code == 2 and "--best" in r.stderr
    assert run("promote", "T", "--best", "nope", "--min").exit_code == 2


def test_promote_best_of_a_loss_needs_no_flag(run: Any, any_ws: ckpt.Workspace) -> None:
    nan_task(any_ws)
    r = run("promote", "T", "--best", "val_loss", "--title", "best")
    assert r.exit_code == 0, r.output
    assert "checkpoint 5 has the lowest val_loss (0.1); lower is better: the metric's name" in r.stderr
    r = run("promote", "T", "--best", "val_loss", "--max", "--title", "worst", "--json")
    data = json.loads(r.stdout)
    assert data["checkpoint"] == 4 and data["direction"] == "max"  # NaN (#2) never wins, whatever the direction


def test_task_and_workspace_directions(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    # the workspace says higher val_loss is better (odd, but it is the user's to say), the task says lower
    with open(ws.root / "ckpt.toml", "ab") as f:
        f.write(b'\n[metrics]\nval_loss = "max"\nscore = "min"\n')
    ws = ckpt.Workspace.open(ws.root)
    nan_task(ws, "A")
    nan_task(ws, "B", metric_modes={"val_loss": "min"})
    a = run_json("promote", "A", "--best", "val_loss", "--json")
    assert (a["checkpoint"], a["direction_source"]) == (4, "workspace")
    b = run_json("promote", "B", "--best", "val_loss", "--json")
    assert (b["checkpoint"], b["direction_source"]) == (5, "task")
    assert ckpt.Workspace.open(ws.root).task("B").header.metric_modes == {"val_loss": "min"}
    with open(ws.root / "ckpt.toml", "ab") as f:
        f.write(b"[oops]\n")
    (ws.root / "ckpt.toml").write_text('format = 1\n[metrics]\nval_loss = "lowest"\n')
    r = run("list", "A")
    assert r.exit_code == 6 and "[metrics] 'val_loss'" in r.stderr
    with pytest.raises(ckpt.UsageError):
        ws.create_task("C", metric_modes={"val_loss": "down"})


def test_keep_best_ranks_nan_and_missing_last(run: Any, any_ws: ckpt.Workspace) -> None:
    nan_task(any_ws)
    r = run("trash-unused", "T", "--keep-best", "2", "--metric", "val_loss", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert (plan["direction"], plan["direction_source"]) == ("min", "name")
    assert plan["trashed"] == [1, 2, 4, 6]
    assert {k["number"] for k in plan["kept"]} == {3, 5, 7}
    r = run("trash-unused", "T", "--keep-best", "2", "--metric", "val_loss", "--dry-run")
    assert "no val_loss value: missing, NaN or infinite, ranked last" in r.stdout
    assert "lowest val_loss is best" in r.stderr
    r = run("trash-unused", "T", "--keep-best", "2", "--metric", "val_loss", "--max", "--json")
    assert json.loads(r.stdout)["trashed"] == [2, 3, 5, 6]  # kept: #4 (0.9), #1 (0.5), #7 latest
    assert [cp.number for cp in ckpt.Workspace.open(any_ws.location).task("T").checkpoints] == [1, 4, 7]


def test_promote_again_is_a_no_op(run: Any, any_ws: ckpt.Workspace) -> None:
    nan_task(any_ws)
    first = run("promote", "T", "3", "--title", "unet-3", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["unchanged"] is False
    again = run("promote", "T", "3", "--title", "unet-3", "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["unchanged"] is True and data["checkpoint"] == 3
    assert data["created"] == json.loads(first.stdout)["created"]
    r = run("promote", "T", "3", "--title", "unet-3")
    assert r.exit_code == 0 and "already checkpoint 3 of task 'T'" in r.stdout
    other = run("promote", "T", "4", "--title", "unet-3")
    assert other.exit_code == 4 and "checkpoint 3 of task 'T'" in other.stderr
    # --best that lands on the same checkpoint again is also a no-op
    assert run("promote", "T", "--best", "val_loss", "--title", "best").exit_code == 0
    assert json.loads(run("promote", "T", "--best", "val_loss", "--title", "best", "--json").stdout)["unchanged"]
    # no --title: TASK-N, as finish names its model
    data = json.loads(run("promote", "T", "6", "--json").stdout)
    assert data["title"] == "T-6"
    assert sorted(m.title for m in any_ws.models) == ["T-6", "best", "unet-3"]


def test_readme_ci_lines_pick_the_lowest_loss(tmp_path: Path) -> None:
    """The README's CI block: the best checkpoint by a loss without --min, and a promote a re-run leaves be."""
    import re
    import subprocess

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "--sort val_loss" in b)
    ws = ckpt.Workspace.init(tmp_path / "runs")
    nan_task(ws, "spirals")
    env = {k: v for k, v in os.environ.items() if k != "CKPT_WORKSPACE"}
    for _ in range(2):  # the second run changes nothing and still exits 0
        r = subprocess.run(block, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == "5"
    assert ckpt.Workspace.open(tmp_path / "runs").models["spirals-release"].checkpoint == 5


def test_trash_says_why_linked_bytes_stay(run: Any, run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    src = tmp_path / "theirs"
    src.mkdir()
    for i in range(1, 5):
        (src / f"epoch{i}.pt").write_bytes(b"w" * 1000 * i)
    assert run("import", str(src), "--task", "lit").exit_code == 0
    plan = run_json("trash-unused", "lit", "--dry-run")
    assert plan["bytes_freed_on_empty"] == 0
    held = plan["not_freed"]
    assert held["files"] == 3 and held["bytes"] == 6000
    assert str(src) in held["why"] and "--move" in held["why"]
    r = run("trash-unused", "lit")
    assert r.exit_code == 0, r.output
    assert "6.0 KB stay on disk" in r.stderr or "stay on disk" in r.stderr
    emptied = run_json("trash", "empty", "--yes")
    assert emptied["bytes_freed"] < 2000  # only the entry's own record: the checkpoint bytes stay
    assert emptied["not_freed"]["bytes"] == 6000
    assert all((src / f"epoch{i}.pt").exists() for i in range(1, 5))
    # a task whose files have no other link frees them all, and says nothing more
    t = ws.create_task("own")
    for i in range(3):
        t.save(b"x" * 100 * (i + 1))
    plan = run_json("trash-unused", "own")
    assert plan["bytes_freed_on_empty"] == 300 and plan["not_freed"] is None
    emptied = run_json("trash", "empty", "--yes")
    assert 300 <= emptied["bytes_freed"] < 2300 and emptied["not_freed"] is None


def test_infinite_and_huge_metrics_are_never_best(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    task = ws.create_task("I")
    task.save(b"a", metrics={"val_loss": float("-inf"), "val_acc": float("inf")})
    task.save(b"b", metrics={"val_loss": 0.3, "val_acc": 0.5})
    task.save(b"c", metrics={"val_loss": float("inf"), "val_acc": float("-inf")})
    task.save(b"d", metrics={"val_loss": 0.2, "val_acc": 0.4})
    rows = run_json("list", "I", "--sort", "val_loss")
    assert [r["number"] for r in rows] == [4, 2, 1, 3]  # the infinities (null in JSON) last
    assert run_json("promote", "I", "--best", "val_loss", "--dry-run")["checkpoint"] == 4
    assert run_json("promote", "I", "--best", "val_acc", "--dry-run")["checkpoint"] == 2
    plan = run_json("trash-unused", "I", "--keep-best", "1", "--metric", "val_acc", "--dry-run")
    assert plan["trashed"] == [1, 3]
    with pytest.raises(ckpt.UsageError, match="too large an integer"):
        task.save(b"e", metrics={"val_loss": 10**400})
    with pytest.raises(ckpt.UsageError):
        ws.create_task("J", metric_modes="min")  # type: ignore[arg-type]
    assert run("list", "I").exit_code == 0


def test_the_metrics_hint_is_valid_toml(run: Any, ws: ckpt.Workspace) -> None:
    import tomllib

    task = ws.create_task("Q")
    task.save(b"a", metrics={"val.score": 1.0})
    r = run("promote", "Q", "--best", "val.score")
    assert r.exit_code == 2
    line = r.stderr.split("[metrics] ", 1)[1].split(" in ckpt.toml")[0]
    assert tomllib.loads(f"[metrics]\n{line}\n") == {"metrics": {"val.score": "min"}}


def test_promote_title_edge_cases(run: Any, ws: ckpt.Workspace) -> None:
    make = ws.create_task("t" * 98)
    for i in range(10):
        make.save(b"w%d" % i)
    r = run("promote", "t" * 98, "10")
    assert r.exit_code == 2 and "default title" in r.stderr and "--title" in r.stderr
    r = run("promote", "t" * 98, "10", "--title", "")
    assert r.exit_code == 2  # an empty $TITLE in a script is an error, not the default
    r = run("finish", "t" * 98, "--failed", "--title", "x")
    assert r.exit_code == 2 and "--failed" in r.stderr


def test_dry_runs_refuse_what_the_command_refuses(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    task = ws.create_task("R")
    for i in range(4):
        task.save(b"w%d" % i)
    ws.promote("R", 1, title="R-1")
    entry = run_json("trash-unused", "R")["entry"]
    (task.folder / "checkpoints" / "000002.pt").write_bytes(b"in the way")
    assert run("trash", "restore", entry, "--dry-run").exit_code == 4
    assert run("trash", "restore", entry).exit_code == 4
    (ws.models_dir / "stray").mkdir()
    assert run("models", "rename", "R-1", "stray", "--dry-run").exit_code == 4
    assert run("models", "rename", "R-1", "stray").exit_code == 4
    (task.folder / "checkpoints" / "000004.pt").unlink()
    assert run("promote", "R", "4", "--dry-run").exit_code == 6
    assert run("finish", "R", "--dry-run").exit_code == 6
    assert run("finish", "R").exit_code == 6
