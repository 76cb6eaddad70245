"""A damaged workspace and a hostile environment (issue 15, points 5, 9, 10): a full disk during an append, a
closed stdout, values nested hundreds deep, ages past any date, file names that are not UTF-8, and imports
killed half-way. Each ends in one line and a workspace every command still reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckpt
import ckpt.trash
from ckpt import fsutil, placing
from ckpt.errors import WriteError
from ckpt.pathtext import escape_name, unescape_name

from .conftest import make_task

CKPT = [sys.executable, "-m", "ckpt"]


def _ckpt(ws: ckpt.Workspace, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
    """`ckpt ARGS` in a fresh process; stdout and stderr as bytes (a name may not be UTF-8)."""
    full = {**os.environ, "CKPT_WORKSPACE": str(ws.root), **(env or {})}
    return subprocess.run([*CKPT, *args], capture_output=True, env=full, timeout=120, **kw)


def _one_line(stderr: bytes) -> None:
    text = stderr.decode("utf-8", "replace")
    assert "Traceback" not in text and "internal error" not in text, text
    assert text.count("\n") == 1, text


# --- point 10: a closed stdout ----------------------------------------------------------------------


def _closed_stdout(ws: ckpt.Workspace, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`ckpt ARGS >&-`: the shell's closed descriptor 1, not a pipe."""
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    cmd = " ".join([*(f"'{a}'" for a in CKPT), *args])
    return subprocess.run(["sh", "-c", f"exec {cmd} >&-"], stderr=subprocess.PIPE, env=env, timeout=120)


def test_list_with_stdout_closed_is_exit_1_in_one_line(ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    res = _closed_stdout(ws, "list", "unet")
    assert res.returncode == 1
    _one_line(res.stderr)
    assert b"stdout was closed" in res.stderr


def test_trash_unused_with_stdout_closed_does_its_work_and_exits_1(ws: ckpt.Workspace) -> None:
    make_task(ws, n=4)
    res = _closed_stdout(ws, "trash-unused", "unet")
    assert res.returncode == 1
    text = res.stderr.decode()
    assert "internal error" not in text and "Traceback" not in text and "stdout was closed" in text
    assert sorted(ws.task("unet").state().checkpoints) == [4]  # the work was kept
    assert len(ckpt.trash.list_entries(ws)[0]) == 1


def test_no_file_ckpt_opens_becomes_stdout_or_stdin() -> None:
    """With descriptors 0 and 1 closed, the first files a command opened would be 0 and 1 (a manifest opened to
    append to would take the output); ckpt puts /dev/null there first."""
    code = (
        "import os, sys, typer, ckpt.cli as c\n"
        "def run(self, *args, **kwargs):\n"
        "    fd = os.open(os.devnull, os.O_RDONLY)\n"
        '    os.write(2, f\'{os.readlink("/proc/self/fd/0")} {os.readlink("/proc/self/fd/1")} {fd}\\n\'.encode())\n'
        "    raise SystemExit(0)\n"
        "typer.Typer.__call__ = run\n"
        "sys.argv = ['ckpt', 'tasks']\n"
        "c.main()\n"
    )
    res = subprocess.run(["sh", "-c", f"exec '{sys.executable}' -c \"$0\" >&- <&-", code], stderr=subprocess.PIPE)
    lines = res.stderr.decode().splitlines()
    assert lines[0] == "/dev/null /dev/null 3", res.stderr
    assert res.returncode == 1 and "stdout was closed" in lines[1]


# --- point 10: values nested hundreds deep ----------------------------------------------------------


@pytest.mark.parametrize("command", [["trash-unused", "unet"], ["finish", "unet"], ["list", "unet"], ["doctor"]])
def test_a_300_deep_array_in_ckpt_toml_is_exit_6(ws: ckpt.Workspace, command: list[str]) -> None:
    make_task(ws, n=3)
    path = ws.root / "ckpt.toml"
    path.write_text(path.read_text() + "deep = " + "[" * 300 + "]" * 300 + "\n")
    res = _ckpt(ws, *command)
    assert res.returncode == 6
    _one_line(res.stderr)
    assert b"nests more than" in res.stderr


@pytest.mark.parametrize("command", [["trash-unused", "unet"], ["finish", "unet"]])
def test_a_300_deep_setting_in_a_task_manifest_is_exit_6_not_a_recursion_error(
    ws: ckpt.Workspace, command: list[str], run: Callable[..., Any]
) -> None:
    """The array parses, but writing the manifest back recursed past Python's limit ("internal error")."""
    task = ws.create_task("unet", settings={"x": 1})
    for i in range(3):
        task.save(os.urandom(10), step=i)
    text = task.manifest.read_text().replace("x = 1", "x = " + "[" * 300 + "]" * 300)
    task.manifest.write_text(text)
    before = task.manifest.read_bytes()
    res = run(*command)
    assert res.exit_code == 6, res.output
    assert "nests more than 32 levels" in res.stderr and res.stderr.count("\n") == 1
    assert task.manifest.read_bytes() == before


def test_a_value_too_deep_to_write_is_refused_before_anything_is_written(ws: ckpt.Workspace) -> None:
    deep: Any = 1
    for _ in range(1200):
        deep = [deep]
    with pytest.raises(ckpt.ManifestError, match="nests too deeply"):
        ws.create_task("unet", settings={"x": deep})
    assert not (ws.tasks_dir / "unet" / "task.toml").exists()


# --- point 10: an age past any date -------------------------------------------------------------------


@pytest.mark.parametrize("age", ["99999999999w", "9999999w", "1" + "0" * 400 + "s"])
def test_an_age_too_large_for_a_date_is_a_usage_error(ws: ckpt.Workspace, run: Callable[..., Any], age: str) -> None:
    res = run("trash", "empty", "--older-than", age, "--yes")
    assert res.exit_code == 2, res.output
    assert "age" in res.stderr and res.stderr.count("\n") == 1


def test_an_age_of_a_century_is_accepted(ws: ckpt.Workspace, run: Callable[..., Any]) -> None:
    make_task(ws, n=3)
    assert run("trash-unused", "unet").exit_code == 0
    res = run("trash", "empty", "--older-than", "5200w", "--yes", "--json")
    assert res.exit_code == 0, res.output
    assert len(ckpt.trash.list_entries(ws)[0]) == 1  # nothing is a century old


# --- point 9: a failed append is rolled back ------------------------------------------------------


def _failing_write(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """os.write (as fsutil calls it) to a task manifest writes `after` bytes, then the disk is full (ENOSPC)."""
    real = os.write
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("/task.toml"):
            return real(fd, data)
        calls["n"] += 1
        if calls["n"] == 1 and after:
            return real(fd, bytes(data)[:after])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "write", write)


@pytest.mark.parametrize("after", [0, 7])
def test_a_save_that_meets_a_full_disk_leaves_the_manifest_as_it_was(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any], after: int
) -> None:
    task = make_task(ws, n=2)
    before = task.manifest.read_bytes()
    with monkeypatch.context() as m:
        _failing_write(m, after)
        with pytest.raises(WriteError, match="No space left on device; it is as it was before") as info:
            task.save(b"more bytes", step=3)
    assert info.value.errno == 28 and isinstance(info.value, OSError)
    assert task.manifest.read_bytes() == before
    assert sorted(os.listdir(task.folder / "checkpoints")) == ["000001.pt", "000002.pt"]  # no file left unnamed
    # every command works at once, without doctor, and the next save takes the next number
    assert run("list", "unet").exit_code == 0
    assert run("verify").exit_code == 0
    assert task.save(b"more bytes", step=3) == 3


def test_an_import_that_meets_a_full_disk_leaves_the_manifest_as_it_was(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any], tmp_path: Path
) -> None:
    make_task(ws, name="imp", n=1)
    manifest = ws.task("imp").manifest
    before = manifest.read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"model_{i}.pt").write_bytes(os.urandom(50))
    appended: list[bytes] = []
    real_append = fsutil.append_durably

    def append(path: Path, data: bytes) -> None:  # what the manifest was just before the append
        appended.append(path.read_bytes())
        real_append(path, data)

    with monkeypatch.context() as m:
        _failing_write(m, 30)
        m.setattr(fsutil, "append_durably", append)
        res = run("import", str(src), "--task", "imp", "--move")
    assert res.exit_code == 1, res.output
    assert "No space left on device" in res.stderr and res.stderr.count("\n") == 1
    assert len(appended) == 1 and manifest.read_bytes() == appended[0]
    assert manifest.read_bytes().count(b"[[checkpoints]]") == before.count(b"[[checkpoints]]")
    assert sorted(os.listdir(src)) == ["model_0.pt", "model_1.pt", "model_2.pt"]  # moved back
    assert run("verify").exit_code == 0
    res = run("import", str(src), "--task", "imp", "--move", "--json")
    assert res.exit_code == 0, res.output
    assert sorted(ws.task("imp").state().checkpoints) == [1, 2, 3, 4] and os.listdir(src) == []


# --- point 10: file names that are not UTF-8 ------------------------------------------------------


@given(st.binary(min_size=1, max_size=12))
def test_the_name_escape_round_trips_and_is_utf8(raw: bytes) -> None:
    name = os.fsdecode(raw)
    text = escape_name(name)
    text.encode("utf-8")  # never raises
    assert os.fsencode(unescape_name(text)) == raw
    if raw.isascii() and b"\\udc" not in raw:
        assert text == name  # an ordinary name is written as it is


def test_the_escape_of_the_escape_itself() -> None:
    assert escape_name(os.fsdecode(b"w\xff.pt")) == "w\\udcff.pt"
    assert escape_name("a\\udcff.pt") == "a\\udc5cudcff.pt"  # a real name holding the text of an escape
    assert escape_name("a\\b\\udc41.pt") == "a\\b\\udc41.pt"  # not an escape ckpt writes: as it is
    assert unescape_name("a\\udc5cudcff.pt") == "a\\udcff.pt"


@pytest.fixture
def odd_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"w\xff.pt")).write_bytes(b"bytes of w")
    (src / "ok.pt").write_bytes(b"bytes of ok")
    return src


@pytest.mark.parametrize("mode", ["--link", "--copy", "--move"])
def test_import_of_a_name_that_is_not_utf8(ws: ckpt.Workspace, odd_source: Path, mode: str) -> None:
    res = _ckpt(ws, "import", str(odd_source), "--task", "odd", mode, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["checkpoints"]
    assert sorted(r["original_name"] for r in rows) == ["ok.pt", "w\\udcff.pt"]
    assert any(r["source"].endswith("/src/w\\udcff.pt") for r in rows)
    manifest = ws.task("odd").manifest.read_bytes()
    manifest.decode("utf-8")
    assert b'original_name = "w\\\\udcff.pt"' in manifest
    names = {cp.original_name for cp in ws.task("odd").checkpoints}
    assert {os.fsencode(unescape_name(n)) for n in names if n} == {b"w\xff.pt", b"ok.pt"}
    assert _ckpt(ws, "verify").returncode == 0
    res = _ckpt(ws, "import", str(odd_source), "--task", "odd", "--json")  # again: nothing new
    if mode != "--move":
        assert {r["action"] for r in json.loads(res.stdout)["checkpoints"]} == {"already"}


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_scan_verify_doctor_with_a_name_that_is_not_utf8(ws: ckpt.Workspace, encoding: str) -> None:
    task = make_task(ws, n=2)
    (task.folder / os.fsdecode(b"v\xfe.pt")).write_bytes(b"a file the script wrote")
    env = {"PYTHONIOENCODING": encoding}
    for args, code in [(["scan", "unet"], 0), (["verify"], 6), (["doctor"], 0), (["doctor", "--dry-run"], 0)]:
        for fmt in ([], ["--json"]):
            res = _ckpt(ws, *args, *fmt, env=env)
            assert res.returncode == code, res.stderr
            assert b"Traceback" not in res.stderr and b"internal error" not in res.stderr
            assert b"tasks/unet/v\\udcfe.pt" in res.stdout.replace(b"\\\\", b"\\")
            if fmt:
                json.loads(res.stdout)
    res = _ckpt(ws, "scan", "unet", "--add", "--json", env=env)
    assert res.returncode == 0, res.stderr
    cp = ws.task("unet").checkpoints[-1]
    assert cp.number == 3 and cp.original_name == "v\\udcfe.pt"
    assert _ckpt(ws, "verify", env=env).returncode == 0


def test_a_failed_import_leaves_no_empty_task_behind(
    ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any], odd_source: Path
) -> None:
    with monkeypatch.context() as m:
        _failing_write(m, 0)
        res = run("import", str(odd_source), "--task", "fresh")
    assert res.exit_code == 1, res.output
    assert ws.task_names() == [] and not (ws.tasks_dir / "fresh").exists()
    assert sorted(os.listdir(odd_source)) == sorted(["ok.pt", os.fsdecode(b"w\xff.pt")])


# --- point 5: an import killed at any step --------------------------------------------------------

_STEPS = ("move_noreplace", "link_new", "copy_new", "append_durably", "fsync_dir", "remove_tree", "remove_file")
_PLACING = ("link_new", "copy_new")  # steps of ckpt.placing; the rest are ckpt.fsutil's


def _killed_at(k: int, work: Callable[[], object], steps: tuple[str, ...] = _STEPS) -> bool:
    """Run `work` in a forked child that is killed (os._exit, no cleanup) just before its k-th file-system
    step (a call of one of fsutil's or placing's `steps`); whether it was killed (False: it finished first)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            count = [0]
            for name in steps:
                home = placing if name in _PLACING else fsutil
                real = getattr(home, name)

                def step(*a: Any, _real: Any = real, **kw: Any) -> Any:
                    count[0] += 1
                    if count[0] == k:
                        os._exit(77)
                    return _real(*a, **kw)

                setattr(home, name, step)
            work()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 77), f"the import failed at step {k} (exit {code})"
    return code == 77


def _source(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "src"
    files = {"a_1.pt": b"one", "b_2.pt": b"two", "sub/c_3.pt": b"three", "sub/d_4.pt": b"four"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src, files


def _hidden(task: ckpt.Task) -> list[str]:
    own = {".lock", ".task.cache.json", ".task.list.cache"}
    names = [n for n in os.listdir(task.folder) if n.startswith(".") and n not in own]
    return names + [f"checkpoints/{n}" for n in os.listdir(task.folder / "checkpoints") if n.startswith(".")]


def _where(ws_root: Path, name: str, src: Path, files: dict[str, bytes]) -> dict[str, list[str]]:
    """For each source file: where its bytes are ("source", "record N" of task `name`)."""
    task = ckpt.Workspace.open(ws_root).task(name)
    recorded: dict[str, list[int]] = {}
    for cp in task.state().checkpoints.values():
        if cp.original_name is not None:
            recorded.setdefault(cp.original_name, []).append(cp.number)
    out: dict[str, list[str]] = {}
    for rel, data in files.items():
        places = []
        if (src / rel).is_file():
            assert (src / rel).read_bytes() == data
            places.append("source")
        for n in recorded.get(rel, []):
            assert task.path_of(task.checkpoint(n)).read_bytes() == data
            places.append(f"record {n}")
        out[rel] = places
    return out


@pytest.mark.parametrize("mode", ["move", "copy"])
def test_an_import_killed_at_any_step_loses_and_hides_nothing(
    tmp_path: Path, ws: ckpt.Workspace, mode: str, run: Callable[..., Any]
) -> None:
    from ckpt.doctor import doctor
    from ckpt.importer import import_path

    root = ws.root
    kills = 0
    for k in range(1, 200):
        name = f"imp{k}"
        make_task(ckpt.Workspace.open(root), name=name, n=1)  # numbering goes on from 1
        src, files = _source(tmp_path / name)
        if not _killed_at(
            k, lambda src=src, name=name: import_path(ckpt.Workspace.open(root), src, task=name, mode=mode)
        ):
            break
        kills += 1
        task = ckpt.Workspace.open(root).task(name)
        # right after the kill: each file is in the source, recorded, or named by the marker of the import
        markers = [n for n in os.listdir(task.folder) if n.startswith(".importing-")]
        places = _where(root, name, src, files)
        assert markers or all(places.values()), (k, places)
        if k % 2:
            repairs = doctor(ckpt.Workspace.open(root))  # doctor puts back what the kill left
            assert not [r for r in repairs if r.action.startswith("left alone") and ".import" in r.path], repairs
        else:
            with task.lock():  # so does the next command that changes the task
                pass
        task = ckpt.Workspace.open(root).task(name)
        assert _hidden(task) == [], k
        places = _where(root, name, src, files)
        for rel, where in places.items():
            assert where, (k, rel, places)
            if mode == "move":
                assert len(where) == 1, (k, rel, places)  # in the source or recorded, never both
        if mode == "move":
            assert run("verify", name).exit_code == 0, k  # no file without a record is left behind
        # and the import, run again, ends with every file recorded once
        if any(where == ["source"] for where in places.values()):
            import_path(ckpt.Workspace.open(root), src, task=name, mode=mode)
        places = _where(root, name, src, files)
        for where in places.values():
            records = [p for p in where if p.startswith("record")]
            assert len(records) == 1 and len(where) == (1 if mode == "move" else 2), (k, places)
    assert kills >= 10, kills  # every step of the import was tried
    print(f"{mode}: killed at {kills} steps")


def test_doctor_says_what_a_killed_import_left_then_puts_it_back(
    tmp_path: Path, ws: ckpt.Workspace, run: Callable[..., Any]
) -> None:
    from ckpt.importer import import_path

    make_task(ws, name="imp", n=1)
    src, files = _source(tmp_path)
    # killed before its third rename: two files staged
    work = lambda: import_path(ckpt.Workspace.open(ws.root), src, task="imp", mode="move")  # noqa: E731
    assert _killed_at(3, work, steps=("move_noreplace",))
    assert sorted(p.name for p in src.rglob("*.pt")) == ["c_3.pt", "d_4.pt"]
    task_folder = ws.root / "tasks/imp"
    assert len(list(task_folder.glob(".importing-*"))) == 1
    res = run("doctor", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    actions = [r["action"] for r in json.loads(res.stdout)["repairs"]]
    assert sum(a.startswith("would move it back to ") for a in actions) == 2, actions
    assert sorted(p.name for p in src.rglob("*.pt")) == ["c_3.pt", "d_4.pt"]  # a dry run changes nothing
    res = run("doctor", "--json")
    repairs = json.loads(res.stdout)["repairs"]
    back = [r for r in repairs if r["action"].startswith("moved it back to ")]
    assert len(back) == 2 and all(r["path"].startswith("tasks/imp/checkpoints/.import-") for r in back), repairs
    assert _where(ws.root, "imp", src, files) == {rel: ["source"] for rel in files}
    assert not list(task_folder.glob(".importing-*"))
    assert json.loads(run("doctor", "--json").stdout)["repairs"] == []


def test_a_read_only_command_puts_back_what_a_killed_import_left(tmp_path: Path, ws: ckpt.Workspace) -> None:
    from ckpt.importer import import_path

    make_task(ws, name="imp", n=1)
    src, files = _source(tmp_path)
    work = lambda: import_path(ckpt.Workspace.open(ws.root), src, task="imp", mode="move")  # noqa: E731
    assert _killed_at(2, work, steps=("move_noreplace",))  # one file staged
    assert _ckpt(ws, "list", "imp").returncode == 0
    assert _where(ws.root, "imp", src, files) == {rel: ["source"] for rel in files}


def test_a_running_import_is_left_alone(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """A marker whose import still holds it is not recovered, by a lock or by doctor."""
    from ckpt.doctor import doctor
    from ckpt.staging import Marker, StagedItem

    task = make_task(ws, name="imp", n=1)
    staged = task.folder / "checkpoints" / ".import-0123456789ab"
    staged.write_bytes(b"being copied")
    marker = Marker.write(task.folder, [StagedItem(staged.name, tmp_path / "x.pt", False)])
    try:
        with task.lock():
            pass
        assert not [r for r in doctor(ws) if ".import" in r.path]
        assert staged.exists() and marker.path.exists()
    finally:
        marker.done(keep=True)  # let go, not removed: as the kernel does for a killed import
    with task.lock():  # nobody holds it now: the staged copy goes
        pass
    assert not staged.exists()


def test_doctor_reports_a_staging_leftover_no_marker_names(ws: ckpt.Workspace, run_json: Any) -> None:
    task = make_task(ws, name="imp", n=1)
    (task.folder / "checkpoints" / ".import-a1b2c3d4e5f6").write_bytes(b"an older ckpt's kill")
    repairs = run_json("doctor")["repairs"]
    assert [r["path"] for r in repairs] == ["tasks/imp/checkpoints/.import-a1b2c3d4e5f6"]
    assert repairs[0]["action"].startswith("left alone: it may be the only copy")
    assert (task.folder / "checkpoints" / ".import-a1b2c3d4e5f6").exists()


def test_a_killed_import_of_trainer_folders_puts_each_folder_back(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """A folder checkpoint is moved by one rename; put back by its inode, like a file."""
    from ckpt.doctor import doctor
    from ckpt.importer import import_path

    out = tmp_path / "hf"
    tree = {}
    for step in (10, 20, 30):
        for rel, data in {"model.safetensors": os.urandom(40), "trainer_state.json": b"{}"}.items():
            (out / f"checkpoint-{step}" / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / f"checkpoint-{step}" / rel).write_bytes(data)
            tree[f"checkpoint-{step}/{rel}"] = data
    kills = 0
    for k in range(1, 40):
        if not _killed_at(k, lambda: import_path(ckpt.Workspace.open(ws.root), out, task="hf", mode="move")):
            break
        kills += 1
        doctor(ckpt.Workspace.open(ws.root))
        task = ckpt.Workspace.open(ws.root).task("hf")
        assert _hidden(task) == []
        recorded = {cp.original_name: task.path_of(cp) for cp in task.state().checkpoints.values()}
        for rel, data in tree.items():
            folder, name = rel.split("/")
            path = recorded[folder] / name if folder in recorded else out / rel
            assert path.read_bytes() == data, (k, rel)
            assert (folder in recorded) != (out / rel).exists(), (k, rel)
        if recorded:
            break  # committed: later steps only clean up
    assert kills >= 4


def test_a_staged_copy_whose_source_is_gone_goes_to_the_source_name(tmp_path: Path, ws: ckpt.Workspace) -> None:
    """Recovery deletes a staged copy only while its source is still there: never the only copy."""
    from ckpt.staging import Marker, StagedItem

    task = make_task(ws, name="imp", n=1)
    staged = task.folder / "checkpoints" / ".import-0123456789ab"
    staged.write_bytes(b"the only copy left")
    source = tmp_path / "gone" / "w.pt"
    Marker.write(task.folder, [StagedItem(staged.name, source, False)]).done(keep=True)
    with task.lock():
        pass
    assert source.read_bytes() == b"the only copy left" and not staged.exists()
    assert not list(task.folder.glob(".importing-*"))


def test_a_folder_copy_that_fails_half_way_leaves_nothing_staged(
    tmp_path: Path, ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any]
) -> None:
    out = tmp_path / "hf"
    for rel in ("checkpoint-10/model.safetensors", "checkpoint-10/optimizer.pt", "checkpoint-10/z.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(os.urandom(30))
    make_task(ws, name="hf", n=1)
    real = placing.place_new
    calls = {"n": 0}

    def place_new(src: Path, dst: Path, mode: str) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, mode)

    monkeypatch.setattr(placing, "place_new", place_new)
    res = run("import", str(out), "--task", "hf", "--copy")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    task = ws.task("hf")
    assert _hidden(task) == [] and sorted(task.state().checkpoints) == [1]
