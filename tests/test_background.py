"""Background saves: `task.save(state, background=True)` (ckpt.background)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.background import PendingSave
from ckpt.errors import ConflictError, UsageError


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value), "b": torch.arange(8, dtype=torch.float32) * value}


def test_background_saves_commit_in_order_with_their_metrics(any_ws: ckpt.Workspace) -> None:
    task = any_ws.create_task("bg")
    pending = [task.save(_state(i), step=i * 10, metrics={"loss": 1.0 / (i + 1)}, background=True) for i in range(4)]
    assert all(isinstance(p, PendingSave) for p in pending)
    task.wait()
    assert [p.result() for p in pending] == [1, 2, 3, 4]
    cps = any_ws.task("bg").checkpoints
    assert [(cp.number, cp.step) for cp in cps] == [(1, 0), (2, 10), (3, 20), (4, 30)]
    assert cps[2].metrics == {"loss": pytest.approx(1 / 3)}
    loaded = torch.load(any_ws.task("bg").local_path(cps[3]), weights_only=True)
    assert torch.equal(loaded["w"], torch.full((64, 64), 3.0))


def test_the_state_is_copied_before_save_returns(ws: ckpt.Workspace) -> None:
    task = ws.create_task("copy")
    state = _state(1.0)
    pending = task.save(state, background=True)
    state["w"].fill_(99.0)  # training goes on and changes its tensors at once
    state["b"].zero_()
    number = pending.result()
    saved = torch.load(task.path_of(task.checkpoint(number)), weights_only=True)
    assert torch.equal(saved["w"], torch.full((64, 64), 1.0))
    assert torch.equal(saved["b"], torch.arange(8, dtype=torch.float32))


def test_a_failed_background_save_is_raised_at_the_next_save_and_at_wait(ws: ckpt.Workspace) -> None:
    task = ws.create_task("fails")
    task.save(_state(1.0), background=True).result()
    from ckpt.models import finish

    finish(ws, "fails")
    pending = task.save(_state(2.0), background=True)
    with pytest.raises(ConflictError, match="finished"):
        pending.result()
    with pytest.raises(ConflictError, match="finished"):  # told once more, at the next save...
        task.save(_state(3.0), background=True)
    task.wait()  # ...and then no more
    assert [cp.number for cp in ws.task("fails").checkpoints] == [1]


def test_bad_arguments_are_refused_at_once_not_in_the_worker(ws: ckpt.Workspace) -> None:
    task = ws.create_task("args")
    with pytest.raises(UsageError):
        task.save(_state(1.0), metrics={"loss": "low"}, background=True)  # type: ignore[dict-item]
    with pytest.raises(UsageError):
        task.save(_state(1.0), step="7", background=True)  # type: ignore[call-overload]
    task.wait()
    assert ws.task("args").checkpoints == []


def test_finish_waits_for_the_outstanding_save(ws: ckpt.Workspace) -> None:
    task = ws.create_task("fin")
    task.save(_state(1.0), background=True)
    task.save(_state(2.0), background=True)
    model = task.finish()
    assert model is not None and model.checkpoint == 2
    assert ws.task("fin").status == "finished"


def _script(root: Path, body: str) -> list[str]:
    code = textwrap.dedent(
        f"""
        import sys, torch, ckpt
        ws = ckpt.Workspace.open({str(root)!r})
        task = ws.task("run")
        """
    ) + textwrap.dedent(body)
    return [sys.executable, "-c", code]


def test_interpreter_exit_waits_for_pending_saves(ws: ckpt.Workspace) -> None:
    ws.create_task("run")
    res = subprocess.run(
        _script(ws.root, 'task.save({"w": torch.ones(256, 256)}, step=5, background=True)\nprint("returned")\n'),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "returned"
    assert [(cp.number, cp.step) for cp in ws.task("run").checkpoints] == [(1, 5)]


def test_a_kill_during_background_writes_leaves_no_record_without_its_file(ws: ckpt.Workspace) -> None:
    ws.create_task("run")
    # large saves, one after another, killed while the worker writes
    proc = subprocess.Popen(
        _script(
            ws.root,
            """
            for i in range(1000):
                task.save({"w": torch.full((2048, 2048), float(i))}, step=i, background=True)
                print(i, flush=True)
            """,
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    task = ckpt.Workspace.open(ws.root).task("run")
    cps = task.checkpoints
    assert len(cps) >= 2  # three saves had returned: the first two at least were committed
    assert [cp.number for cp in cps] == list(range(1, len(cps) + 1))
    for cp in cps:
        saved = torch.load(task.path_of(cp), weights_only=True)
        assert torch.equal(saved["w"], torch.full((2048, 2048), float(cp.step)))  # type: ignore[arg-type]
    from ckpt.doctor import doctor
    from ckpt.verify import verify

    # a kill between a file's rename and its record left that save's record beside the manifest: doctor (or
    # the next save) records it, as the save would have
    repairs = doctor(ckpt.Workspace.open(ws.root))
    assert [r.action for r in repairs] in ([], [f"recorded it as checkpoint {len(cps) + 1}"]), repairs
    after = ckpt.Workspace.open(ws.root).task("run").checkpoints
    assert [cp.number for cp in after] == list(range(1, len(after) + 1))
    for cp in after[len(cps) :]:
        saved = torch.load(task.path_of(cp), weights_only=True)
        assert torch.equal(saved["w"], torch.full((2048, 2048), float(cp.step)))  # type: ignore[arg-type]
    assert verify(ckpt.Workspace.open(ws.root), ["run"]).ok


def test_saves_from_several_threads_are_all_committed_in_turn(ws: ckpt.Workspace) -> None:
    import threading

    task = ws.create_task("threads")
    pendings: list[PendingSave] = []
    lock = threading.Lock()

    def saver(k: int) -> None:
        for i in range(4):
            p = task.save(f"{k}-{i}".encode(), metrics={"k": float(k)}, background=True)
            with lock:
                pendings.append(p)

    threads = [threading.Thread(target=saver, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a saving thread hung"
    task.wait()
    assert sorted(p.result(timeout=10) for p in pendings) == list(range(1, 17))
    payloads = {task.path_of(cp).read_bytes() for cp in ws.task("threads").checkpoints}
    assert payloads == {f"{k}-{i}".encode() for k in range(4) for i in range(4)}


def test_tensors_that_share_storage_still_share_it(ws: ckpt.Workspace) -> None:
    task = ws.create_task("tied")
    w = torch.randn(256, 256)
    n = task.save({"emb": w, "head": w, "view": w[:10], "t": w.t()}, background=True).result()
    sync = task.save({"emb": w, "head": w, "view": w[:10], "t": w.t()})
    records = {cp.number: cp for cp in task.checkpoints}
    assert records[n].size == records[sync].size  # one storage written, as a synchronous save writes
    back = torch.load(task.path_of(records[n]), weights_only=True)
    assert back["emb"].untyped_storage().data_ptr() == back["head"].untyped_storage().data_ptr()
    assert torch.equal(back["view"], w[:10]) and torch.equal(back["t"], w.t())


def test_the_host_copy_is_freed_once_committed(ws: ckpt.Workspace) -> None:
    import gc
    import weakref

    from ckpt.background import host_copy

    task = ws.create_task("freed")
    copies: list[weakref.ref[torch.Tensor]] = []
    real = host_copy

    def spy(obj: object) -> object:
        out = real(obj)
        copies.append(weakref.ref(out["w"]))  # type: ignore[index]
        return out

    import ckpt.background as bg

    bg.host_copy = spy  # type: ignore[assignment]
    try:
        task.save({"w": torch.ones(64, 64)}, background=True).result()
    finally:
        bg.host_copy = real  # type: ignore[assignment]
    gc.collect()
    assert copies and copies[0]() is None


def test_a_meta_tensor_saves_as_a_synchronous_save_does(ws: ckpt.Workspace) -> None:
    task = ws.create_task("meta")
    n = task.save({"m": torch.empty(3, device="meta"), "w": torch.ones(2)}, background=True).result()
    assert n == 1


def test_an_error_raised_at_the_next_save_names_the_save_it_belongs_to(ws: ckpt.Workspace) -> None:
    import threading as th

    task = ws.create_task("named")
    task.save({"lock": th.Lock()}, step=7, background=True)  # cannot be pickled
    with pytest.raises(Exception) as info:
        task.save(b"next", background=True)
    assert "step 7" in "".join(getattr(info.value, "__notes__", []))
    task.wait()


def test_a_failed_save_no_call_reported_is_said_at_exit_with_status_1(ws: ckpt.Workspace) -> None:
    ws.create_task("run")
    res = subprocess.run(
        _script(ws.root, 'import threading\ntask.save({"l": threading.Lock()}, step=3, background=True)\n'),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert "background save of task 'run', step 3 failed" in res.stderr
    assert "Traceback" not in res.stderr
