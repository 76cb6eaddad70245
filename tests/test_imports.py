"""The light commands never import torch, and the derived caches (per task, and the workspace's summary
cache) always agree with a fresh parse of task.toml. Speed itself is measured in benchmarks/, not here."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import workspace
from ckpt.cli import _render
from ckpt.cli._render import checkpoint_json
from ckpt.hashing import hash_tree
from ckpt.layout import CACHE_FILE, LIST_CACHE_FILE, SUMMARY_CACHE_FILE, TASK_ROWS_CACHE_FILE, Incoming
from ckpt.manifest import COLUMNS, Checkpoint, parse_task
from ckpt.task_base import Task
from ckpt.task_reader import TaskReader
from ckpt.workspace import FolderWorkspace

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
        ["-m", "ckpt", "list", "T", "--spark"],
    ],
    ids=["import", "help", "tasks", "list", "list-spark"],
)
def test_light_commands_do_not_import_torch(ws: ckpt.Workspace, args: list[str]) -> None:
    make_task(ws, "T", n=2)
    mods = _loaded([sys.executable, *args], _env(ws))
    assert "ckpt" in mods
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}
    # matplotlib (the plot extra) only for `ckpt plot` and `ckpt report`
    assert not {m for m in mods if m == "matplotlib" or m.startswith(("matplotlib.", "numpy"))}


def test_installed_script_does_not_import_torch(ws: ckpt.Workspace) -> None:
    script = Path(sys.executable).parent / "ckpt"
    if not script.is_file():
        pytest.skip("the ckpt script is not installed next to this interpreter")
    make_task(ws, "T", n=2)
    mods = _loaded([str(script), "list", "T", "--json"], _env(ws))
    assert "ckpt.cli" in mods and "torch" not in mods


def test_trash_unused_leaves_the_other_trash_results_unimported(ws: ckpt.Workspace) -> None:
    """trash-unused does not make the classes that only models remove, restore, empty, du and doctor return."""
    make_task(ws, "T", n=3)
    mods = _loaded([*CKPT, "trash-unused", "T", "--json"], _env(ws))
    assert "ckpt.trash" in mods and "ckpt.trash_results" not in mods
    assert [cp.number for cp in ckpt.Workspace.open(ws.root).task("T").checkpoints] == [3]
    mods = _loaded([*CKPT, "du", "--json"], _env(ws))
    assert "ckpt.trash_results" in mods


def test_import_reads_inside_files_only_when_they_are_torch_archives(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """`ckpt.formats` (pickle, decimal) is imported only for a `.ckpt` that starts as a zip archive."""
    named = tmp_path / "named"
    named.mkdir()
    for i in range(3):
        (named / f"epoch={i}-step={10 * (i + 1)}.ckpt").write_bytes(os.urandom(100))
    mods = _loaded([*CKPT, "import", str(named), "--task", "named", "--json"], _env(ws))
    assert "ckpt.importer" in mods and "ckpt.formats" not in mods and "torch" not in mods
    assert [cp.step for cp in ws.task("named").checkpoints] == [10, 20, 30]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "last.ckpt").write_bytes(os.urandom(100))  # not a torch zip: not read, imported anyway
    mods = _loaded([*CKPT, "import", str(bare), "--task", "bare", "--json"], _env(ws))
    assert "ckpt.formats" not in mods and "torch" not in mods
    assert [(cp.original_name, cp.step) for cp in ws.task("bare").checkpoints] == [("last.ckpt", None)]
    with zipfile.ZipFile(bare / "07.ckpt", "w") as zf:  # the layout torch.save writes
        zf.writestr("archive/data.pkl", pickle.dumps({"epoch": 7, "global_step": 70}, protocol=2))
    mods = _loaded([*CKPT, "import", str(bare), "--task", "bare", "--json"], _env(ws))
    assert "ckpt.formats" in mods and "torch" not in mods
    assert [(cp.original_name, cp.step) for cp in ws.task("bare").checkpoints] == [("last.ckpt", None), ("07.ckpt", 70)]


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
    assert (*COLUMNS, "task") == tuple(f.name for f in dataclasses.fields(Checkpoint))


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


def _rewrite_in_place(task: ckpt.Task, changes: list[tuple[bytes, bytes]]) -> None:
    """Change bytes of task.toml, keeping its inode, size, last bytes and mtime: what a manifest rewritten with
    other records of the same total length looks like when the new file gets the inode number its
    predecessor freed (ext4 hands freed numbers out again at once)."""
    data = task.manifest.read_bytes()
    for old, new in changes:
        assert len(old) == len(new) and data.count(old) == 1 and data.index(old) < len(data) - 64
        data = data.replace(old, new)
    st = task.manifest.stat()
    with open(task.manifest, "r+b") as f:
        f.write(data)
    os.utime(task.manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = task.manifest.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("writer", ["ckpt", "another tool"])
def test_caches_see_a_rewrite_with_the_same_inode_size_and_last_bytes(ws: ckpt.Workspace, writer: str) -> None:
    task = make_task(ws, "T", n=4)
    revision = re.search(rb'\nrevision = "([0-9a-f]{16})"\n', task.manifest.read_bytes())
    if writer == "ckpt":  # every whole write by ckpt has a revision of its own
        assert revision is not None
        changes = [(revision.group(1), bytes(reversed(revision.group(1))))]
    else:  # a tool that writes no revision: the CRC-32 of the whole manifest is checked instead
        assert revision is not None
        task.manifest.write_bytes(task.manifest.read_bytes().replace(revision.group(0), b"\n"))
        changes = []
    assert task.state().checkpoints[2].step == 200  # this process's reader has read it
    _settle(task)
    _listed(ws, "T")  # the JSON cache and the rendered rows, made from what it read
    _listed(ws, "T")
    assert (task.folder / LIST_CACHE_FILE).exists()
    _rewrite_in_place(task, [(b"step = 200\n", b"step = 900\n"), *changes])
    assert task.state().checkpoints[2].step == 900  # the same reader
    fresh = ckpt.Workspace.open(ws.root).task("T")  # a new one, from the JSON cache
    assert fresh.state().checkpoints[2].step == 900
    listed = _listed(ws, "T")  # the rendered rows
    assert [r["step"] for r in listed] == [100, 900, 300, 400]
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


# --- the rendered rows of `ckpt list --json` ----------------------------------------------------------


def _settle(task: ckpt.Task) -> None:
    """Date the task's folders a minute back: the rows are kept only for folders that did not just change."""
    old = time.time() - 60
    for folder in (task.folder, task.folder / "checkpoints"):
        os.utime(folder, (old, old), follow_symlinks=False)


def _odd_task(ws: ckpt.Workspace, tmp_path: Path) -> ckpt.Task:
    """Every kind of value a `ckpt list` row holds: odd metrics, no step, a folder, a symlink, models, the latest."""
    task = ws.create_task("odd")
    task.save(
        b"a" * 10,
        step=1,
        epoch=0,
        metrics={
            "loss": 0.1 + 0.2,
            "nan": float("nan"),
            "inf": float("-inf"),
            "tiny": 5e-324,
            "big": 2**62,
            "neg zero": -0.0,
            "ünï 名\u2028": 1e22,
            'q"}, {"number": 7, "x': 2.5,
            "number": 7,
            "back\\slash\n\ttab": 3,
        },
    )
    task.save(b"b" * 20)  # no step, epoch or metrics
    folder = tmp_path / "hf-model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(os.urandom(300))
    digest, size = hash_tree(folder)
    task.add_existing([Incoming(folder, "hf-model", size, digest, is_dir=True, step=30)], mode="copy")
    task.save(b"c" * 30, step=40, epoch=2, metrics={"val_iou": 0.5})
    task.save(b"d" * 40, step=50, epoch=3, metrics={"val_iou": 0.75})
    for number, title in ((1, "zeta"), (1, "alpha"), (5, "odd-last")):
        ws.promote("odd", number, title=title)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"outside")
    path = task.path_of(task.checkpoint(4))
    path.unlink()
    path.symlink_to(outside)
    return task


def _kept_rows_used(task: ckpt.Task) -> Callable[[], bool]:
    """A probe: True when no command has rewritten the kept rows since it was made (the last listing used them)."""
    before = os.stat(task.folder / LIST_CACHE_FILE).st_ino
    return lambda: os.stat(task.folder / LIST_CACHE_FILE).st_ino == before


def test_list_from_kept_rows_is_byte_for_byte_the_same(
    ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = _odd_task(ws, tmp_path)
    _settle(task)
    first = run("list", "odd", "--json")  # renders the rows, and keeps them
    assert first.exit_code == 0, first.output
    assert (task.folder / LIST_CACHE_FILE).exists()
    normal = run("list", "odd", "--json", "--sort", "number")  # never uses the kept rows
    cps = task.checkpoints
    models = ws.models_of("odd")
    one_by_one = [checkpoint_json(ws, task, cp, cp is cps[-1], models.get(cp.number, [])) for cp in cps]
    expected = (json.dumps(one_by_one, ensure_ascii=False, allow_nan=False) + "\n").encode()

    def no_manifest(self: Task) -> None:
        raise AssertionError("the manifest was read")

    monkeypatch.setattr(Task, "state", no_manifest)
    kept = run("list", "odd", "--json")
    assert kept.exit_code == 0, kept.output
    assert kept.stdout_bytes == first.stdout_bytes == normal.stdout_bytes == expected
    assert kept.stderr == first.stderr == normal.stderr
    assert "checkpoint 4 is reached through symlink 'checkpoints/000004.pt'" in kept.stderr
    rows = json.loads(kept.stdout)
    assert [r["models"] for r in rows] == [["alpha", "zeta"], [], [], [], ["odd-last"]]
    assert [r["latest"] for r in rows] == [False, False, False, False, True]
    assert rows[0]["metrics"]["nan"] is None and rows[0]["metrics"]["inf"] is None
    assert rows[1]["step"] is None and rows[2]["path"] == "tasks/odd/checkpoints/000003"


def test_kept_rows_follow_every_change(ws: ckpt.Workspace, tmp_path: Path, run: Callable[..., Any]) -> None:
    task = make_task(ws, "T", n=4)

    def listed() -> list[dict[str, Any]]:
        got = run("list", "T", "--json")
        normal = run("list", "T", "--json", "--sort", "number")
        assert got.exit_code == 0, got.output
        assert got.stdout_bytes == normal.stdout_bytes and got.stderr == normal.stderr
        return json.loads(got.stdout)

    listed()
    assert not (task.folder / LIST_CACHE_FILE).exists()  # the checkpoints folder just changed: nothing kept
    _settle(task)
    listed()
    used = _kept_rows_used(task)
    ws.promote("T", 2, title="two")
    assert listed()[1]["models"] == ["two"] and used()  # models are looked up on every listing
    task.save(b"x" * 10, step=500, metrics={"val_iou": 0.9})  # an append
    _settle(task)
    rows = listed()
    assert [r["latest"] for r in rows] == [False] * 4 + [True] and not used()
    used = _kept_rows_used(task)
    assert listed() == rows and used()
    path = task.path_of(task.checkpoint(3))  # a file replaced by a symlink: its folder changes
    path.unlink()
    path.symlink_to(tmp_path)
    _settle(task)
    assert listed() == rows and "checkpoint 3 is reached through symlink" in run("list", "T", "--json").stderr
    used = _kept_rows_used(task)
    assert "checkpoint 3 is reached" in run("list", "T", "--json").stderr and used()
    scan = run("scan", "T", "--json")
    assert scan.exit_code == 0 and LIST_CACHE_FILE not in scan.stdout  # ckpt's own file, not an unknown one
    assert run("finish", "T").exit_code == 0  # a rewrite (and a model of the latest)
    assert listed()[-1]["models"] == ["T-5"]
    assert run("trash-unused", "T").exit_code == 0
    assert [r["number"] for r in listed()] == [2, 3, 5]


def test_kept_rows_extended_after_appends(
    ws: ckpt.Workspace, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task(ws, "T", n=4)
    ws.promote("T", 4, title="four")
    _settle(task)
    assert run("list", "T", "--json").exit_code == 0
    rendered: list[list[int]] = []
    real = _render.plain_rows

    def spy(ws: ckpt.Workspace, task: Task, cps: list[Checkpoint]) -> Any:
        rendered.append([cp.number for cp in cps])
        return real(ws, task, cps)

    monkeypatch.setattr(_render, "plain_rows", spy)  # what extending the kept rows renders
    for i in range(2):
        task.save(b"x" * (i + 1), step=900 + i, metrics={"val_iou": float("nan")})

    def same() -> None:
        got, normal = run("list", "T", "--json"), run("list", "T", "--json", "--sort", "number")
        assert got.exit_code == 0, got.output
        assert got.stdout_bytes == normal.stdout_bytes

    same()
    assert rendered == [[5, 6]]  # the first four rows came from the kept text
    used = _kept_rows_used(task)
    same()
    assert rendered == [[5, 6]] * 2 and used()  # the folder just changed: the six rows were not kept
    _settle(task)
    same()
    assert rendered == [[5, 6]] * 3 and not used()  # now they are
    same()
    assert rendered == [[5, 6]] * 3  # and used as they are
    assert json.loads(run("list", "T", "--json").stdout)[3]["models"] == ["four"]
    assert run("finish", "T").exit_code == 0  # a rewrite: nothing kept is reused
    same()
    assert rendered == [[5, 6]] * 3


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "latin-1"])
def test_json_pieces_written_as_print_json_writes(monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    from ckpt.cli._common import print_json, print_json_pieces

    data = [{"name": "ünï", "n": 1}, {"name": "x", "n": None}]
    text = json.dumps(data, ensure_ascii=False).encode()
    written = []
    for write in (lambda: print_json(data), lambda: print_json_pieces([text[:7], memoryview(text)[7:]])):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding=encoding)
        monkeypatch.setattr(sys, "stdout", stream)
        write()
        stream.flush()
        written.append(raw.getvalue())
    assert written[0] == written[1] == (json.dumps(data, ensure_ascii=False) + "\n").encode(encoding)


def _rewrite_kept(path: Path, change: Callable[[dict[str, Any], dict[str, Any], bytes], bytes]) -> None:
    """Change the kept rows' header, index or text and write them back with a right CRC."""
    raw = path.read_bytes()[9:]
    head, index, text = raw.split(b"\n", 2)
    header, idx = json.loads(head), json.loads(index)
    text = change(header, idx, text)
    rest = b"\n".join([json.dumps(header).encode(), json.dumps(idx).encode(), text])
    path.write_bytes(b"%08x\n" % zlib.crc32(rest) + rest)


@pytest.mark.parametrize(
    "damage",
    [
        "garbage",
        "truncated",
        "a byte changed",
        "other version",
        "other manifest",
        "index unsorted",
        "rows moved",
        "a row misplaced",
    ],
)
def test_kept_rows_damaged(ws: ckpt.Workspace, run: Callable[..., Any], damage: str) -> None:
    task = make_task(ws, "T", n=5)
    ws.promote("T", 2, title="two")
    _settle(task)
    normal = run("list", "T", "--json", "--sort", "number").stdout_bytes
    assert run("list", "T", "--json").stdout_bytes == normal
    kept = task.folder / LIST_CACHE_FILE
    raw = kept.read_bytes()
    match damage:
        case "garbage":
            kept.write_bytes(b"\x00\xffnot rows")
        case "truncated":
            kept.write_bytes(raw[: len(raw) // 2])
        case "a byte changed":
            kept.write_bytes(raw.replace(b'"latest": false', b'"latest": true ', 1))
        case "other version":
            _rewrite_kept(kept, lambda h, i, t: (h.update(v=99), t)[1])
        case "other manifest":
            _rewrite_kept(kept, lambda h, i, t: (h["manifest"].update(size=10), t)[1])
        case "index unsorted":
            _rewrite_kept(kept, lambda h, i, t: (i["numbers"].reverse(), t)[1])
        case "rows moved":  # the index no longer says where the rows are
            _rewrite_kept(kept, lambda h, i, t: b" " + t)
        case "a row misplaced":  # checkpoint 3's row, which tells where the row of 2 (which gets a model) ends
            _rewrite_kept(kept, lambda h, i, t: (i["starts"].__setitem__(2, i["starts"][2] - 1), t)[1])
    assert run("list", "T", "--json").stdout_bytes == normal
    assert run("list", "T", "--json").stdout_bytes == normal  # and from the rows kept again


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


# --- the rendered rows of `ckpt tasks --json` ---------------------------------------------------------


def _plain_tasks(ws: ckpt.Workspace) -> bytes:
    """What `ckpt tasks --json` printed for a script before its rows were kept: every manifest read afresh."""
    for path in (ws.tasks_dir / SUMMARY_CACHE_FILE, *ws.tasks_dir.glob("*/" + CACHE_FILE)):
        path.unlink(missing_ok=True)
    rows, _ = ckpt.Workspace.open(ws.root).tasks()
    return (json.dumps([_render.task_json(r) for r in rows], ensure_ascii=False, allow_nan=False) + "\n").encode()


def _read_tasks(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A probe: the names of the tasks each later `ckpt tasks` had to summarise (not from its kept rows)."""
    calls: list[list[str]] = []
    summaries = FolderWorkspace._summaries

    def recording(self: FolderWorkspace, names: list[str], tasks: list[str]) -> Any:
        calls.append(list(names))
        return summaries(self, names, tasks)

    monkeypatch.setattr(FolderWorkspace, "_summaries", recording)
    return calls


def _odd_tasks(ws: ckpt.Workspace) -> None:
    """Tasks with odd metrics, none, a finished one, a broken manifest, and folders that are not tasks."""
    make_task(ws, "a", n=2)
    ws.create_task("empty")
    odd = ws.create_task("odd")
    odd.save(b"x", step=1, metrics={"nan": float("nan"), "inf": float("inf"), "ünï 名\u2028": 1e22, 'q"}, {"': 0.3})
    make_task(ws, "done", n=1).finish(failed=True)
    ws.create_task("broken").manifest.write_text("format = 1\nname = 'broken'\nstatus = 'bogus'\n")
    (ws.tasks_dir / "no-manifest" / "checkpoints").mkdir(parents=True)
    (ws.tasks_dir / "dangling").mkdir()
    (ws.tasks_dir / "dangling" / "task.toml").symlink_to(ws.root / "nowhere.toml")


def test_tasks_from_kept_rows_is_byte_for_byte_the_same(
    ws: ckpt.Workspace, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspace, "SETTLED_NS", 0)  # the manifests were just written: keep their rows all the same
    _odd_tasks(ws)
    first = run("tasks", "--json")  # renders every row, and keeps them
    assert first.exit_code == 0, first.output
    assert (ws.tasks_dir / TASK_ROWS_CACHE_FILE).exists()
    calls = _read_tasks(monkeypatch)
    kept = run("tasks", "--json")
    assert kept.exit_code == 0, kept.output
    assert calls == [["broken", "dangling"]]  # only the tasks that have no row to keep are read again
    assert kept.stdout_bytes == first.stdout_bytes == _plain_tasks(ws)
    assert kept.stderr == first.stderr
    assert kept.stderr.count("warning: skipped a task") == 2 and "'bogus'" in kept.stderr
    assert "'tasks/dangling/task.toml' is a symlink" in kept.stderr  # a link is reported, never followed
    rows = json.loads(kept.stdout)
    assert [r["name"] for r in rows] == ["a", "done", "empty", "odd"]
    assert rows[3]["latest_metrics"]["nan"] is None and rows[3]["latest_metrics"]["inf"] is None

    # changed after the rows were kept: an append, a rewrite, a new task, a removed one, a mended one
    ckpt.Workspace.open(ws.root).task("a").save(b"y" * 9, step=7, metrics={"loss": 0.5})
    ckpt.Workspace.open(ws.root).task("odd").finish(failed=True)
    make_task(ws, "new", n=1)
    (ws.tasks_dir / "done" / "task.toml").unlink()
    (ws.tasks_dir / "dangling" / "task.toml").unlink()
    ckpt.Workspace.open(ws.root).tasks_dir.joinpath("broken", "task.toml").write_text(
        "format = 1\nname = 'broken'\nstatus = 'running'\ncreated = '2026-01-01T00:00:00+00:00'\n"
    )
    calls.clear()
    after = run("tasks", "--json")
    assert after.exit_code == 0, after.output
    assert calls == [["a", "broken", "new", "odd"]]
    # folders left without a manifest are no tasks, and are said to be (see: ckpt doctor --recreate-manifests)
    assert sorted(after.stderr.splitlines()) == [
        f"warning: tasks/{name} has no task.toml, so it is no task; see: ckpt doctor"
        for name in ("dangling", "done", "no-manifest")
    ]
    again = run("tasks", "--json")
    assert calls == [["a", "broken", "new", "odd"]]  # none read: every row kept
    assert after.stdout_bytes == again.stdout_bytes == _plain_tasks(ws)
    assert [r["name"] for r in json.loads(again.stdout)] == ["a", "broken", "empty", "new", "odd"]
    assert json.loads(again.stdout)[0]["checkpoints"] == 3


def test_tasks_keep_rows_of_settled_manifests_only(
    ws: ckpt.Workspace, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_task(ws, "a", n=2)
    calls = _read_tasks(monkeypatch)
    assert run("tasks", "--json").exit_code == 0
    assert run("tasks", "--json").exit_code == 0
    assert calls == [["a"], ["a"]]  # changed within 2 s: a later change could keep its ctime, so nothing is kept
    monkeypatch.setattr(workspace, "SETTLED_NS", 0)
    assert run("tasks", "--json").exit_code == 0
    assert run("tasks", "--json").exit_code == 0
    assert calls[2:] == [["a"]]  # read once, then kept
    manifest = ws.tasks_dir / "a" / "task.toml"
    os.chmod(manifest, manifest.stat().st_mode)  # the same bytes, inode, size and mtime: only the ctime changes
    listed = run("tasks", "--json")
    assert calls[3:] == [["a"]]
    assert listed.stdout_bytes == _plain_tasks(ws)


@pytest.mark.parametrize("damage", ["delete", "garbage", "not-a-list", "wrong-types", "other-form", "other-version"])
def test_kept_task_rows_damaged(
    ws: ckpt.Workspace, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(workspace, "SETTLED_NS", 0)
    for name in ("a", "b"):
        make_task(ws, name, n=2)
    assert run("tasks", "--json").exit_code == 0
    path = ws.tasks_dir / TASK_ROWS_CACHE_FILE
    doc = json.loads(path.read_text())
    match damage:
        case "delete":
            path.unlink()
        case "garbage":
            path.write_bytes(b"\x00{garbage")
        case "not-a-list":
            doc["tasks"]["a"] = {"row": "x"}
        case "wrong-types":
            doc["tasks"]["a"][4] = 7
        case "other-form":
            doc["form"] = "ckpt 0.0, tasks rows 0"
        case "other-version":
            doc["v"] = 99
    if damage not in ("delete", "garbage"):
        path.write_text(json.dumps(doc))
    calls = _read_tasks(monkeypatch)
    listed = run("tasks", "--json")
    assert listed.exit_code == 0, listed.output
    assert calls == [["a"] if damage in ("not-a-list", "wrong-types") else ["a", "b"]]
    assert run("tasks", "--json").stdout_bytes == listed.stdout_bytes  # and from the rows kept again
    assert len(calls) == 1
    assert listed.stdout_bytes == _plain_tasks(ws)
