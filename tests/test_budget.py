"""The trash budget (ckpt.budget): ckpt.toml [trash] max_size / max_age, and `ckpt trash empty --auto`."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import ckpt
from ckpt.budget import parse_size, plan_auto
from ckpt.policy import update_workspace_doc
from ckpt.trash import trash_unused


def test_parse_size() -> None:
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("500M") == 500 * 10**6 and parse_size("123") == 123 and parse_size(7) == 7
    for bad in ("ten GB", "-1", "5 iB", True, 1.5):
        with pytest.raises(ckpt.UsageError):
            parse_size(bad)


def _entries(ws: ckpt.Workspace, sizes: list[int]) -> list[str]:
    """One trash entry per size (oldest first), each the only unused checkpoint of its own task."""
    ids = []
    for i, size in enumerate(sizes):
        task = ws.create_task(f"t{i}")
        task.save(os.urandom(size))
        task.save(b"latest")
        entry = trash_unused(ws, f"t{i}").entry
        assert entry is not None
        ids.append(entry)
    return ids


def _budget(ws: ckpt.Workspace, **table: Any) -> None:
    update_workspace_doc(ws, lambda doc: doc.__setitem__("trash", table))


def test_auto_empties_oldest_first_until_the_size_holds(any_ws: ckpt.Workspace, run: Any, run_json: Any) -> None:
    ids = _entries(any_ws, [3000, 1000, 2000, 500])
    _budget(any_ws, max_size="2.6kB")
    auto = plan_auto(any_ws)
    # 6,500 bytes: the oldest two go (3,000 then 1,000), leaving 2,500
    assert [e.id for e in auto.plan.entries] == ids[:2]
    assert (auto.bytes_before, auto.bytes_after) == (6500, 2500)
    dry = run_json("trash", "empty", "--auto", "--dry-run")
    assert dry["dry_run"] is True and len(dry["would"]) == 2 and dry["budget"]["bytes_after"] == 2500
    refused = run("trash", "empty", "--auto")  # no terminal, no --yes
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert len(run_json("trash", "list")) == 4
    done = run("trash", "empty", "--auto", "--yes")
    assert done.exit_code == 0, done.output
    assert "freed" in done.stdout and "trash budget max_size 2.5 KiB (2600 bytes)" in done.stderr
    assert sorted(e["id"] for e in run_json("trash", "list")) == sorted(ids[2:])
    again = run_json("trash", "empty", "--auto", "--yes")
    assert again["emptied"] == [] and again["budget"]["bytes_before"] == 2500


def test_auto_empties_what_is_older_than_max_age(ws: ckpt.Workspace) -> None:
    ids = _entries(ws, [100, 100, 100])
    _budget(ws, max_age="7d", max_size=10**9)
    assert plan_auto(ws).plan.entries == []
    later = datetime.now(UTC) + timedelta(days=8)
    assert [e.id for e in plan_auto(ws, now=later).plan.entries] == ids


def test_auto_needs_a_budget_and_takes_no_ids(ws: ckpt.Workspace, run: Any) -> None:
    ids = _entries(ws, [100])
    res = run("trash", "empty", "--auto", "--yes")
    assert res.exit_code == 2 and "no trash budget" in res.stderr and "max_size" in res.stderr
    _budget(ws, max_size="1GB")
    assert run("trash", "empty", "--auto", ids[0], "--yes").exit_code == 2
    _budget(ws, max_size="lots")
    bad = run("trash", "empty", "--auto", "--yes")
    assert bad.exit_code == 6 and "[trash]" in bad.stderr


def test_a_budget_of_the_wrong_type_says_what_is_expected(any_ws: ckpt.Workspace, run: Any) -> None:
    _budget(any_ws, max_age=30)
    bad = run("trash", "empty", "--auto", "--yes")
    assert bad.exit_code == 6 and "'max_age' must be a string such as \"30d\", not 30" in bad.stderr
    assert "bytes-like" not in bad.stderr
    update_workspace_doc(any_ws, lambda doc: doc.__setitem__("trash", 5))
    bad = run("trash", "empty", "--auto", "--yes")
    assert bad.exit_code == 6 and "[trash] is not a table" in bad.stderr, bad.output
