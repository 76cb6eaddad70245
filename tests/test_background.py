"""Background saves (ckpt.background): a host copy, then the write and commit on a worker thread, in order,
errors raised at the next save or wait, and nothing lost when the process is killed mid-write."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ckpt

torch = pytest.importorskip("torch")


def test_background_saves_commit_in_order_from_a_host_copy(any_ws: ckpt.Workspace) -> None:
    task = any_ws.create_task("run")
    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "n": 3}
    first = task.save(weights, step=1, metrics={"loss": 0.5}, background=True)
    weights["w"].add_(100)  # changed once save returned: the copy it took must not see this
    second = task.save(weights, step=2, background=True)
    third = task.save(b"plain bytes", step=3)  # a synchronous save commits after the pending one
    assert (first.result(), second.result(), third) == (1, 2, 3)
    task.wait()
    cps = task.checkpoints
    assert [(cp.number, cp.step) for cp in cps] == [(1, 1), (2, 2), (3, 3)] and cps[0].metrics == {"loss": 0.5}
    saved = torch.load(task.local_path(cps[0]), weights_only=True)
    assert torch.equal(saved["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4)) and saved["n"] == 3
    assert torch.equal(torch.load(task.local_path(cps[1]), weights_only=True)["w"], weights["w"])


def test_an_error_in_the_worker_is_raised_at_the_next_save_or_wait(ws: ckpt.Workspace) -> None:
    task = ws.create_task("run")
    task.save(b"one", background=True)
    ws.task("run").finish(failed=True)  # meanwhile, elsewhere: the task takes no new checkpoints
    pending = task.save(b"two", background=True)
    with pytest.raises(ckpt.ConflictError, match="takes no new checkpoints"):
        task.wait()
    assert isinstance(pending.exception(), ckpt.ConflictError)
    task.wait()  # raised once
    with pytest.raises(ckpt.UsageError):  # checked before anything is copied or queued
        task.save(b"three", metrics={"loss": "low"}, background=True)  # type: ignore[dict-item]
    other = ws.create_task("other")
    other.save(b"x", background=True)
    other_task_again = ws.task("other")
    other_task_again.finish(failed=True)
    other.save(b"y", background=True)
    with pytest.raises(ckpt.ConflictError):
        other.save(b"z", background=True)  # the next save raises the pending one's error and queues nothing
    assert [cp.number for cp in other.checkpoints] == [1]


def test_finish_waits_for_the_pending_save(ws: ckpt.Workspace) -> None:
    task = ws.create_task("run")
    task.save({"w": torch.ones(1000)}, background=True)
    model = task.finish()
    assert model is not None and model.checkpoint == 1


CHILD = textwrap.dedent(
    """
    import sys, torch, ckpt
    task = ckpt.Workspace.init(sys.argv[1]).create_task("run")
    weights = {"w": torch.randn(256, 1024)}  # 1 MiB
    pending = None
    for step in range(1, 100000):
        weights["w"].add_(1)
        done = pending.result() if pending is not None else None
        if done is not None:
            print(done, flush=True)  # committed: must survive the kill
        pending = task.save(weights, step=step, background=True)
    """
)


def test_a_kill_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    ws_path = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if k != "CKPT_WORKSPACE"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ws_path)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    committed = [int(child.stdout.readline()) for _ in range(5)]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    task = ckpt.Workspace.open(ws_path).task("run")
    numbers = [cp.number for cp in task.checkpoints]
    assert set(committed) <= set(numbers) and numbers == list(range(1, len(numbers) + 1))
    for cp in task.checkpoints:  # every record has its whole file
        assert hashlib.sha256(task.path_of(cp).read_bytes()).hexdigest() == cp.sha256
