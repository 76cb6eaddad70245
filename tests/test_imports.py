"""The light commands never import torch, and the derived caches (per task, and the workspace's summary
cache) always agree with a fresh parse of task.toml. Speed itself is measured in benchmarks/, not here."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt.manifest import _COLUMNS, Checkpoint, TaskReader, parse_task
from ckpt.workspace import CACHE_FILE, SUMMARY_CACHE_FILE

from .conftest import make_task

CKPT = [sys.executable, "-m", "ckpt"]


def _env(ws: ckpt.Workspace) -> dict[str, str]:
    env = dict(os.environ, CKPT_WORKSPACE=str(ws.root))
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _loaded(cmd: list[str], env: dict[str, str]) -> set[str]:
    """Modules a process imported, from `-X importtime` (PYTHONPROFILEIMPORTTIME reaches the console script too)."""
    proc = subprocess.run(cmd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "import ckpt"],
        ["-m", "ckpt", "--help"],
        ["-m", "ckpt", "tasks", "--json"],
        ["-m", "ckpt", "list", "T", "--json"],
    ],
    ids=["import", "help", "tasks", "list"],
)
def test_light_commands_do_not_import_torch(ws: ckpt.Workspace, args: list[str]) -> None:
    make_task(ws, "T", n=2)
    mods = _loaded([sys.executable, *args], _env(ws))
    assert "ckpt" in mods
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}


def test_installed_script_does_not_import_torch(ws: ckpt.Workspace) -> None:
    script = Path(sys.executable).parent / "ckpt"
    if not script.is_file():
        pytest.skip("the ckpt script is not installed next to this interpreter")
    make_task(ws, "T", n=2)
    mods = _loaded([str(script), "list", "T", "--json"], _env(ws))
    assert "ckpt.cli" in mods and "torch" not in mods


def test_import_reads_inside_files_only_when_names_lack_epoch_or_step(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """`ckpt.formats` (pickle, decimal) is imported only for a Lightning name without its epoch or step."""
    named = tmp_path / "named"
    named.mkdir()
    for i in range(3):
        (named / f"epoch={i}-step={10 * (i + 1)}.ckpt").write_bytes(os.urandom(100))
    mods = _loaded([*CKPT, "import", str(named), "--task", "named", "--json"], _env(ws))
    assert "ckpt.importer" in mods and "ckpt.formats" not in mods and "torch" not in mods
    assert [cp.step for cp in ws.task("named").checkpoints] == [10, 20, 30]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "last.ckpt").write_bytes(os.urandom(100))  # not a torch zip: read, found empty, imported anyway
    mods = _loaded([*CKPT, "import", str(bare), "--task", "bare", "--json"], _env(ws))
    assert "ckpt.formats" in mods and "torch" not in mods
    assert [cp.original_name for cp in ws.task("bare").checkpoints] == ["last.ckpt"]


# --- the per-task list cache ------------------------------------------------------------------------


def _fresh(task: ckpt.Task) -> list[dict[str, Any]]:
    """The checkpoints as a fresh parse of task.toml gives them, no cache involved."""
    state = parse_task(task.manifest.read_bytes(), task.manifest, task.name)
    return [dataclasses.asdict(state.checkpoints[n]) for n in sorted(state.checkpoints)]


def _listed(ws: ckpt.Workspace, name: str) -> list[dict[str, Any]]:
    proc = subprocess.run([*CKPT, "list", name, "--json"], env=_env(ws), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same(listed: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
    assert [r["number"] for r in listed] == [c["number"] for c in fresh]
    for r, c in zip(listed, fresh, strict=True):
        assert (r["step"], r["epoch"], r["size"], r["sha256"], r["created"]) == (
            c["step"],
            c["epoch"],
            c["size"],
            c["sha256"],
            c["created"],
        )
        assert r["metrics"] == c["metrics"]
        assert r["path"] == f"tasks/{c['task']}/{c['file']}"
    assert [r["latest"] for r in listed] == [c is fresh[-1] for c in fresh]


def test_cache_columns_are_the_checkpoint_fields() -> None:
    assert (*_COLUMNS, "task") == tuple(f.name for f in dataclasses.fields(Checkpoint))


def test_list_cache_follows_appends_by_another_process(ws: ckpt.Workspace) -> None:
    task = make_task(ws, "T", n=3)
    _same(_listed(ws, "T"), _fresh(task))  # builds the cache
    assert (task.folder / CACHE_FILE).exists()
    code = (
        "import ckpt, sys; t = ckpt.Workspace.open(sys.argv[1]).task('T'); "
        "[t.save(bytes([i]) * 10, step=i, metrics={'val_iou': i / 10, 'nan': float('nan')}) for i in range(4)]"
    )
    subprocess.run([sys.executable, "-c", code, str(ws.root)], check=True)
    listed = _listed(ws, "T")
    assert len(listed) == 7 and listed[-1]["metrics"]["nan"] is None
    fresh = _fresh(task)
    for c in fresh:
        c["metrics"] = {k: (None if v != v else v) for k, v in c["metrics"].items()}
    _same(listed, fresh)
    _same(_listed(ws, "T"), fresh)  # and again from the extended cache


def test_list_cache_follows_a_rewrite(ws: ckpt.Workspace) -> None:
    task = make_task(ws, "T", n=4)
    _listed(ws, "T")
    proc = subprocess.run([*CKPT, "finish", "T", "--json"], env=_env(ws), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _same(_listed(ws, "T"), _fresh(task))
    proc = subprocess.run([*CKPT, "tasks", "--json"], env=_env(ws), capture_output=True, text=True)
    assert json.loads(proc.stdout)[0]["status"] == "finished"
    # a rewrite by another tool (same checkpoints, one record dropped): a new file, a new inode
    text = task.manifest.read_text()
    head, _, rest = text.partition("[[checkpoints]]")
    rewritten = head + "[[checkpoints]]" + rest.split("[[checkpoints]]", 1)[1]
    tmp = task.manifest.with_suffix(".new")
    tmp.write_text(rewritten)
    os.replace(tmp, task.manifest)
    listed = _listed(ws, "T")
    assert [r["number"] for r in listed] == [2, 3, 4]
    _same(listed, _fresh(task))


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncated", "wrong-types", "other-version", "lies"])
def test_list_cache_damaged(ws: ckpt.Workspace, damage: str) -> None:
    task = make_task(ws, "T", n=5)
    _listed(ws, "T")
    cache = task.folder / CACHE_FILE
    raw = cache.read_bytes()
    match damage:
        case "delete":
            cache.unlink()
        case "garbage":
            cache.write_bytes(b"\x00\xffnot json")
        case "truncated":
            cache.write_bytes(raw[: len(raw) // 2])
        case "wrong-types":
            doc = json.loads(raw)
            doc["checkpoints"]["number"] = "12345"
            cache.write_text(json.dumps(doc))
        case "other-version":
            doc = json.loads(raw)
            doc["v"] = 999
            cache.write_text(json.dumps(doc))
        case "lies":  # a cache that claims an older size of the same file: only what follows is re-read
            doc = json.loads(raw)
            doc["size"] = 10
            cache.write_text(json.dumps(doc))
    _same(_listed(ws, "T"), _fresh(task))
    reader = TaskReader(task.manifest, cache, "T")
    assert sorted(reader.read().checkpoints) == [1, 2, 3, 4, 5]


# --- the workspace's summary cache --------------------------------------------------------------------


def _tasks(ws: ckpt.Workspace) -> list[dict[str, Any]]:
    proc = subprocess.run([*CKPT, "tasks", "--json"], env=_env(ws), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fresh_tasks(ws: ckpt.Workspace) -> list[tuple[Any, ...]]:
    out = []
    for name in sorted(p.name for p in ws.tasks_dir.iterdir() if p.is_dir()):
        path = ws.tasks_dir / name / "task.toml"
        try:
            st = parse_task(path.read_bytes(), path, name)
        except ckpt.ManifestError:
            continue
        last = max(st.checkpoints, default=None)
        out.append(
            (
                name,
                st.header.status,
                len(st.checkpoints),
                sum(c.size for c in st.checkpoints.values()),
                last,
                st.checkpoints[last].metrics if last else {},
            )
        )
    return out


def _rows(listed: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["name"], r["status"], r["checkpoints"], r["size"], r["latest"], r["latest_metrics"]) for r in listed]


def test_summary_cache_follows_every_change(ws: ckpt.Workspace) -> None:
    for name in ("a", "b", "c"):
        make_task(ws, name, n=2)
    assert _rows(_tasks(ws)) == _fresh_tasks(ws)
    assert (ws.tasks_dir / SUMMARY_CACHE_FILE).exists()
    ws.task("a").save(b"x" * 77, step=9, metrics={"val_iou": 0.99})  # an append
    ckpt.Workspace.open(ws.root).task("b").finish(failed=True)  # a rewrite
    make_task(ws, "d", n=1)  # a new task
    ckpt.Workspace.open(ws.root).task("c").manifest.write_text("format = 1\nname = 'c'\nstatus = 'bogus'\n")
    listed = _tasks(ws)
    assert [r["name"] for r in listed] == ["a", "b", "d"]  # c is broken: warned about, not listed from the cache
    assert _rows(listed) == _fresh_tasks(ws)
    (ws.tasks_dir / SUMMARY_CACHE_FILE).write_text('{"v": 2, "fields": "garbage", "tasks": []}')
    assert _rows(_tasks(ws)) == _fresh_tasks(ws)


def test_summary_cache_under_concurrent_writers(ws: ckpt.Workspace) -> None:
    """Savers append while `ckpt tasks` runs again and again: the rows always match task.toml at the end."""
    for name in ("a", "b"):
        make_task(ws, name, n=1)
    code = (
        "import ckpt, sys; ws = ckpt.Workspace.open(sys.argv[1]); t = ws.task(sys.argv[2]); "
        "[t.save(bytes([i]) * (i + 1), step=i, metrics={'m': i}) for i in range(40)]"
    )
    savers = [subprocess.Popen([sys.executable, "-c", code, str(ws.root), n]) for n in ("a", "b")]
    listers = [
        subprocess.Popen([*CKPT, "tasks", "--json"], env=_env(ws), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    for p in listers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        for row in json.loads(out):  # every row a consistent snapshot: count and latest agree
            assert row["latest"] == row["checkpoints"]
    for p in savers:
        assert p.wait(timeout=120) == 0
    assert _rows(_tasks(ws)) == _fresh_tasks(ws)
    assert _rows(_tasks(ws)) == _fresh_tasks(ws)  # and from the cache the last run wrote
