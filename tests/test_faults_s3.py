"""Bucket workspaces on moto's S3 server under injected faults: the walk of tests/test_faults.py, on a sample.

The workspace's `S3Storage` is wrapped (mounted at its URL) so that one primitive call goes wrong as on the
memory store (ckpt.storage.memory's KINDS): it fails with a 500 (an OSError, as s3fs raises once its retries
are spent), it lands and its response is lost, it lands and is sent again (a conditional write then gets a
real 412 from the server), or the process is killed before or after it. Then the command runs again (at once,
or once every lease and staleness limit has passed), then `ckpt doctor`, and tests/faultcheck.py checks the
invariant on the objects, read from the server behind ckpt's back.
"""

from __future__ import annotations

import errno
import itertools
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import ckpt
from ckpt import store_task
from ckpt.doctor import doctor
from ckpt.errors import CkptError
from ckpt.importer import import_path, scan
from ckpt.models import finish, promote, rename
from ckpt.storage import Blob, Storage, mount_for_tests, unmount_for_tests
from ckpt.storage.memory import KINDS, Killed
from ckpt.trash import empty, list_entries, plan_empty, restore, trash_unused
from ckpt.trash_models import trash_model

from . import faultcheck
from .test_faults import later  # time moves past every lease and staleness limit

T = TypeVar("T")
SAMPLE = 3  # faults tried per operation: each trial costs ~100 requests to the server
_prefixes = itertools.count()


class Faulty(Storage):
    """`inner` with a fault at its `at`-th primitive call (counted while `active`), as MemoryStorage strikes."""

    def __init__(self, inner: Storage):
        self.inner, self.url = inner, inner.url
        self.calls: list[str] = []
        self.at, self.kind = 0, ""
        self.method: str | None = None
        self.active = self.dead = False
        self.struck: str | None = None

    def start(self, at: int = 0, kind: str = "", method: str | None = None) -> None:
        """Count from here; strike the `at`-th call (of `method`'s calls when given) with `kind`."""
        self.calls, self.at, self.kind, self.method = [], at, kind, method
        self.struck, self.active, self.dead = None, True, False

    def _call(self, method: str, do: Callable[[], T]) -> T:
        if not self.active:
            return do()
        if self.dead:
            raise Killed(f"{method}: the process is dead")
        self.calls.append(method)
        count = len(self.calls) if self.method is None else self.calls.count(self.method)
        if count != self.at or self.method not in (None, method) or self.struck is not None:
            return do()
        self.struck = f"{self.kind} at {method}"
        if self.kind == "fail":
            raise OSError(errno.EIO, f"{method}: An error occurred (InternalError): HTTP 500 (injected)")
        if self.kind == "kill_before":
            self.dead = True
            raise Killed(f"{method}: killed before")
        result = do()
        if self.kind == "lose":
            raise OSError(errno.EIO, f"{method}: connection reset, the response was lost (injected)")
        if self.kind == "kill_after":
            self.dead = True
            raise Killed(f"{method}: killed after")
        if self.kind == "retry":
            return do()
        return result

    def get(self, key: str) -> tuple[bytes, str]:
        return self._call("get", lambda: self.inner.get(key))

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        return self._call("get", lambda: self.inner.get_if_changed(key, etag))

    def head(self, key: str) -> Blob | None:
        return self._call("head", lambda: self.inner.head(key))

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        return self._call("put", lambda: self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match))

    def upload(self, key: str, source: Path, *, if_none_match: bool = False) -> str:
        return self._call("upload", lambda: self.inner.upload(key, source, if_none_match=if_none_match))

    def download(self, key: str, dest: Path) -> None:
        self._call("download", lambda: self.inner.download(key, dest))

    def sha256(self, key: str) -> str:
        return self._call("sha256", lambda: self.inner.sha256(key))

    def copy(self, src: str, dst: str) -> None:
        self._call("copy", lambda: self.inner.copy(src, dst))

    def children(self, prefix: str) -> list[str]:
        return self._call("list", lambda: self.inner.children(prefix))

    def list_prefix(self, prefix: str) -> list[Blob]:
        return self._call("list", lambda: self.inner.list_prefix(prefix))

    def delete(self, keys: list[str]) -> None:
        self._call("delete", lambda: self.inner.delete(keys))

    def incomplete_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        return self._call("list", lambda: self.inner.incomplete_uploads(prefix))

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._call("delete", lambda: self.inner.abort_upload(key, upload_id))


# --- the objects, behind ckpt's back ---------------------------------------------------------------------


_by_etag: dict[str, bytes] = {}  # the bytes of each version seen: a snapshot fetches only what changed


def objects(url: str) -> dict[str, bytes]:
    """Every object of the workspace at `url`, by key (one listing, and a GET of each version not seen yet)."""
    from ckpt.storage.s3 import S3Storage

    st = S3Storage(url)
    blobs = st.list_prefix("")
    new = [b for b in blobs if b.etag not in _by_etag]
    for b, data in zip(new, st.get_many([b.key for b in new]), strict=True):
        if data is not None:
            _by_etag[b.etag] = data
    return {b.key: _by_etag[b.etag] for b in blobs if b.etag in _by_etag}


# --- the operations ---------------------------------------------------------------------------------------


def seeded(url: str, n: int = 4) -> ckpt.Workspace:
    ws = ckpt.Workspace.init(url)
    task = ws.create_task("unet")
    for i in range(n):
        task.save(f"weights {i}".encode(), step=i, metrics={"val_iou": i / 10})
    return ckpt.Workspace.open(url)


def setup_plain(url: str, tmp: Path) -> dict[str, Any]:
    seeded(url)
    return {}


def setup_model(url: str, tmp: Path) -> dict[str, Any]:
    promote(seeded(url), "unet", 2, title="m1")
    return {}


def setup_trashed(url: str, tmp: Path) -> dict[str, Any]:
    return {"entry": trash_unused(seeded(url), "unet").entry}


def setup_removed(url: str, tmp: Path) -> dict[str, Any]:
    promote(seeded(url), "unet", 2, title="m1")
    return {"entry": trash_model(ckpt.Workspace.open(url), "m1").entry}


def setup_stray(url: str, tmp: Path) -> dict[str, Any]:
    seeded(url).storage.put("tasks/unet/step=50.pt", b"a stray file")  # type: ignore[attr-defined]
    return {}


def setup_import(url: str, tmp: Path) -> dict[str, Any]:
    seeded(url)
    src = tmp / "run"
    src.mkdir()
    for epoch in range(2):
        (src / f"epoch={epoch}-step={epoch * 10 + 10}.ckpt").write_bytes(f"lightning {epoch}".encode())
    return {"src": src}


def setup_interrupted(url: str, tmp: Path) -> dict[str, Any]:
    """A trash-unused killed after its second copy, a promote killed after its claim."""
    from ckpt.storage.s3 import S3Storage

    seeded(url)
    faulty = Faulty(S3Storage(url))
    mount_for_tests(url, faulty)
    try:
        for method, command in [
            ("copy", lambda ws: trash_unused(ws, "unet")),
            ("put", lambda ws: promote(ws, "unet", 3, title="half")),
        ]:
            faulty.start(2 if method == "copy" else 1, "kill_after", method)
            with pytest.raises(Killed):
                command(ckpt.Workspace.open(url))
    finally:
        unmount_for_tests(url)
    return {}


Run = Callable[[ckpt.Workspace, dict[str, Any]], Any]
OPERATIONS: dict[str, tuple[Callable[[str, Path], dict[str, Any]], Run]] = {
    "save": (setup_plain, lambda ws, ctx: ws.task("unet").save(b"the new one", step=99)),
    "promote": (setup_plain, lambda ws, ctx: promote(ws, "unet", 3, title="best")),
    "finish": (setup_plain, lambda ws, ctx: finish(ws, "unet")),
    "rename": (setup_model, lambda ws, ctx: rename(ws, "m1", "m2")),
    "models_remove": (setup_model, lambda ws, ctx: trash_model(ws, "m1")),
    "trash_unused": (setup_plain, lambda ws, ctx: trash_unused(ws, "unet")),
    "restore": (setup_trashed, lambda ws, ctx: restore(ws, ctx["entry"])),
    "restore_model": (setup_removed, lambda ws, ctx: restore(ws, ctx["entry"])),
    "empty": (setup_trashed, lambda ws, ctx: empty(ws, plan_empty(ws))),
    "import": (setup_import, lambda ws, ctx: import_path(ws, ctx["src"], task="lit", mode="copy")),
    "scan_add": (setup_stray, lambda ws, ctx: scan(ws, "unet", add=True)),
    "doctor": (setup_interrupted, lambda ws, ctx: doctor(ws)),
}


class Walk:
    """One operation's fault trials, each on a fresh prefix holding a copy of the same objects."""

    def __init__(self, op: str, base: str, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        import s3fs

        self.op, self.base, self.monkeypatch = op, base, monkeypatch
        self.fs = s3fs.S3FileSystem(use_listings_cache=False)
        url = self.url(next(_prefixes))
        self.ctx = OPERATIONS[op][0](url, tmp)
        self.template = objects(url)
        self.faulty: Faulty | None = None

    def url(self, n: int) -> str:
        return f"{self.base}-{self.op}-{n}"

    def attempt(self, url: str) -> tuple[bool, Any]:
        try:
            return True, OPERATIONS[self.op][1](ckpt.Workspace.open(url), self.ctx)
        except (CkptError, OSError, Killed):
            return False, None

    def check(self, url: str, before: dict[str, Any]) -> dict[str, bytes]:
        objs = objects(url)
        faultcheck.check(
            objs,
            before,
            may_go=set(before["where"]) if self.op == "empty" else set(),
            new=faultcheck.expected_new(self.op),
            models_move=self.op in ("rename", "empty"),
        )
        return objs

    def one(self, at: int, kind: str, at_once: bool) -> int:
        """Run the operation with a fault at call `at` (0: none), then again as a new process, then doctor;
        check the invariant after each. The number of calls the first run made."""
        from ckpt.storage.s3 import S3Storage

        url = self.url(next(_prefixes))
        root = url[len("s3://") :]
        self.fs.pipe({f"{root}/{k}": v for k, v in self.template.items()})
        before = faultcheck.picture(self.template)
        faulty = self.faulty = Faulty(S3Storage(url))
        mount_for_tests(url, faulty)
        try:
            faulty.start(at, kind)
            ok, result = self.attempt(url)
            faulty.active = False
            calls = len(faulty.calls)
            if ok:
                faultcheck.done_as_reported(objects(url), self.op, result, self.ctx)
            with self.monkeypatch.context() as m:
                if not at_once:
                    later(m)
                if self.op != "save":  # a save run again is another checkpoint
                    ok, result = self.attempt(url)
                    objs = self.check(url, before)
                    if ok:
                        faultcheck.done_as_reported(objs, self.op, result, self.ctx)
                later(m)
                doctor(ckpt.Workspace.open(url))
                objs = self.check(url, before)
                ws = ckpt.Workspace.open(url)
                assert doctor(ws) == [], "doctor left something to do"
                assert faultcheck.left_half_done(objs) == []
                assert list_entries(ws)[1] == []
                for name in ws.task_names():
                    ws.task(name).checkpoints  # noqa: B018
                assert ws.models.read_all()[1] == []
        finally:
            unmount_for_tests(url)
        self.fs.rm(root, recursive=True)
        return calls


def sample(op: str, calls: int, size: int = SAMPLE) -> list[tuple[int, str, bool]]:
    """A deterministic sample of (call, kind, run again at once) for `op`: one call from each part of its
    calls, each with another kind."""
    rng = random.Random(f"s3 {op}")
    kinds = rng.sample(KINDS, len(KINDS))
    out = []
    for i in range(min(size, calls)):
        lo, hi = calls * i // size, max(calls * (i + 1) // size, calls * i // size + 1)
        out.append((rng.randrange(lo, hi) + 1, kinds[i % len(kinds)], rng.random() < 0.5))
    return out


@pytest.fixture(autouse=True)
def _as_fast_as_any_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task handle reuses its read of the manifest for `HOLD` s, then reads it again: on a loaded machine an
    operation made more calls, and a fault meant for the last call of a sampled run struck none. Here a handle
    keeps its read for the whole operation, as on a fast machine: the calls do not depend on the clock."""
    monkeypatch.setattr(store_task, "HOLD", math.inf)


class SlowClock:
    """store_task's `time` module, with a monotonic clock that moves 0.6 s whenever it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 0.6
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.parametrize("op", ["trash_unused", "doctor"])
def test_the_calls_of_an_operation_do_not_depend_on_the_clock(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    walk = Walk(op, s3_url, tmp_path, monkeypatch)
    fast = walk.one(0, "", at_once=True)
    monkeypatch.setattr(store_task, "time", SlowClock())  # every read of the clock finds a second gone by
    assert walk.one(0, "", at_once=True) == fast


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_a_sample_of_faults_at_the_calls_of(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    walk = Walk(op, s3_url, tmp_path, monkeypatch)
    calls = walk.one(0, "", at_once=True)
    assert calls > 0
    for at, kind, at_once in sample(op, calls):
        try:
            walk.one(at, kind, at_once)
        except AssertionError as e:
            struck = walk.faulty.struck if walk.faulty else None
            raise AssertionError(f"{op}: fault {kind!r} at call {at} of {calls} ({struck}): {e}") from None
        assert walk.faulty is not None and walk.faulty.struck is not None
