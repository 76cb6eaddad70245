"""Bucket workspaces under injected faults, on the in-memory store (ckpt.storage.memory).

Each fault strikes one primitive call: it fails, loses its response, is retried after it landed, or kills the
process before or after it. Then the command is run again (a new process: the store revived, time moved on
past every lease) and `ckpt doctor` after it, and the invariant is checked: every checkpoint is in exactly
one of its task or a complete trash entry that restores it, no record names a missing object, and nothing
a command reported done is undone. `test_every_fault_at_every_call` walks every call of every operation.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ckpt
import ckpt.trash
import ckpt.trash_entry
from ckpt import store_doctor, store_models, store_segments, store_task
from ckpt.doctor import doctor
from ckpt.errors import CkptError, ConflictError
from ckpt.importer import import_path, scan
from ckpt.manifest import TaskState
from ckpt.models import finish, promote, rename
from ckpt.storage import PreconditionFailed
from ckpt.storage.memory import KINDS, Fault, Killed, MemoryStorage, keys, mounted
from ckpt.trash import FILES_DIR, empty, plan_empty, restore
from ckpt.trash import trash_unused as trash_unused_op
from ckpt.trash_models import trash_model
from ckpt.verify import verify

from . import faultcheck

_names = itertools.count()


@pytest.fixture
def memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], MemoryStorage]]:
    """Fresh mounted memory stores (a new URL each), unmounted at the end. A task handle keeps its read of the
    manifest for the whole operation (HOLD, 1 s, is passed on a loaded machine), so that the calls a walk
    counts are the calls it strikes, whatever the clock (as in tests/test_faults_s3.py)."""
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store_task, "HOLD", math.inf)
    opened: list[Any] = []

    def new() -> MemoryStorage:
        cm = mounted(MemoryStorage(f"memory://ws{next(_names)}"))
        opened.append(cm)
        return cm.__enter__()

    yield new
    for cm in opened:
        cm.__exit__(None, None, None)


def fresh(st: MemoryStorage) -> ckpt.Workspace:
    """The workspace as a new process opens it."""
    return ckpt.Workspace.open(st.url)


def seeded(st: MemoryStorage, n: int = 4) -> ckpt.Workspace:
    ws = ckpt.Workspace.init(st.url)
    task = ws.create_task("unet")
    for i in range(n):
        task.save(f"weights {i}".encode(), step=i, metrics={"val_iou": i / 10})
    return fresh(st)


def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time moves past every lease and staleness limit: what a dead process left may be taken over."""
    monkeypatch.setattr(store_models, "LEASE", -1.0)
    monkeypatch.setattr(ckpt.trash_entry, "STALE_PENDING", -1.0)
    monkeypatch.setattr(store_doctor, "STALE_PENDING", -1.0)


def task_state(st: MemoryStorage, name: str) -> TaskState:
    """Task `name`'s manifest with its segments and the log records it has not folded (read directly, no call
    counted)."""
    return faultcheck.task_state(keys(st), name)


# --- the invariant (tests/faultcheck.py: the same on every store) ---------------------------------------


def picture(st: MemoryStorage) -> dict[str, Any]:
    """Where every checkpoint is (read from the objects directly, no call counted); see faultcheck.picture."""
    return faultcheck.picture(keys(st))


def check(st: MemoryStorage, before: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """faultcheck.check on the objects (no call counted)."""
    return faultcheck.check(keys(st), before, **kw)


# --- the operations, each as a command a user re-runs ----------------------------------------------------

Op = Callable[[ckpt.Workspace, Path], Any]


def _entry(ws: ckpt.Workspace) -> str:
    res = trash_unused_op(ws, "unet")
    assert res.entry
    return res.entry


def setup_plain(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    seeded(st)
    return {}


def setup_model(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    ws = seeded(st)
    promote(ws, "unet", 2, title="m1")
    return {}


def setup_trashed(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    ws = seeded(st)
    return {"entry": _entry(ws)}


def setup_removed(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    ws = seeded(st)
    promote(ws, "unet", 2, title="m1")
    return {"entry": trash_model(fresh(st), "m1").entry}


def setup_stray(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    seeded(st)
    st.put("tasks/unet/step=50.pt", b"a stray file")  # a file a script wrote into the task folder
    return {}


def setup_import(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    seeded(st)
    src = tmp / "run"
    src.mkdir(exist_ok=True)
    for epoch in range(2):
        (src / f"epoch={epoch}-step={epoch * 10 + 10}.ckpt").write_bytes(f"lightning {epoch}".encode())
    return {"src": src}


def setup_stale_log(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    """A fold that committed the manifest and died before deleting the log objects it took in."""
    ws = seeded(st)
    log = {k: v for k, v in st.objects.items() if "/log/" in k}
    assert len(log) == 3  # the first save opened the log in the manifest, the other three are in it
    task = ws.task("unet")
    assert isinstance(task, store_task.StoreTask)
    task.update(lambda state: None)
    assert not any("/log/" in k for k in st.objects)
    st.objects.update(log)
    return {}


@contextlib.contextmanager
def segmenting() -> Iterator[None]:
    """Every commit writes a segment and every two of a size band are merged: the walk reaches their calls."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(store_task, "FOLD_EVERY", 2)
        m.setattr(store_segments, "TAIL_MAX", 0)
        m.setattr(store_segments, "FAN", 2)
        m.setattr(store_segments, "BAND_BASE", 1)
        yield


def setup_segmented(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    with segmenting():
        seeded(st)
    assert any("/segments/" in k for k in st.objects)
    return {}


def setup_segmented_trashed(st: MemoryStorage, tmp: Path) -> dict[str, Any]:
    with segmenting():
        return {"entry": _entry(seeded(st))}


def in_segments(run: Callable[..., Any]) -> Callable[..., Any]:
    def op(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
        with segmenting():
            return run(ws, ctx)

    return op


def run_save(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
    return ws.task("unet").save(b"the new one", step=99)


def run_save_fold(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
    with pytest.MonkeyPatch.context() as m:  # this save crosses the threshold: it folds the log
        m.setattr(store_task, "FOLD_EVERY", 4)
        return ws.task("unet").save(b"the new one", step=99)


def run_import(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
    return import_path(ws, ctx["src"], task="lit", mode="copy")


def run_restore(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
    return restore(ws, ctx["entry"])


def run_empty(ws: ckpt.Workspace, ctx: dict[str, Any]) -> Any:
    return empty(ws, plan_empty(ws))


OPERATIONS: dict[str, tuple[Callable[[MemoryStorage, Path], dict[str, Any]], Callable[..., Any]]] = {
    "save": (setup_plain, run_save),
    "save_fold": (setup_plain, run_save_fold),
    "save_stale_log": (setup_stale_log, run_save_fold),
    "trash_unused_stale_log": (setup_stale_log, lambda ws, ctx: trash_unused_op(ws, "unet")),
    "promote": (setup_plain, lambda ws, ctx: promote(ws, "unet", 3, title="best")),
    "finish": (setup_plain, lambda ws, ctx: finish(ws, "unet")),
    "rename": (setup_model, lambda ws, ctx: rename(ws, "m1", "m2")),
    "models_remove": (setup_model, lambda ws, ctx: trash_model(ws, "m1")),
    "trash_unused": (setup_plain, lambda ws, ctx: trash_unused_op(ws, "unet")),
    "restore": (setup_trashed, run_restore),
    "empty": (setup_trashed, run_empty),
    "restore_model": (setup_removed, run_restore),
    "import": (setup_import, run_import),
    "scan_add": (setup_stray, lambda ws, ctx: scan(ws, "unet", add=True)),
    "save_segments": (setup_segmented, in_segments(run_save)),
    "trash_unused_segments": (setup_segmented, in_segments(lambda ws, ctx: trash_unused_op(ws, "unet"))),
    "restore_segments": (setup_segmented_trashed, in_segments(run_restore)),
}


def done_as_reported(st: MemoryStorage, op: str, result: Any, ctx: dict[str, Any]) -> None:
    faultcheck.done_as_reported(keys(st), op, result, ctx)


def attempt(op: str, st: MemoryStorage, ctx: dict[str, Any]) -> tuple[bool, Any]:
    """(whether it returned, its result) of `op` in a new process; a clean CkptError or an injected fault is a
    failure."""
    try:
        return True, OPERATIONS[op][1](fresh(st), ctx)
    except (CkptError, ConnectionError, Killed):
        return False, None


expected_new = faultcheck.expected_new


_setups: dict[tuple[str, Path], tuple[dict[str, Any], dict[str, Any]]] = {}


def one_fault(
    memory: Callable[[], MemoryStorage],
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    fault: Fault | None,
    at_once: bool = False,
) -> int:
    """Run `op` with `fault`, then again as a new process (at once, or once every lease and staleness limit
    has passed), then doctor once they have; check the invariant after each. Returns the number of primitive
    calls the first run made (counted from its start)."""
    made = _setups.get((op, tmp))
    if made is None:  # set up once per operation, then copied: each attempt starts from the same objects
        first = memory()
        made = _setups[(op, tmp)] = (OPERATIONS[op][0](first, tmp), dict(first.objects))
    ctx, objects = made
    st = memory()
    st.objects = dict(objects)
    before = picture(st)
    may_go = set(before["where"]) if op == "empty" else set()
    start = len(st.calls)
    if fault is not None:
        fault.at += start if fault.method is None else st.calls.count(fault.method)
    st.fault = fault
    ok, result = attempt(op, st, ctx)
    calls = len(st.calls) - start
    if ok:
        done_as_reported(st, op, result, ctx)
    with monkeypatch.context() as m:
        st.revive()
        if not at_once:
            later(m)
        if not op.startswith("save"):  # a save run again is another checkpoint
            ok2, result2 = attempt(op, st, ctx)
            check(st, before, may_go=may_go, new=expected_new(op), models_move=op in ("rename", "empty"))
            if ok2:
                done_as_reported(st, op, result2, ctx)
        later(m)
        doctor(fresh(st))
        after = check(st, before, may_go=may_go, new=expected_new(op), models_move=op in ("rename", "empty"))
        ws = fresh(st)
        assert doctor(ws) == [], "doctor left something to do"
        # nothing is left half-done: no entry is pending, restoring or emptying, no claim without its model, no
        # segment the root does not name
        assert faultcheck.left_half_done(keys(st)) == []
    del after
    return calls


# --- the bugs of issue 16, one by one --------------------------------------------------------------------


def test_trash_unused_killed_mid_copy_then_run_again_makes_one_entry(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    st = memory()
    ws = seeded(st, n=6)
    before = picture(st)
    st.fault = Fault(at=st.calls.count("copy") + 3, kind="kill_after", method="copy")
    with pytest.raises(Killed):
        trash_unused_op(ws, "unet")
    st.revive()
    first = trash_unused_op(fresh(st), "unet").entry
    with monkeypatch.context() as m:
        later(m)
        entries, _ = ckpt.trash.list_entries(fresh(st))
        assert [(e.id, e.state) for e in entries] == [(first, "complete")]
    check(st, before)
    restore(fresh(st), first)
    assert len(fresh(st).task("unet").checkpoints) == 6
    check(st, before)


def test_trash_empty_killed_after_its_first_delete_is_finished_not_restored(
    memory: Callable[[], MemoryStorage],
) -> None:
    st = memory()
    ws = seeded(st)
    entry = _entry(ws)
    st.fault = Fault(at=st.calls.count("delete") + 1, kind="kill_after", method="delete")
    with pytest.raises(Killed):
        empty(ws, plan_empty(ws))
    st.revive()
    ws = fresh(st)
    shown = ckpt.trash.list_entries(ws)[0]
    assert [(e.id, e.state) for e in shown] == [(entry, "emptying")]  # not "complete"
    with pytest.raises(ConflictError, match="being emptied"):
        restore(ws, entry)
    assert len(ws.task("unet").checkpoints) == 1  # no record was written
    repairs = doctor(ws)
    assert [r.action for r in repairs if entry in r.path] == ["finished the empty"]
    assert not any(k.startswith(f"trash/{entry}") for k in st.objects)


def test_trash_empty_plan_finishes_an_interrupted_empty(memory: Callable[[], MemoryStorage]) -> None:
    st = memory()
    ws = seeded(st)
    entry = _entry(ws)
    st.fault = Fault(at=st.calls.count("delete") + 1, kind="kill_after", method="delete")
    with pytest.raises(Killed):
        empty(ws, plan_empty(ws))
    st.revive()
    ws = fresh(st)
    assert empty(ws, plan_empty(ws)).emptied == [entry]
    assert not any(k.startswith("trash/") for k in st.objects)


@pytest.mark.parametrize("kind", ["retry", "lose"])
def test_save_whose_commit_landed_without_its_answer_keeps_its_object(
    memory: Callable[[], MemoryStorage], kind: str
) -> None:
    st = memory()
    ws = seeded(st, n=1)
    task = ws.task("unet")
    puts = st.calls.count("put")
    # a save's puts: its number's claim, then the manifest commit
    st.fault = Fault(at=puts + 2, kind=kind, method="put")
    number = task.save(b"landed", step=1)  # recognised as landed: no ConflictError, nothing deleted
    assert st.struck is not None and st.struck.kind == kind
    assert number == 2 and f"tasks/unet/checkpoints/{number:06d}.pt" in st.objects
    assert [cp.number for cp in fresh(st).task("unet").checkpoints] == [1, 2]
    assert not picture(st)["problems"]


def test_failed_commits_are_not_committed_by_the_next_save(memory: Callable[[], MemoryStorage]) -> None:
    st = memory()
    ws = seeded(st, n=1)
    task = ws.task("unet")
    real = st.put
    failures = iter(range(5))

    def flaky(key: str, data: bytes, **kw: Any) -> str:
        # the record's commit: the manifest, or the record's own log object once the log is open
        if (key.endswith("task.toml") or "/log/" in key) and next(failures, None) is not None:
            raise ConnectionError("HTTP 500")
        return real(key, data, **kw)

    st.put = flaky  # type: ignore[method-assign]
    for _ in range(5):
        with pytest.raises(ConnectionError):
            task.save(b"never recorded", step=5)
    assert task.save(b"recorded", step=6) == 7  # numbers 2..6 were claimed by the failed saves, never reused
    assert [(cp.number, cp.step) for cp in fresh(st).task("unet").checkpoints] == [(1, 0), (7, 6)]
    assert not picture(st)["problems"]
    # the failed saves' uploads went with them
    assert sorted(k for k in st.objects if "/checkpoints/" in k) == [
        "tasks/unet/checkpoints/000001.pt",
        "tasks/unet/checkpoints/000007.pt",
    ]


@pytest.mark.parametrize("kind", ["retry", "lose"])
def test_trash_unused_whose_commit_landed_without_its_answer_completes(
    memory: Callable[[], MemoryStorage], kind: str
) -> None:
    st = memory()
    ws = seeded(st)
    before = picture(st)
    task_puts = st.calls.count("put")
    # trash-unused's puts: the entry (pending), then the manifest commit
    st.fault = Fault(at=task_puts + 2, kind=kind, method="put")
    res = trash_unused_op(ws, "unet")
    assert res.entry is not None
    entries, _ = ckpt.trash.list_entries(fresh(st))
    assert [(e.id, e.state, e.numbers) for e in entries] == [(res.entry, "complete", [1, 2, 3])]
    check(st, before)


@pytest.mark.parametrize("kind", ["retry", "lose", "kill_after"])
def test_promote_claim_without_its_answer_does_not_block_the_title(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    st = memory()
    ws = seeded(st)
    st.fault = Fault(at=st.calls.count("put") + 1, kind=kind, method="put")  # the claim
    try:
        made = promote(ws, "unet", 2, title="best")
        assert kind == "retry" and made.model.title == "best"  # recognised as its own claim
    except (ConnectionError, Killed):
        assert kind != "retry"
        st.revive()
        with pytest.raises(ConflictError, match="already exists"):  # within the lease: taken
            promote(fresh(st), "unet", 2, title="best")
        with monkeypatch.context() as m:
            later(m)  # the lease expired: the next promote takes the title over
            assert promote(fresh(st), "unet", 2, title="best").model.title == "best"
    assert fresh(st).models["best"].checkpoint == 2


def test_doctor_clears_an_expired_claim(memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch) -> None:
    st = memory()
    ws = seeded(st)
    st.fault = Fault(at=st.calls.count("copy") + 1, kind="kill_before", method="copy")
    with pytest.raises(Killed):
        promote(ws, "unet", 2, title="best")
    st.revive()
    assert "models/best/.claim" in st.objects
    assert [r.action for r in doctor(fresh(st)) if r.path == "models/best"] == ["left alone: it may be in use"]
    with monkeypatch.context() as m:
        later(m)
        assert [r.action for r in doctor(fresh(st)) if r.path == "models/best"] == ["deleted"]
    assert not any(k.startswith("models/") for k in st.objects)


def test_a_promote_that_outlived_its_lease_stops_and_touches_nothing(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    st = memory()
    ws = seeded(st)
    real = st.copy

    def stalls(src: str, dst: str) -> None:  # while this promote stalls, its lease expires and another takes over
        st.copy = real  # type: ignore[method-assign]
        with monkeypatch.context() as m:
            later(m)
            promote(fresh(st), "unet", 3, title="best")
        real(src, dst)

    st.copy = stalls  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="already exists .checkpoint 3"):
        promote(ws, "unet", 2, title="best")
    assert fresh(st).models["best"].checkpoint == 3
    assert not picture(st)["problems"]


def test_memory_urls_are_for_tests_only(run: Any) -> None:
    result = run("init", "memory://nothing-mounted")
    assert result.exit_code == 2 and "unsupported workspace URL scheme" in result.stderr


def test_memory_store_conditional_writes() -> None:
    st = MemoryStorage()
    etag = st.put("k", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        st.put("k", b"2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        st.put("k", b"2", if_match='"other"')
    assert st.put("k", b"2", if_match=etag) != etag
    st.fault = Fault(at=len(st.calls) + 1, kind="retry")
    with pytest.raises(PreconditionFailed):  # the retry of a create that landed
        st.put("n", b"x", if_none_match=True)
    assert st.get("n")[0] == b"x"
    st.fault = Fault(at=len(st.calls) + 1, kind="kill_before")
    with pytest.raises(Killed):
        st.delete(["k"])
    with pytest.raises(Killed):  # a dead process makes no more calls
        st.get("k")
    st.revive()
    assert st.get("k")[0] == b"2"


# --- every fault at every call -----------------------------------------------------------------------


@pytest.mark.parametrize("at_once", [False, True], ids=["run-again-later", "run-again-at-once"])
@pytest.mark.parametrize("op", list(OPERATIONS))
def test_every_fault_at_every_call(
    memory: Callable[[], MemoryStorage], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, at_once: bool
) -> None:
    calls = one_fault(memory, tmp_path, monkeypatch, op, None)
    assert calls > 0
    for at, kind in itertools.product(range(1, calls + 1), KINDS):
        try:
            one_fault(memory, tmp_path, monkeypatch, op, Fault(at=at, kind=kind), at_once)
        except AssertionError as e:
            raise AssertionError(f"{op}: fault {kind!r} at call {at} of {calls}: {e}") from None


def test_a_landed_trash_whose_name_an_older_ckpt_dropped_is_still_finished(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    st = memory()
    ws = seeded(st)
    before = picture(st)
    puts = st.calls.count("put")
    st.fault = Fault(at=puts + 2, kind="kill_after", method="put")  # right after the manifest commit
    with pytest.raises(Killed):
        trash_unused_op(ws, "unet")
    st.revive()
    key = "tasks/unet/task.toml"
    assert b"trashing = [" in st.objects[key][0]
    # an older ckpt rewrites the manifest without the keys it does not know
    st.objects[key] = (st.objects[key][0].replace(b"trashing = [", b"ignored = ["), '"rewritten"', 0.0)
    with monkeypatch.context() as m:
        later(m)
        entries, _ = ckpt.trash.list_entries(fresh(st))
    assert [(e.state, e.numbers) for e in entries] == [("complete", [1, 2, 3])]
    check(st, before)


def test_restore_of_an_entry_missing_a_copy_changes_nothing(memory: Callable[[], MemoryStorage]) -> None:
    st = memory()
    entry = _entry(seeded(st))
    del st.objects[f"trash/{entry}/{FILES_DIR}/checkpoints/000002.pt"]  # damaged (an older ckpt's interrupted empty)
    snapshot = dict(st.objects)
    with pytest.raises(CkptError, match="missing the files of 1 checkpoint") as e:
        restore(fresh(st), entry)
    assert e.value.exit_code == 6
    assert st.objects == snapshot


def test_cli_shows_an_interrupted_empty(
    memory: Callable[[], MemoryStorage], run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = memory()
    monkeypatch.setenv("CKPT_WORKSPACE", st.url)
    ws = seeded(st)
    entry = _entry(ws)
    st.fault = Fault(at=st.calls.count("delete") + 1, kind="kill_after", method="delete")
    with pytest.raises(Killed):
        empty(ws, plan_empty(ws))
    st.revive()
    listed = run("trash", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [(e["id"], e["state"]) for e in json.loads(listed.stdout)] == [(entry, "emptying")]
    refused = run("trash", "restore", entry)
    assert refused.exit_code == 4 and "being emptied" in refused.stderr
    assert run("trash", "empty", "--yes").exit_code == 0
    assert not any(k.startswith("trash/") for k in st.objects)


# --- a sample on moto's S3 server: the same recognition against a real 412 -------------------------------


@pytest.mark.parametrize("op", ["save", "trash_unused"])
def test_s3_retried_commit_that_landed_is_recognised(s3_url: str, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    from ckpt.storage.s3 import S3Storage

    ws = ckpt.Workspace.init(s3_url)
    task = ws.create_task("unet")
    for i in range(3):
        task.save(f"weights {i}".encode(), step=i)
    real = S3Storage.put
    struck: list[str] = []

    def retried(self: S3Storage, key: str, data: bytes, **kw: Any) -> str:
        etag = real(self, key, data, **kw)
        # the commit (the manifest, or a save's log record): the response is lost, the client sends it again
        if (key.endswith("task.toml") or "/log/" in key) and not struck:
            struck.append(key)
            return real(self, key, data, **kw)  # moto answers 412: the ETag moved on, or the record exists
        return etag

    monkeypatch.setattr(S3Storage, "put", retried)
    ws = ckpt.Workspace.open(s3_url)
    if op == "save":
        assert ws.task("unet").save(b"landed", step=9) == 4
        assert [cp.number for cp in ckpt.Workspace.open(s3_url).task("unet").checkpoints] == [1, 2, 3, 4]
    else:
        entry = trash_unused_op(ws, "unet").entry
        assert entry is not None
        entries, _ = ckpt.trash.list_entries(ckpt.Workspace.open(s3_url))
        assert [(e.id, e.state, e.numbers) for e in entries] == [(entry, "complete", [1, 2])]
    assert struck
    assert verify(ckpt.Workspace.open(s3_url)).problems == []


def test_trash_unused_whose_commit_failed_leaves_no_entry(memory: Callable[[], MemoryStorage]) -> None:
    st = memory()
    ws = seeded(st)
    snapshot = {k: v[0] for k, v in st.objects.items()}
    st.fault = Fault(at=st.calls.count("put") + 2, kind="fail", method="put")  # the manifest commit
    with pytest.raises(ConnectionError):
        trash_unused_op(ws, "unet")
    assert {k: v[0] for k, v in st.objects.items()} == snapshot  # nothing changed, no pending entry left


def test_two_renames_of_one_model_never_make_two_models(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second rename run while the first has written its new record but not yet dropped the old one (the
    moment two machines' renames overlap worst) is refused: the model stays one."""
    from ckpt.models import promote, rename

    st = memory()
    ws = seeded(st, n=1)
    promote(ws, "unet", 1, title="m")
    real = store_models.drop_model
    seen: list[BaseException] = []

    def second_rename_meanwhile(w: Any, title: str, keys: list[str]) -> None:
        monkeypatch.setattr(store_models, "drop_model", real)
        try:
            rename(fresh(st), "m", "b")
        except ckpt.ConflictError as e:
            seen.append(e)
        real(w, title, keys)

    monkeypatch.setattr(store_models, "drop_model", second_rename_meanwhile)
    rename(ws, "m", "a")
    assert seen and "being renamed" in str(seen[0])
    ws = fresh(st)
    assert ws.models.titles() == ["a"]
    a = ws.models["a"]
    assert f"models/a/{a.file}" in st.objects  # its weights came along
    assert not any(k.endswith("/.moving") for k in st.objects)
    rename(ws, "a", "c")  # free again for the next rename
    assert fresh(st).models.titles() == ["c"]


def test_a_title_twinned_in_case_by_a_racer_is_refused_once_claimed(
    memory: Callable[[], MemoryStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two renames to `case` and `CASE` from two machines: each checked the titles before the other claimed.
    The one that claims second sees the other's claim and stops: never two titles that differ only in case."""
    from ckpt.models import promote, rename

    st = memory()
    ws = seeded(st, n=1)
    promote(ws, "unet", 1, title="p")
    promote(ws, "unet", 1, title="q")
    real = store_models.Lease.take

    def twin_made_meanwhile(self: Any) -> Any:
        monkeypatch.setattr(store_models.Lease, "take", real)
        rename(fresh(st), "q", "CASE")  # after this rename checked the titles, before it claims its own
        return real(self)

    monkeypatch.setattr(store_models.Lease, "take", twin_made_meanwhile)
    with pytest.raises(ckpt.ConflictError, match="only in case"):
        rename(ws, "p", "case")
    assert fresh(st).models.titles() == ["CASE", "p"]
    assert not any(k.startswith("models/case/") for k in st.objects)


def test_a_local_copy_changed_on_this_machine_is_downloaded_again(memory: Callable[[], MemoryStorage]) -> None:
    st = memory()
    ws = seeded(st, n=1)
    task = ws.task("unet")
    cp = task.checkpoint(1)
    path = task.local_path(cp)
    assert path.read_bytes() == b"weights 0"
    path.write_bytes(b"tampered, longer than it was")
    again = fresh(st).task("unet").local_path(cp)
    assert again.read_bytes() == b"weights 0"


def test_a_local_copy_changed_at_the_same_size_is_downloaded_again(memory: Callable[[], MemoryStorage]) -> None:
    import os
    import time

    st = memory()
    ws = seeded(st, n=1)
    task = ws.task("unet")
    cp = task.checkpoint(1)
    path = task.local_path(cp)
    time.sleep(0.01)
    path.write_bytes(b"weights X")  # same size, other bytes
    os.utime(path)
    assert fresh(st).task("unet").local_path(cp).read_bytes() == b"weights 0"
