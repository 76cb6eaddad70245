"""Folder workspaces under injected faults: the walk of tests/test_faults.py, on a sample of the calls.

A fault strikes one call of the file-system primitives ckpt uses: the functions of ckpt.fsutil, ckpt.placing
and ckpt.locks that write, rename, link, delete or lock, and the `os` calls that change something (replace,
rename, unlink, link, mkdir, rmdir, fsync, write, ftruncate) made by any ckpt module, fsutil included. It
either fails (OSError: ENOSPC or EIO) before the call, or kills the process (`Killed`, not an Exception)
before or after it: a dead process makes no more of these calls, so no cleanup of its own reaches the disk,
and its locks are dropped (as the kernel drops a dead process's flocks) when the next "process" starts. Then
the command runs again (at once, or once every file is two hours old), then `ckpt doctor`, and
tests/faultcheck.py checks the same invariant as on the memory store.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import importlib
import json
import os
import pkgutil
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import pytest

import ckpt
from ckpt import fsutil, locks, placing
from ckpt.doctor import doctor
from ckpt.errors import BusyError, CkptError
from ckpt.importer import import_path, scan
from ckpt.models import finish, promote, rename
from ckpt.storage.memory import Killed
from ckpt.trash import empty, list_entries, plan_empty, restore, trash_unused
from ckpt.trash_models import trash_model

from . import faultcheck

# imported now: the walk replaces `os` in every ckpt module loaded (all but the CLI and what imports torch)
_SKIP = ("ckpt.__main__", "ckpt.cli", "ckpt.integrations", "ckpt.preview", "ckpt.plot", "ckpt.demo", "ckpt.inference")
for _mod in pkgutil.walk_packages(ckpt.__path__, "ckpt."):
    if not _mod.name.startswith((*_SKIP, "ckpt.network", "ckpt.zoo")):
        importlib.import_module(_mod.name)

KINDS = ("fail", "interrupt", "kill_before", "kill_after")
FSUTIL_STEPS = (
    "atomic_write",
    "atomic_write_nosync",
    "append_durably",
    "make_dir_new",
    "make_dirs",
    "make_dirs_durably",
    "make_file_new",
    "move_noreplace",
    "remove_empty_dirs",
    "remove_file",
    "remove_tree",
    "rename_in",
    "temp_path",
    "write_new_file",
)
PLACING_STEPS = ("copy_new", "link_new", "place_new", "place_tree_new", "reflink_new")
OS_CALLS = ("replace", "rename", "unlink", "remove", "link", "mkdir", "rmdir", "fsync", "write", "ftruncate")
SAMPLE = 16  # faults tried per operation (of calls x KINDS)


class _Os:
    """`os` as ckpt's modules see it during a walk: the calls in OS_CALLS go through the injector."""

    def __init__(self, wrapped: dict[str, Callable[..., Any]]):
        self.__dict__.update(wrapped)
        for name in ("supports_dir_fd", "supports_fd", "supports_follow_symlinks"):
            real = getattr(os, name)
            self.__dict__[name] = real | {w for n, w in wrapped.items() if getattr(os, n) in real}

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


FAULTS: list[Faults] = []  # the walk's injector, for a setup that interrupts a command


class Faults:
    """Counts the primitive calls ckpt makes while `active`, and strikes the `at`-th with `kind`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.active = False
        self.calls: list[str] = []
        self.at = 0
        self.kind = ""
        self.method: str | None = None
        self.dead = False
        self.struck: str | None = None
        self.locks: list[Any] = []  # every lock taken: those a killed process held are dropped at revive
        self.root = Path("/nonexistent")  # the files of the run: its descriptors there are closed at revive
        FAULTS[:] = [self]
        for name in FSUTIL_STEPS:
            monkeypatch.setattr(fsutil, name, self._wrap(name, getattr(fsutil, name)))
        for name in PLACING_STEPS:
            monkeypatch.setattr(placing, name, self._wrap(name, getattr(placing, name)))
        monkeypatch.setattr(locks, "locked", self._locked(locks.locked))
        acquire = filelock.FileLock.acquire

        def acquired(lock: Any, *args: Any, **kwargs: Any) -> Any:
            self.locks.append(lock)
            return acquire(lock, *args, **kwargs)

        monkeypatch.setattr(filelock.FileLock, "acquire", acquired)
        proxy = _Os({name: self._wrap(f"os.{name}", getattr(os, name)) for name in OS_CALLS})
        for modname, mod in list(sys.modules.items()):
            if modname.startswith("ckpt.") and getattr(mod, "os", None) is os:
                monkeypatch.setattr(mod, "os", proxy)

    def start(self, at: int = 0, kind: str = "", method: str | None = None) -> None:
        """Count from here; strike the `at`-th call (of those named `method` when given) with `kind`."""
        self.calls, self.at, self.kind, self.method, self.struck, self.active = [], at, kind, method, None, True

    def revive(self) -> None:
        """The next process: nothing is struck any more, the dead one's locks are gone."""
        self.active = False
        for lock in self.locks:
            if lock.is_locked and self.dead:
                lock.release(force=True)
        self.locks.clear()
        if self.dead:  # what it left open (an import's flocked marker) is closed, as the kernel closes it
            gc.collect()  # first, the objects of its frames close what they own
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{self.root}/"):
                        os.close(int(fd))
        self.dead = False

    def _hit(self, name: str) -> str | None:
        """Count a call; raise for a fault before it; the kind to raise after it, if any."""
        if not self.active:
            return None
        if self.dead:
            raise Killed(f"{name}: the process is dead")
        self.calls.append(name)
        count = len(self.calls) if self.method is None else self.calls.count(self.method)
        if count != self.at or self.method not in (None, name) or self.struck is not None:
            return None
        self.struck = f"{self.kind} at {name}"
        if self.kind == "fail":
            code = errno.ENOSPC if self.at % 2 else errno.EIO
            raise OSError(code, f"{os.strerror(code)} (injected at {name})")
        if self.kind == "kill_before":
            self.dead = True
            raise Killed(f"{name}: killed before")
        return self.kind

    def _after(self, name: str) -> None:
        self.dead = True
        raise Killed(f"{name}: killed after")

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            after = self._hit(name)
            result = fn(*args, **kwargs)
            if after == "kill_after":
                self._after(name)
            if after == "interrupt":  # Ctrl-C or SIGTERM right after it: the process lives on, its cleanup runs
                raise KeyboardInterrupt(f"interrupted after {name}")
            return result

        return call

    def _locked(self, real: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def locked(*args: Any, **kwargs: Any) -> Iterator[None]:
            after = self._hit("locked")
            with real(*args, **kwargs):
                if after == "kill_after":
                    self._after("locked")
                yield

        return locked


# --- the workspace as files ------------------------------------------------------------------------------


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, by '/'-separated key (symlinks are not the workspace's)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree keeping its hard links (a model and its checkpoint stay one inode) and its mtimes."""
    inodes: dict[tuple[int, int], Path] = {}
    for dirpath, _, names in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            s = Path(dirpath) / name
            st = s.lstat()
            key = (st.st_dev, st.st_ino)
            if key in inodes and st.st_nlink > 1:
                os.link(inodes[key], dst / rel / name)
            else:
                shutil.copy2(s, dst / rel / name, follow_symlinks=False)
                inodes[key] = dst / rel / name


def later(root: Path) -> None:
    """Time moves on: every file and folder under `root` is two hours old (past every staleness limit)."""
    old = os.stat(root).st_mtime - 7200
    for dirpath, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            os.utime(Path(dirpath) / name, (old, old), follow_symlinks=False)


# --- the operations ---------------------------------------------------------------------------------------


def seeded(root: Path, n: int = 4) -> ckpt.Workspace:
    ws = ckpt.Workspace.init(root / "ws")
    task = ws.create_task("unet")
    for i in range(n):
        task.save(f"weights {i}".encode(), step=i, metrics={"val_iou": i / 10})
    return ckpt.Workspace.open(root / "ws")


def setup_plain(root: Path) -> dict[str, Any]:
    seeded(root)
    return {}


def setup_model(root: Path) -> dict[str, Any]:
    promote(seeded(root), "unet", 2, title="m1")
    return {}


def setup_trashed(root: Path) -> dict[str, Any]:
    entry = trash_unused(seeded(root), "unet").entry
    assert entry
    return {"entry": entry}


def setup_removed(root: Path) -> dict[str, Any]:
    ws = seeded(root)
    promote(ws, "unet", 2, title="m1")
    return {"entry": trash_model(ckpt.Workspace.open(root / "ws"), "m1").entry}


def setup_stray(root: Path) -> dict[str, Any]:
    seeded(root)
    (root / "ws/tasks/unet/step=50.pt").write_bytes(b"a stray file")  # a file a script wrote into the task folder
    return {}


def setup_import(root: Path) -> dict[str, Any]:
    seeded(root)
    src = root / "run"
    src.mkdir()
    for epoch in range(2):
        (src / f"epoch={epoch}-step={epoch * 10 + 10}.ckpt").write_bytes(f"lightning {epoch}".encode())
    return {}


def run_import(ws: ckpt.Workspace, root: Path, ctx: dict[str, Any]) -> Any:
    return import_path(ws, root / "run", task="lit", mode="move")


def setup_interrupted(root: Path) -> dict[str, Any]:
    """A promote killed after linking its weights, then a trash-unused killed after moving its second file."""
    seeded(root)
    faults = FAULTS[-1]
    for kind, method, command in [
        ("kill_after", "os.link", lambda ws: promote(ws, "unet", 4, title="half")),
        ("kill_after", "os.rename", lambda ws: trash_unused(ws, "unet")),
    ]:
        faults.root = root
        faults.start(2 if method == "os.rename" else 1, kind, method)
        with pytest.raises(Killed):
            command(ckpt.Workspace.open(root / "ws"))
        faults.revive()
    return {}


OPERATIONS: dict[str, tuple[Callable[[Path], dict[str, Any]], Callable[[ckpt.Workspace, Path, dict[str, Any]], Any]]]
OPERATIONS = {
    "save": (setup_plain, lambda ws, root, ctx: ws.task("unet").save(b"the new one", step=99)),
    "promote": (setup_plain, lambda ws, root, ctx: promote(ws, "unet", 3, title="best")),
    "finish": (setup_plain, lambda ws, root, ctx: finish(ws, "unet")),
    "rename": (setup_model, lambda ws, root, ctx: rename(ws, "m1", "m2")),
    "models_remove": (setup_model, lambda ws, root, ctx: trash_model(ws, "m1")),
    "trash_unused": (setup_plain, lambda ws, root, ctx: trash_unused(ws, "unet")),
    "restore": (setup_trashed, lambda ws, root, ctx: restore(ws, ctx["entry"])),
    "restore_model": (setup_removed, lambda ws, root, ctx: restore(ws, ctx["entry"])),
    "empty": (setup_trashed, lambda ws, root, ctx: empty(ws, plan_empty(ws))),
    "import": (setup_import, run_import),
    "scan_add": (setup_stray, lambda ws, root, ctx: scan(ws, "unet", add=True)),
    "doctor": (setup_interrupted, lambda ws, root, ctx: doctor(ws)),
}


class Walk:
    """One operation's fault trials, each on a fresh copy of the same workspace."""

    def __init__(self, op: str, tmp: Path, faults: Faults):
        self.op, self.tmp, self.faults = op, tmp, faults
        self.template = tmp / "template"
        self.ctx = OPERATIONS[op][0](self.template)
        self.trials = 0

    def attempt(self, root: Path) -> tuple[bool, Any]:
        """(whether it returned, its result) of the operation in a new process; a CkptError, an OSError or a
        kill is a failure."""
        try:
            return True, OPERATIONS[self.op][1](ckpt.Workspace.open(root / "ws"), root, self.ctx)
        except BusyError as e:  # one process at a time here: a lock still held is one a fault left behind
            raise AssertionError(f"a lock was left held: {e}") from None
        except (CkptError, OSError, Killed, KeyboardInterrupt):
            return False, None

    def check(self, root: Path, before: dict[str, Any], settled: bool, doctored: bool) -> None:
        """The invariant; after a re-run that failed (not `settled`), a checkpoint or model may also be in no
        place yet (in an entry doctor finishes), never in two; until doctor ran, what an import or scan --add
        takes in may still be staged (doctor puts it back)."""
        objs = files(root / "ws")
        faultcheck.check(
            objs,
            before,
            may_go=set(before["where"]) if self.op == "empty" or not settled else set(),
            new=faultcheck.expected_new(self.op),
            models_move=self.op in ("rename", "empty") or not settled,
        )
        if self.op in ("import", "scan_add"):  # the files it takes in are never lost
            where = faultcheck.picture(objs)["where"]
            task = "lit" if self.op == "import" else "unet"
            found = {h for h, places in where.items() if places == [f"task:{task}"]}
            if doctored:  # recorded, or back where they were
                found |= {sha256(data) for data in files(root / "run").values()} if self.op == "import" else set()
                found |= {sha256(objs[k]) for k in ["tasks/unet/step=50.pt"] if k in objs}
            else:  # anywhere (a killed import's staged files are put back by doctor)
                found |= {sha256(data) for data in files(root).values()}
            assert found >= faultcheck.expected_new(self.op), "a file it takes in is lost"

    def one(self, at: int, kind: str, at_once: bool) -> int:
        """Run the operation with a fault at call `at` (0: none), then again as a new process, then doctor;
        check the invariant after each. The number of calls the first run made."""
        self.trials += 1
        root = self.tmp / f"t{self.trials}"
        copy_tree(self.template, root)
        before = faultcheck.picture(files(root / "ws"))
        self.faults.root = root
        self.faults.start(at, kind)
        try:
            ok, result = self.attempt(root)
        finally:
            calls = len(self.faults.calls)
            self.faults.revive()
        if ok:
            faultcheck.done_as_reported(files(root / "ws"), self.op, result, self.ctx)
        if not at_once:
            later(root)
        if self.op != "save":  # a save run again is another checkpoint
            ok, result = self.attempt(root)
            self.check(root, before, settled=ok, doctored=False)
            if ok:
                faultcheck.done_as_reported(files(root / "ws"), self.op, result, self.ctx)
        later(root)
        doctor(ckpt.Workspace.open(root / "ws"))
        self.check(root, before, settled=True, doctored=True)
        ws = ckpt.Workspace.open(root / "ws")
        left = [r for r in doctor(ws) if (self.op, r.problem.split(" ")[:5]) not in LEFT_TO_THE_USER]
        assert left == [], "doctor left something to do"
        assert faultcheck.left_half_done(files(root / "ws")) == []
        assert list_entries(ws)[1] == []  # readable: every entry, every task, every model
        for name in ws.task_names():
            ws.task(name).checkpoints  # noqa: B018
        assert ws.models.read_all()[1] == []
        shutil.rmtree(root)
        return calls


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# What doctor reports and leaves to the user after some faults (see the tests at the end):
LEFT_TO_THE_USER = [
    ("save", ["a", "file", "no", "record", "of"]),  # a save killed between its rename and its record
    ("scan_add", ["a", "file", "no", "record", "of"]),  # the same in scan --add
    ("import", ["a", "task", "folder", "without", "its"]),  # a task creation that failed before its manifest
]


def sample(op: str, calls: int, size: int = SAMPLE) -> list[tuple[int, str, bool]]:
    """A deterministic sample of (call, kind, run again at once) for `op`, spread over its calls."""
    rng = random.Random(op)
    pairs = [(at, kind) for at in range(1, calls + 1) for kind in KINDS]
    picked = sorted(rng.sample(pairs, min(size, len(pairs))))
    return [(at, kind, rng.random() < 0.5) for at, kind in picked]


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_a_sample_of_faults_at_the_calls_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    monkeypatch.setenv("CKPT_LOCK_TIMEOUT", "1")  # a lock left held is found at once (and said: see Walk.attempt)
    faults = Faults(monkeypatch)
    walk = Walk(op, tmp_path, faults)
    calls = walk.one(0, "", at_once=True)
    assert calls > 0
    struck = 0
    for at, kind, at_once in sample(op, calls):
        try:
            walk.one(at, kind, at_once)
        except AssertionError as e:
            raise AssertionError(f"{op}: fault {kind!r} at call {at} of {calls} ({faults.struck}): {e}") from None
        struck += faults.struck is not None
    assert struck == min(SAMPLE, calls * len(KINDS))


# --- what the walk found: left to the user, or to doctor, where the issue asks for the command to finish ------


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults(monkeypatch)
    f.root = tmp_path
    return f


def killed(faults: Faults, method: str, command: Callable[[], Any], at: int = 1, kind: str = "kill_after") -> None:
    faults.start(at, kind, method)
    with pytest.raises((Killed, OSError, KeyboardInterrupt)):
        command()
    faults.revive()


def test_doctor_finishes_a_save_killed_before_its_record(tmp_path: Path, faults: Faults) -> None:
    ws = seeded(tmp_path)
    killed(faults, "move_noreplace", lambda: ws.task("unet").save(b"the new one", step=99))
    assert (tmp_path / "ws/tasks/unet/checkpoints/000005.pt").read_bytes() == b"the new one"  # no record names it
    dry = doctor(ckpt.Workspace.open(tmp_path / "ws"), dry_run=True)
    assert [r.action for r in dry] == ["would record it as checkpoint 5"]
    assert [cp.number for cp in ckpt.Workspace.open(tmp_path / "ws").task("unet").checkpoints] == [1, 2, 3, 4]
    repairs = doctor(ckpt.Workspace.open(tmp_path / "ws"))
    recorded = ("tasks/unet/checkpoints/000005.pt", "recorded it as checkpoint 5")
    assert [(r.path, r.action) for r in repairs] == [recorded]
    last = ckpt.Workspace.open(tmp_path / "ws").task("unet").checkpoints[-1]
    assert (last.number, last.step, last.sha256) == (5, 99, sha256(b"the new one"))  # as the save would have
    assert doctor(ckpt.Workspace.open(tmp_path / "ws")) == []
    assert not (tmp_path / "ws/tasks/unet/.saving.toml").exists()


def test_the_next_save_finishes_a_save_killed_before_its_record(tmp_path: Path, faults: Faults) -> None:
    ws = seeded(tmp_path)
    killed(faults, "move_noreplace", lambda: ws.task("unet").save(b"killed", step=98, metrics={"loss": 0.5}))
    # the training script runs again: its next save records the killed one first, then takes the next number
    assert ckpt.Workspace.open(tmp_path / "ws").task("unet").save(b"next", step=99) == 6
    cps = ckpt.Workspace.open(tmp_path / "ws").task("unet").checkpoints
    assert [(cp.number, cp.step, cp.metrics) for cp in cps[-2:]] == [(5, 98, {"loss": 0.5}), (6, 99, {})]
    assert doctor(ckpt.Workspace.open(tmp_path / "ws")) == []


def test_a_save_killed_before_its_rename_leaves_nothing_to_record(tmp_path: Path, faults: Faults) -> None:
    ws = seeded(tmp_path)
    killed(faults, "move_noreplace", lambda: ws.task("unet").save(b"never placed"), kind="kill_before")
    assert (tmp_path / "ws/tasks/unet/.saving.toml").exists()
    assert ckpt.Workspace.open(tmp_path / "ws").task("unet").save(b"next") == 5  # the number was never used
    assert not (tmp_path / "ws/tasks/unet/.saving.toml").exists()
    assert [r.problem for r in doctor(ckpt.Workspace.open(tmp_path / "ws"))] == []


def _record(number: int, file: str, data: bytes) -> bytes:
    return (
        f'\n[[checkpoints]]\nnumber = {number}\nfile = "{file}"\nsize = {len(data)}\n'
        f'sha256 = "{sha256(data)}"\ncreated = "2026-12-05T00:00:00Z"\n'
    ).encode()


HAND = b"hand placed"  # checkpoints/000005.pt, which no record names


@pytest.mark.parametrize(
    "left",
    [
        b"not toml [",  # torn
        b"",
        _record(5, "../../../etc/passwd", HAND),
        _record(5, "checkpoints/000005.pt", b"other bytes"),
        _record(2, "checkpoints/000005.pt", HAND),  # a number in use
        _record(5, "checkpoints/000002.pt", b"weights 1"),  # a recorded file, under an unused number
        _record(6, "checkpoints/000005.pt", HAND),  # a name no save of 6 writes
        _record(5, "checkpoints/.000005.pt.abc.tmp", HAND),  # a temporary name
        _record(999_999, "checkpoints/999999.pt", HAND),  # far beyond the last number
        _record(5, "checkpoints/000005.pt", HAND).replace(b"number = 5", b"number = 99999999999999999999"),
        "hard link",  # the right record, of a file linked elsewhere
        b"x" * (2 << 20),
        "link",
    ],
    ids=[
        "torn", "empty", "outside", "other-bytes", "used-number", "recorded-file", "other-name", "temporary",
        "far-number", "huge-number", "hard-link", "huge", "link",
    ],
)  # fmt: skip
def test_a_damaged_record_of_a_killed_save_records_nothing(tmp_path: Path, left: bytes | str) -> None:
    seeded(tmp_path)
    folder = tmp_path / "ws/tasks/unet"
    (folder / "checkpoints/000005.pt").write_bytes(HAND)
    (folder / "checkpoints/.000005.pt.abc.tmp").write_bytes(HAND)
    if left == "link":
        (tmp_path / "elsewhere.toml").write_bytes(_record(5, "checkpoints/000005.pt", HAND))
        (folder / ".saving.toml").symlink_to(tmp_path / "elsewhere.toml")
    elif left == "hard link":
        os.link(folder / "checkpoints/000005.pt", tmp_path / "elsewhere.pt")
        (folder / ".saving.toml").write_bytes(_record(5, "checkpoints/000005.pt", HAND))
    else:
        (folder / ".saving.toml").write_bytes(left)  # type: ignore[arg-type]
    dry = doctor(ckpt.Workspace.open(tmp_path / "ws"), dry_run=True)
    assert [r.action for r in dry if r.path == "tasks/unet/.saving.toml"] in ([], ["would drop it"])
    assert os.path.lexists(folder / ".saving.toml")
    repairs = doctor(ckpt.Workspace.open(tmp_path / "ws"))
    assert not any(r.action.startswith("recorded") for r in repairs), repairs
    unknown = [r for r in repairs if r.path == "tasks/unet/checkpoints/000005.pt"]
    assert len(unknown) == 1 and unknown[0].action.startswith("left alone")  # reported as ever, left alone
    assert not os.path.lexists(folder / ".saving.toml")
    assert [cp.number for cp in ckpt.Workspace.open(tmp_path / "ws").task("unet").checkpoints] == [1, 2, 3, 4]
    assert ckpt.Workspace.open(tmp_path / "ws").task("unet").save(b"next") == 6  # 5 is the unknown file's
    assert doctor(ckpt.Workspace.open(tmp_path / "ws"))[0].path == "tasks/unet/checkpoints/000005.pt"


def _killed_save(tmp_path: Path, faults: Faults) -> None:
    ws = seeded(tmp_path)
    killed(faults, "move_noreplace", lambda: ws.task("unet").save(b"killed", step=98, metrics={"val_iou": 0.9}))


def _last(tmp_path: Path) -> tuple[int, int | None, dict[str, float]]:
    cp = ckpt.Workspace.open(tmp_path / "ws").task("unet").checkpoints[-1]
    return cp.number, cp.step, cp.metrics


def test_finish_after_a_killed_save_records_it_first_and_promotes_it(tmp_path: Path, faults: Faults) -> None:
    _killed_save(tmp_path, faults)
    done = finish(ckpt.Workspace.open(tmp_path / "ws"), "unet")
    assert done.model is not None and done.model.checkpoint == 5  # the killed save is the latest
    assert _last(tmp_path) == (5, 98, {"val_iou": 0.9})
    assert doctor(ckpt.Workspace.open(tmp_path / "ws")) == []


def test_scan_add_and_import_after_a_killed_save_record_it_with_its_step_and_metrics(
    tmp_path: Path, faults: Faults
) -> None:
    _killed_save(tmp_path, faults)
    assert scan(ckpt.Workspace.open(tmp_path / "ws"), "unet", add=True).added == []  # nothing left to add
    assert _last(tmp_path) == (5, 98, {"val_iou": 0.9})
    _killed_save(tmp_path / "again", faults)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "epoch=9.pt").write_bytes(b"imported")
    import_path(ckpt.Workspace.open(tmp_path / "again/ws"), tmp_path / "run", task="unet", mode="copy")
    numbers = [(cp.number, cp.step) for cp in ckpt.Workspace.open(tmp_path / "again/ws").task("unet").checkpoints]
    assert numbers[-2:] == [(5, 98), (6, None)]
    assert doctor(ckpt.Workspace.open(tmp_path / "again/ws")) == []


def test_latest_after_a_killed_save_is_that_save(tmp_path: Path, faults: Faults) -> None:
    _killed_save(tmp_path, faults)
    latest = ckpt.Workspace.open(tmp_path / "ws").task("unet").latest()  # a training script resuming
    assert latest is not None and (latest.number, latest.step) == (5, 98)


def test_a_folder_where_the_record_of_a_save_belongs_is_refused_with_a_way_out(tmp_path: Path) -> None:
    seeded(tmp_path)
    (tmp_path / "ws/tasks/unet/.saving.toml").mkdir()
    with pytest.raises(CkptError, match=r"tasks/unet/.saving.toml is a folder, where ckpt keeps") as e:
        ckpt.Workspace.open(tmp_path / "ws").task("unet").save(b"next")
    assert e.value.exit_code == 6 and "mv tasks/unet/.saving.toml" in (e.value.hint or "")
    for dry_run in (True, False):
        repairs = doctor(ckpt.Workspace.open(tmp_path / "ws"), dry_run=dry_run)
        assert [(r.path, r.action.split(":")[0]) for r in repairs] == [("tasks/unet/.saving.toml", "left alone")]
        assert repairs[0].problem == "a folder where ckpt keeps the record of a save in progress"
    (tmp_path / "ws/tasks/unet/.saving.toml").rmdir()
    assert ckpt.Workspace.open(tmp_path / "ws").task("unet").save(b"next") == 5


def test_doctor_removes_a_task_folder_whose_creation_stopped_before_its_manifest(tmp_path: Path) -> None:
    seeded(tmp_path)
    half = tmp_path / "ws/tasks/half"
    (half / "checkpoints").mkdir(parents=True)
    (half / ".lock").write_bytes(b"")
    kept = tmp_path / "ws/tasks/kept"  # a folder that lost its manifest but holds a file: left alone, as before
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "checkpoints/000001.pt").write_bytes(b"w")
    dry = doctor(ckpt.Workspace.open(tmp_path / "ws"), dry_run=True)
    found = {(r.path, r.action.split(":")[0]) for r in dry}
    assert found == {("tasks/half", "would remove it"), ("tasks/kept", "left alone")}
    assert half.is_dir()
    done = doctor(ckpt.Workspace.open(tmp_path / "ws"))
    assert {(r.path, r.action.split(":")[0]) for r in done} == {("tasks/half", "removed"), ("tasks/kept", "left alone")}
    assert not half.exists() and (kept / "checkpoints/000001.pt").read_bytes() == b"w"
    with pytest.raises(CkptError, match="is missing"):
        ckpt.Workspace.open(tmp_path / "ws").task("kept")


def test_models_remove_killed_after_its_move_is_finished_by_running_it_again(tmp_path: Path, faults: Faults) -> None:
    setup_model(tmp_path)
    ws = ckpt.Workspace.open(tmp_path / "ws")
    killed(faults, "move_noreplace", lambda: trash_model(ws, "m1"))  # the model folder is in a pending entry
    try:
        trash_model(ckpt.Workspace.open(tmp_path / "ws"), "m1")
    except CkptError as e:  # before the trash's rewrite over ws.storage: "model 'm1' does not exist"
        assert "doctor" in str(e) or "doctor" in (e.hint or "")
    entries = list_entries(ckpt.Workspace.open(tmp_path / "ws"))[0]
    assert [e.state for e in entries] == ["complete"]


def test_scan_add_killed_after_staging_takes_the_file_in_when_run_again(tmp_path: Path, faults: Faults) -> None:
    setup_stray(tmp_path)
    ws = ckpt.Workspace.open(tmp_path / "ws")
    killed(faults, "move_noreplace", lambda: scan(ws, "unet", add=True))  # the stray file is staged
    assert not (tmp_path / "ws/tasks/unet/step=50.pt").exists()
    result = scan(ckpt.Workspace.open(tmp_path / "ws"), "unet", add=True)  # today: nothing added, nothing said
    assert [cp.sha256 for cp in result.added] == [sha256(b"a stray file")]


# --- what the walk found and ckpt now does: an interrupt (Ctrl-C, SIGTERM) right after a step --------------


@pytest.mark.parametrize("call", ["os.write", "os.unlink"], ids=["as-it-is-taken", "as-it-is-let-go"])
def test_a_lock_interrupted_is_let_go(
    tmp_path: Path, faults: Faults, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    monkeypatch.setenv("CKPT_LOCK_TIMEOUT", "1")
    ws = seeded(tmp_path)
    faults.start(1, "interrupt", call)  # the holder file's writing, once the lock is taken; its removal
    with pytest.raises(KeyboardInterrupt) as kept:  # kept, as Jupyter keeps the last traceback (and the lock in it)
        promote(ws, "unet", 2, title="m")
    faults.revive()
    assert faults.struck == f"interrupt at {call}" and kept.value
    # a library user's process lives on: its next command must not find the task locked by itself
    assert promote(ckpt.Workspace.open(tmp_path / "ws"), "unet", 3, title="n").model.checkpoint == 3


@pytest.mark.parametrize("op", ["save", "import", "scan_add"])
def test_an_interrupt_right_after_the_records_landed_keeps_their_files(tmp_path: Path, faults: Faults, op: str) -> None:
    ctx = OPERATIONS[op][0](tmp_path)
    before = faultcheck.picture(files(tmp_path / "ws"))
    ws = ckpt.Workspace.open(tmp_path / "ws")
    killed(faults, "append_durably", lambda: OPERATIONS[op][1](ws, tmp_path, ctx), kind="interrupt")
    after = faultcheck.check(files(tmp_path / "ws"), before, new=faultcheck.expected_new(op))  # no record is broken
    assert after["where"].keys() - before["where"].keys() == faultcheck.expected_new(op)  # recorded, and kept


def test_an_import_interrupted_right_after_a_rename_puts_its_source_back(tmp_path: Path, faults: Faults) -> None:
    setup_import(tmp_path)
    sources = files(tmp_path / "run")
    ws = ckpt.Workspace.open(tmp_path / "ws")
    # moves: each source to its staging name, then (under the lock) each staged file to its number
    killed(faults, "move_noreplace", lambda: run_import(ws, tmp_path, {}), at=3, kind="interrupt")
    assert files(tmp_path / "run") == sources  # both back where they were, none left numbered without a record
    numbered = tmp_path / "ws/tasks/lit/checkpoints"
    assert not numbered.exists() or not list(numbered.iterdir())
    assert len(run_import(ckpt.Workspace.open(tmp_path / "ws"), tmp_path, {}).rows) == 2


def test_doctor_says_nothing_of_a_task_whose_creation_is_under_way(tmp_path: Path) -> None:
    import threading

    seeded(tmp_path)
    half = tmp_path / "ws/tasks/new"
    started = threading.Event()
    done: list[Any] = []

    def doctor_now() -> None:
        started.set()
        done.append(doctor(ckpt.Workspace.open(tmp_path / "ws")))

    ckpt.Workspace.open(tmp_path / "ws").create_task("other")  # its manifest, to write as new's
    manifest = (tmp_path / "ws/tasks/other/task.toml").read_bytes().replace(b'"other"', b'"new"')
    # a creation holds tasks/.create.lock from its first mkdir to its manifest, as make_task does
    with locks.locked(tmp_path / "ws/tasks/.create.lock", "task creation"):
        (half / "checkpoints").mkdir(parents=True)
        runner = threading.Thread(target=doctor_now)
        runner.start()
        started.wait()
        runner.join(0.5)  # doctor waits for the creation to end before it removes anything
        assert runner.is_alive()
        (half / "task.toml").write_bytes(manifest)
    runner.join(30)
    assert done and [r.path for r in done[0]] == [], done
    assert half.is_dir()


def test_reading_a_task_a_killed_save_left_works_where_its_lock_cannot_be_taken(
    tmp_path: Path, faults: Faults, monkeypatch: pytest.MonkeyPatch, run: Any
) -> None:
    _killed_save(tmp_path, faults)

    def read_only(path: object, what: str, timeout: float | None = None) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    with monkeypatch.context() as m:  # a read-only mount, another user's workspace: list what is committed
        m.setattr(locks, "locked", read_only)
        m.setenv("CKPT_WORKSPACE", str(tmp_path / "ws"))
        latest = ckpt.Workspace.open(tmp_path / "ws").task("unet").latest()
        assert latest is not None and latest.number == 4
        res = run("list", "unet", "--json")
        assert res.exit_code == 0 and [r["number"] for r in json.loads(res.stdout)] == [1, 2, 3, 4], res.output
    assert _last(tmp_path)[0] == 4 and ckpt.Workspace.open(tmp_path / "ws").task("unet").latest().number == 5


def test_reading_a_task_does_not_wait_for_a_save_that_is_committing(tmp_path: Path) -> None:
    import threading

    seeded(tmp_path)
    task = ckpt.Workspace.open(tmp_path / "ws").task("unet")
    (task.folder / ".saving.toml").write_bytes(b"")  # as a save leaves it while it commits
    holding, release = threading.Event(), threading.Event()

    def saver() -> None:
        with ckpt.Workspace.open(tmp_path / "ws").task("unet").lock(settle=False):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=saver)
    thread.start()
    try:
        holding.wait(30)
        other = ckpt.Workspace.open(tmp_path / "ws").task("unet")
        assert other.settle() is False  # at once: the lock is busy, the committed records are the answer
        assert [cp.number for cp in other.checkpoints] == [1, 2, 3, 4]
    finally:
        release.set()
        thread.join()


def test_dry_runs_after_a_killed_save_plan_what_the_runs_do(tmp_path: Path, faults: Faults) -> None:
    from ckpt.plans import plan_finish, plan_promote
    from ckpt.trash import KeepRules
    from ckpt.trash_plan import plan_unused

    _killed_save(tmp_path, faults)
    ws = ckpt.Workspace.open(tmp_path / "ws")
    assert plan_promote(ws, "unet", 5, title="m5", best=None, mode=None).model.checkpoint == 5
    plan = plan_unused(ws.task("unet"), KeepRules(keep_last=1), "test")
    assert [d.number for d in plan.decisions if d.action == "keep"] == [5]
    assert "checkpoint 5" in " ".join(plan_finish(ws, "unet", failed=False, title=None).would)


def test_verify_while_a_save_commits_reports_no_unknown_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt import importer
    from ckpt.verify import verify

    seeded(tmp_path)
    folder = tmp_path / "ws/tasks/unet"
    (folder / "checkpoints/.checkpoint.pt.abc.tmp").write_bytes(b"x")  # a save writing, renamed meanwhile
    real_listing, real_describe = importer._scan_folder, importer._unknown

    def describe(ws: Any, path: Path) -> Any:
        if path.name.endswith(".tmp"):
            path.unlink()  # gone between the listing and the look at it
        return real_describe(ws, path)

    def listing(ws: Any, t: Any) -> Any:
        (folder / "checkpoints/000005.pt").write_bytes(b"saved")  # renamed into place during the listing
        found = real_listing(ws, t)
        saver = ckpt.Workspace.open(tmp_path / "ws").task("unet")  # another process's, as a save has it
        with saver.lock(settle=False):
            saver.state()
            saver._append_record(  # type: ignore[attr-defined]
                ckpt.manifest.Checkpoint(
                    number=5, file="checkpoints/000005.pt", size=5, sha256=sha256(b"saved"),
                    created="2026-12-05T00:00:00Z", task="unet",
                ),
                folder / "checkpoints/000005.pt",
            )  # fmt: skip
        return found

    monkeypatch.setattr(importer, "_scan_folder", listing)
    monkeypatch.setattr(importer, "_unknown", describe)
    result = verify(ckpt.Workspace.open(tmp_path / "ws"), ["unet"])
    assert result.ok, result.problems


def test_scan_and_an_import_dry_run_after_a_killed_save_see_it_recorded(tmp_path: Path, faults: Faults) -> None:
    _killed_save(tmp_path, faults)
    assert scan(ckpt.Workspace.open(tmp_path / "ws"), "unet").unknown == []  # its checkpoint, not a stray file
    assert _last(tmp_path)[0] == 5
    _killed_save(tmp_path / "again", faults)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "epoch=9.pt").write_bytes(b"imported")
    plan = import_path(ckpt.Workspace.open(tmp_path / "again/ws"), tmp_path / "run", task="unet", dry_run=True)
    assert len(plan.rows) == 1
    assert _last(tmp_path / "again")[0] == 5  # taken in, as the import's lock would: the plan is the import's


def test_an_unknown_folder_shows_its_size_even_when_it_cannot_be_added(tmp_path: Path) -> None:
    seeded(tmp_path)
    stray = tmp_path / "ws/tasks/unet/checkpoints/notes"
    stray.mkdir()
    (stray / "a.txt").write_bytes(b"x" * 300)
    (found,) = scan(ckpt.Workspace.open(tmp_path / "ws"), "unet").unknown
    assert (found.kind, found.size, found.addable) == ("dir", 300, False)
