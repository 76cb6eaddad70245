"""Retention policies (ckpt.policy): each rule, their combination, where a policy is kept, trash-unused by
policy, the policy applied in the background after saves, and `ckpt latest`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt.errors import ManifestError
from ckpt.manifest import LOG_FORMAT, Checkpoint, check_format
from ckpt.policy import keep_every, keep_interval, parse_interval
from ckpt.trash import KeepRules, trash_unused


def _cp(number: int, step: int | None = None, created: str = "2026-01-01T00:00:00+00:00") -> Checkpoint:
    return Checkpoint(number, f"checkpoints/{number:06d}.pt", 1, "0" * 64, created, step)


def _kept(res: Any) -> dict[int, str]:
    return {d.number: d.reason for d in res.plan.kept}


# --- the rules, pure ---------------------------------------------------------------------------------------


def test_keep_every_takes_the_first_at_or_after_each_multiple_across_gaps() -> None:
    cps = [_cp(1, 0), _cp(2, 900), _cp(3, 1100), _cp(4, 1500), _cp(5, 3700), _cp(6, 4000), _cp(7, None)]
    got = dict(keep_every(cps, 1000))
    # 1000 -> 1100 (#3); 2000 and 3000 fall in the gap: 3700 (#5) is the first after both; 4000 -> #6
    assert sorted(got) == [3, 5, 6]
    assert "step 1100" in got[3] and "first at or after 3000" in got[5]
    assert keep_every(cps, 0) == []


def test_keep_every_after_a_restart_that_saves_lower_steps_again() -> None:
    # a run crashed after step 2000 (#2) and resumed from step 1000: it saved 1500, 2000, 2500 again
    cps = [_cp(1, 1000), _cp(2, 2000), _cp(3, 1500), _cp(4, 2000), _cp(5, 2500), _cp(6, 3000)]
    assert [n for n, _ in keep_every(cps, 1000)] == [1, 2, 6]  # a tie on a step goes to the lower number


def test_keep_interval_keeps_the_latest_of_each_interval_from_creation() -> None:
    created = "2026-01-01T00:00:00+00:00"
    times = ["00:10", "05:59", "06:00", "07:00", "18:30", "18:31"]
    cps = [_cp(i + 1, created=f"2026-01-01T{t}:00+00:00") for i, t in enumerate(times)]
    cps.append(_cp(7, created="2025-12-31T23:00:00+00:00"))  # older than the task (imported): the first interval
    got = dict(keep_interval(cps, 6 * 3600, created))
    assert sorted(got) == [4, 6, 7]  # [0h,6h): 1, 2, 7 -> 7; [6h,12h): 3, 4 -> 4; [18h,24h): 5, 6 -> 6
    assert "keep-interval 6h" in got[4] and "interval 2" in got[4]


def test_parse_interval() -> None:
    assert parse_interval("6h") == 21600 and parse_interval("1d") == 86400
    with pytest.raises(ckpt.UsageError):
        parse_interval("0.1s")
    with pytest.raises(ckpt.UsageError):
        parse_interval("six hours")


# --- rules on a real task, combined ---------------------------------------------------------------------------


def _task(ws: ckpt.Workspace, name: str = "run", n: int = 10, **kw: Any) -> ckpt.Task:
    task = ws.create_task(name, **kw)
    losses = [0.9, 0.5, float("nan"), 0.4, 0.8, 0.7, 0.45, 0.6, float("nan"), 0.95]
    for i in range(1, n + 1):
        task.save(f"weights {i}".encode(), step=i * 250, metrics={"val_loss": losses[i - 1]})
    task.wait()
    return task


def test_rules_combine_as_any_keeps(any_ws: ckpt.Workspace) -> None:
    _task(any_ws)
    any_ws.promote("run", 1, title="first")
    rules = KeepRules(keep_last=2, keep_best=2, metric="val_loss", keep_every=1000)
    res = trash_unused(any_ws, "run", rules, dry_run=True)
    kept = _kept(res)
    # steps 250..2500: every 1000 -> #4 (1000), #8 (2000); best two losses: #4 (0.4), #7 (0.45), NaN never
    assert sorted(kept) == [1, 4, 7, 8, 9, 10]
    assert "model first" in kept[1] and kept[9] == "keep-last 2" and kept[10] == "latest; keep-last 2"
    assert "keep-every 1000" in kept[4] and "keep-best 2 by val_loss" in kept[4]
    assert res.plan.trashed == [2, 3, 5, 6]
    assert "no val_loss value" in {d.number: d.reason for d in res.plan.decisions}[3]


# --- where a policy is kept ---------------------------------------------------------------------------------------


def test_policy_set_and_show_records_the_direction(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    _task(any_ws, n=3)
    shown = run_json("policy", "show", "run")
    assert shown["source"] is None and shown["policy"] is None
    got = run_json("policy", "set", "--keep-last", "3", "--keep-best", "1", "--metric", "val_loss")
    assert got["source"] == "workspace" and got["policy"]["direction"] is None  # each task decides it
    assert "the direction each task gives it" in got["summary"]
    assert run_json("policy", "show", "run")["policy"]["direction"] == "min"  # this task's: by the name
    got = run_json("policy", "set", "run", "--keep-every", "1000", "--keep-interval", "6h")
    assert got["policy"]["keep_interval"] == "6h" and got["policy"]["keep_interval_seconds"] == 21600
    shown = run_json("policy", "show", "run")  # the task's own replaces the workspace's: nothing merged
    assert shown["source"] == "task" and shown["policy"]["keep_last"] == 0 and shown["policy"]["keep_best"] == 0
    assert run_json("policy", "show")["policy"]["keep_last"] == 3
    # a metric whose direction nobody can tell is refused when the policy is set, not when it is applied
    bad = run("policy", "set", "run", "--keep-best", "1", "--metric", "score")
    assert bad.exit_code == 2 and "--min or --max" in bad.stderr
    assert (
        run_json("policy", "set", "run", "--keep-best", "1", "--metric", "score", "--max")["policy"]["direction"]
        == "max"
    )
    huge = run("policy", "set", "run", "--keep-last", "99999999999999999999")
    assert huge.exit_code == 2 and "64-bit" in huge.stderr
    assert run_json("policy", "show", "run")["policy"]["keep_best"] == 1  # nothing written
    empty = run("policy", "set", "run")
    assert empty.exit_code == 2 and "at least one rule" in empty.stderr and "policy unset" in empty.stderr
    got = run_json("policy", "unset", "run")  # what applies next: the workspace default
    assert got["removed"] is True and got["source"] == "workspace" and got["policy"]["keep_last"] == 3
    assert run_json("policy", "show", "run")["source"] == "workspace"
    again = run("policy", "unset", "run")
    assert again.exit_code == 0 and "nothing removed" in again.stdout and "workspace default" in again.stderr
    assert run_json("policy", "unset", "run")["removed"] is False
    assert run_json("policy", "unset")["removed"] is True and run_json("policy", "unset")["removed"] is False
    assert run_json("policy", "show", "run")["source"] is None


def test_a_task_policy_raises_the_manifest_format_and_survives_rewrites(ws: ckpt.Workspace, run_json: Any) -> None:
    task = _task(ws, n=3, policy={"keep_last": 2})
    doc = tomllib.loads(task.manifest.read_text())
    assert doc["format"] == 3 and doc["policy"] == {"keep_last": 2}
    # a ckpt that knows no [policy] (newest format 1, or 2 for a bucket log) refuses the file rather than
    # rewriting it without the table
    with pytest.raises(ManifestError, match="upgrade ckpt|newer"):
        check_format(doc, task.manifest, LOG_FORMAT)
    run_json("trash-unused", "run", "--keep-last", "1")  # a rewrite keeps the table
    run_json("finish", "run")
    assert tomllib.loads(task.manifest.read_text())["policy"] == {"keep_last": 2}
    ckpt.policy.set_policy(ws, "run", None)
    assert tomllib.loads(task.manifest.read_text())["format"] == 1


def test_workspace_policy_is_in_ckpt_toml_and_other_settings_stay(ws: ckpt.Workspace) -> None:
    path = ws.root / "ckpt.toml"
    path.write_text(path.read_text() + '\n[metrics]\nscore = "max"\n')
    ws = ckpt.Workspace.open(ws.root)
    ckpt.policy.set_policy(ws, None, {"keep_best": 2, "metric": "score", "keep_interval": "1d"})
    doc = tomllib.loads(path.read_text())
    assert doc["metrics"] == {"score": "max"} and doc["format"] == 1
    assert doc["policy"] == {"keep_last": 0, "keep_best": 2, "metric": "score", "keep_interval": "1d"}  # mode: per task


def test_a_workspace_default_leaves_the_direction_to_each_task(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    _task(any_ws, "up", n=4, metric_modes={"val_loss": "max"})  # this task's val_loss: higher is better
    _task(any_ws, "down", n=4)
    assert run_json("policy", "set", "--keep-best", "1", "--metric", "val_loss")["policy"]["direction"] is None
    assert run_json("policy", "show", "up")["policy"]["direction"] == "max"
    res = run_json("trash-unused", "up", "--dry-run")
    assert res["direction"] == "max" and res["direction_source"] == "task"
    kept = [k["number"] for k in res["kept"]]
    assert kept == [1, 4]  # the highest loss (0.9, #1), as promote --best val_loss picks it, and the latest
    assert run_json("promote", "up", "--best", "val_loss")["checkpoint"] == 1
    assert [k["number"] for k in run_json("trash-unused", "down", "--dry-run")["kept"]] == [4]  # lowest 0.4: #4
    # --min / --max on the default is recorded and applies to every task
    got = run_json("policy", "set", "--keep-best", "1", "--metric", "val_loss", "--min")
    assert got["policy"]["direction"] == "min"
    res = run_json("trash-unused", "up", "--dry-run")
    assert res["direction"] == "min" and res["direction_source"] == "policy"


def test_library_policy_values_are_never_coerced(ws: ckpt.Workspace) -> None:
    ws.create_task("run")
    for bad in ({"keep_last": 2.5}, {"keep_last": True}, {"keep_every": "10"}, {"keep_interval": 1.5},
                {"keep_best": 1, "metric": 3}, {"keep_last": -1}):  # fmt: skip
        with pytest.raises(ckpt.UsageError):
            ckpt.policy.set_policy(ws, "run", bad)
        with pytest.raises(ckpt.UsageError):
            ws.create_task(f"t{len(str(bad))}", policy=bad)
    assert ws.task("run").header.policy is None and ws.task_names() == ["run"]  # no task made for a bad policy
    assert ckpt.policy.set_policy(ws, "run", {"keep_last": 2, "keep_interval": 3600}).rules.keep_interval == 3600


def test_a_damaged_or_newer_policy_is_refused_not_ignored(ws: ckpt.Workspace, run: Any) -> None:
    _task(ws, n=3)
    path = ws.root / "ckpt.toml"
    path.write_text(path.read_text() + "\n[policy]\nkeep_last = 2\nkeep_newest_per_gpu = 1\n")
    res = run("trash-unused", "run")
    assert res.exit_code == 6 and "keep_newest_per_gpu" in res.stderr and "upgrade ckpt" in res.stderr
    assert len(ws.task("run").checkpoints) == 3


def test_a_hand_edited_policy_of_no_rule_is_refused(ws: ckpt.Workspace, run: Any) -> None:
    task = _task(ws, n=3)
    ckpt.policy.set_policy(ws, None, {"keep_last": 2})
    text = task.manifest.read_text()
    task.manifest.write_text(text + "\n[policy]\nkeep_last = 0\n")
    for args in (("trash-unused", "run"), ("policy", "show", "run")):
        res = run(*args)
        assert res.exit_code == 6 and "no rule" in res.stderr, res.output
    assert len(ws.task("run").checkpoints) == 3


# --- trash-unused by policy --------------------------------------------------------------------------------------


def test_trash_unused_applies_the_policy_and_flags_replace_it(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    _task(any_ws, n=6)
    run_json("policy", "set", "run", "--keep-last", "3")
    dry = run("trash-unused", "run", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "the task's policy" in dry.stderr and "keep-last 3" in dry.stdout
    for flag in ("--keep-last", "--keep-every"):  # a 0 typed is a flag: models and the latest only, this run
        zero = run_json("trash-unused", "run", flag, "0", "--dry-run")
        assert zero["rules"] == "flags" and zero["trashed"] == [1, 2, 3, 4, 5], zero
    res = run_json("trash-unused", "run", "--keep-last", "5", "--dry-run")  # flags replace it for this run
    assert res["rules"] == "flags" and res["trashed"] == [1]
    res = run_json("trash-unused", "run")
    assert res["rules"] == "task" and res["trashed"] == [1, 2, 3]
    assert [r["number"] for r in run_json("list", "run")] == [4, 5, 6]


def test_trash_unused_all_names_the_tasks_without_a_policy(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    _task(any_ws, "a", n=4)
    _task(any_ws, "b", n=4)
    run_json("policy", "set", "a", "--keep-last", "2")  # set after the saves: nothing applied it yet
    res = run_json("trash-unused", "--all", "--dry-run")
    assert [(t["task"], t["trashed"]) for t in res["tasks"]] == [("a", [1, 2])]
    assert res["skipped"] == [{"task": "b", "reason": "no policy (see: ckpt policy set)"}]
    text = run("trash-unused", "--all")
    assert text.exit_code == 0, text.output
    assert "skipped 1 task without a policy: b" in text.stderr
    ckpt.policy.set_policy(any_ws, None, {"keep_last": 3})  # now b follows the workspace default
    res = run_json("trash-unused", "--all")
    assert [(t["task"], t["rules"], t["trashed"]) for t in res["tasks"]] == [("a", "task", []), ("b", "workspace", [1])]
    assert run("trash-unused", "--all", "a").exit_code == 2
    assert run("trash-unused").exit_code == 2


# --- in the background, after each save -----------------------------------------------------------------------------


def test_the_policy_runs_after_saves_and_keeps_what_it_must(any_ws: ckpt.Workspace, run_json: Any) -> None:
    task = any_ws.create_task("live", policy={"keep_last": 1, "keep_best": 1, "metric": "val_loss"})
    data = {}
    for i, loss in enumerate([0.5, 0.2, 0.9, 0.8, 0.7], start=1):
        data[i] = os.urandom(64)
        assert task.save(data[i], step=i, metrics={"val_loss": loss}) == i
        if i == 3:
            task.wait()
            any_ws.promote("live", 3, title="kept-by-model")
    task.wait()
    assert [cp.number for cp in ckpt.Workspace.open(any_ws.location).task("live").checkpoints] == [2, 3, 5]
    # in the trash, restorable byte for byte: never deleted
    entries = run_json("trash", "list")
    assert sorted(n for e in entries for n in e["checkpoints"]) == [1, 4]
    for e in entries:
        run_json("trash", "restore", e["id"])
    t = ckpt.Workspace.open(any_ws.location).task("live")
    for cp in t.checkpoints:
        assert t.local_path(cp).read_bytes() == data[cp.number]


def test_the_checkpoint_just_saved_is_never_trashed(ws: ckpt.Workspace) -> None:
    task = ws.create_task("run", policy={"keep_best": 1, "metric": "val_loss"})
    task.save(b"best", metrics={"val_loss": 0.1})
    res = trash_unused(ws, "run", KeepRules(keep_best=1, metric="val_loss", protect=frozenset({2})), dry_run=True)
    assert res.plan.trashed == []
    task.save(b"worse", metrics={"val_loss": 0.9})
    task.save(b"worst", metrics={"val_loss": 1.0})
    task.wait()
    # the run after save 3 kept 3 (just saved, and the latest); 2 went
    assert [cp.number for cp in task.checkpoints] == [1, 3]


def test_coalesced_background_runs_protect_only_the_newest_save(
    any_ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import ckpt.policy as policy

    real, go, calls = policy._apply_after_save, threading.Event(), []

    def held(*args: Any) -> None:  # the first run waits until every save is queued: the rest fold into one run
        calls.append(args[3])  # (opener, location, task, number, keep)
        go.wait(10)
        real(*args)

    monkeypatch.setattr(policy, "_apply_after_save", held)
    task = any_ws.create_task("run", policy={"keep_last": 1})
    for i in range(4):
        task.save(f"w{i}".encode(), step=i)
    go.set()
    task.wait()
    assert calls == [1, 4]  # two runs: the second covered saves 2, 3 and 4
    assert [cp.number for cp in ckpt.Workspace.open(any_ws.location).task("run").checkpoints] == [4]


def test_a_policy_error_is_a_warning_never_an_exception(ws: ckpt.Workspace) -> None:
    task = ws.create_task("run")
    path = ws.root / "ckpt.toml"
    path.write_text(path.read_text() + "\n[policy]\nkeep_last = -1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert task.save(b"one") == 1
        assert task.save(b"two") == 2
        task.wait()
    assert any("keep_last" in str(w.message) for w in caught)
    assert len(task.checkpoints) == 2


def test_saves_before_the_metric_is_logged_are_no_error(ws: ckpt.Workspace) -> None:
    task = ws.create_task("run", policy={"keep_last": 1, "keep_best": 1, "metric": "val_loss"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning from the background run fails the test
        for step in (1, 2, 3):
            task.save(b"no metric yet", step=step)
        task.wait()
        assert [cp.number for cp in task.checkpoints] == [3]
        task.save(b"validated", step=4, metrics={"val_loss": 0.3})
        task.save(b"later", step=5)
        task.wait()
    assert [cp.number for cp in task.checkpoints] == [4, 5]


def test_a_keep_best_metric_no_checkpoint_records_is_warned_about_once(ws: ckpt.Workspace) -> None:
    policy = {"keep_best": 1, "metric": "val_los", "mode": "min", "keep_last": 2}
    task = ws.create_task("run", policy=policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            task.save(f"w{i}".encode(), step=i, metrics={"val_loss": 1 / (i + 1)})
            task.wait()
    said = [str(w.message) for w in caught if "val_los'" in str(w.message)]
    assert len(said) == 1 and "val_loss" in said[0] and "ckpt policy set" in said[0]
    assert [cp.number for cp in task.checkpoints] == [3, 4]  # keep-last still applies


def test_a_restart_saves_on_into_the_same_task_under_its_policy(ws: ckpt.Workspace) -> None:
    first = ws.create_task("run", policy={"keep_last": 2})
    for i in range(3):
        first.save(f"a{i}".encode(), step=i)
    first.wait()
    # a new process: the same name, the stored policy, no policy argument
    again = ckpt.Workspace.open(ws.root).create_task("run", exist_ok=True)
    assert again.save(b"b0", step=1) == 4
    again.wait()
    assert [cp.number for cp in again.checkpoints] == [3, 4]


# --- latest ----------------------------------------------------------------------------------------------------------


def test_latest(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    task = any_ws.create_task("run")
    none = run("latest", "run")
    assert none.exit_code == 3 and "no checkpoint" in none.stderr
    assert task.latest() is None
    task.save(b"one", step=1)
    task.save(b"two", step=2, metrics={"val_loss": math.nan})
    assert run("latest", "run").stdout == "2\n"
    path = Path(run("latest", "run", "--path").stdout.strip())
    assert path.is_absolute() and path.read_bytes() == b"two"  # in a bucket: the verified local copy
    got = run_json("latest", "run")
    assert got["number"] == 2 and got["metrics"] == {"val_loss": None}
    assert got["sha256"] == hashlib.sha256(b"two").hexdigest() and got["path"] == str(path)
    assert task.latest() is not None and task.latest().number == 2  # type: ignore[union-attr]
    assert run("latest", "nope").exit_code == 3
    assert json.loads(run("policy", "show", "run", "--json").stdout)["summary"].startswith("no policy")


def test_latest_of_a_task_whose_checkpoints_are_all_in_the_trash_points_at_it(ws: ckpt.Workspace, run: Any) -> None:
    import tomli_w

    task = ws.create_task("gone")
    task.save(b"a")
    task.save(b"b")
    entry = trash_unused(ws, "gone").entry
    # the latest is never trashed by trash-unused; its record is dropped by hand here (as a crash or an edit might)
    doc = tomllib.loads(task.manifest.read_text())
    doc["checkpoints"] = [c for c in doc["checkpoints"] if c["number"] != 2]
    task.manifest.write_text(tomli_w.dumps(doc))
    res = run("latest", "gone")
    assert res.exit_code == 3 and "in the trash" in res.stderr and f"ckpt trash restore {entry}" in res.stderr
    assert "ckpt trash list" in res.stderr


def test_latest_path_checks_the_file_against_its_record(any_ws: ckpt.Workspace, run: Any) -> None:
    from ckpt.integrations.lightning import CkptCallback
    from tests.conftest import put_bytes, remove_bytes

    task = any_ws.create_task("run")
    task.save(b"one", step=1)
    task.save(b"two", step=2)
    cp = task.latest()
    assert cp is not None
    key = f"tasks/run/{cp.file}"
    if any_ws.remote:  # the cached copy handed out is checked again: changed since its download, it is fetched again
        path = Path(run("latest", "run", "--path").stdout.strip())
        path.chmod(0o644)
        path.write_bytes(b"tw")
        again = run("latest", "run", "--path")
        assert again.exit_code == 0 and Path(again.stdout.strip()).read_bytes() == b"two"
        path.write_bytes(b"twoo")
        assert Path(CkptCallback.resume_path(any_ws, "run") or "").read_bytes() == b"two"
        path.unlink()
    else:
        put_bytes(any_ws, key, b"tw")  # not the size recorded
        res = run("latest", "run", "--path")
        assert res.exit_code == 6 and "2 bytes, not the 3 recorded" in res.stderr and res.stdout == ""
    remove_bytes(any_ws, key)
    res = run("latest", "run", "--path")
    assert res.exit_code == 6 and "missing" in res.stderr and res.stdout == ""
    assert run("latest", "run", "--json").exit_code == 6
    with pytest.raises(ckpt.IntegrityError):
        CkptCallback.resume_path(any_ws, "run")
    assert CkptCallback.resume_path(any_ws, "nope") is None


def test_latest_path_never_hands_out_a_checkpoint_through_a_link(ws: ckpt.Workspace, run: Any, tmp_path: Path) -> None:
    task = ws.create_task("lnk")
    task.save(b"x" * 800)
    cp = task.checkpoint(1)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"y" * 800)
    path = task.path_of(cp)
    path.unlink()
    path.symlink_to(outside)
    res = run("latest", "lnk", "--path")
    assert res.exit_code == 6, res.output
    assert "link" in res.stderr and str(outside) not in res.stdout
