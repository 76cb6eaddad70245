"""Background saves: `task.save(state_dict, background=True)` copies the tensors to host memory and returns;
a worker thread writes, fsyncs, hashes and commits the copy (the same `Task.save` as ever, so a crash
mid-write leaves no record without its file), in save order, with at most one save pending: a further
background save first waits for it. `task.wait()` (and `finish`, and the interpreter's exit) waits for the
pending save; an error in the worker is raised by the next `save` or `wait` of the task.

It returns a `concurrent.futures.Future`: the checkpoint's number is known only once its record is committed
(`future.result()` waits for it).
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .workspace import Task


class _Writer:
    """The one worker thread of a task's background saves, and the save it has pending."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: Future[int] | None = None
        self.thread: threading.Thread | None = None

    def settle(self) -> None:
        """Wait for the pending save; raise its error (once)."""
        with self.lock:
            pending, thread = self.pending, self.thread
        if thread is not None:
            thread.join()
        if pending is not None:
            with self.lock:
                if self.pending is pending:
                    self.pending, self.thread = None, None
            error = pending.exception()
            if error is not None:
                raise error

    def start(self, job: Any) -> Future[int]:
        from concurrent.futures import Future

        future: Future[int] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():  # pragma: no cover (never cancelled)
                return
            try:
                future.set_result(job())
            except BaseException as e:  # handed to the training thread at its next save or wait
                future.set_exception(e)

        thread = threading.Thread(target=run, name="ckpt-background-save", daemon=True)
        with self.lock:
            self.pending, self.thread = future, thread
        thread.start()
        return future


_writers: dict[tuple[str, str], _Writer] = {}
_writers_lock = threading.Lock()
_at_exit = False


def _writer(task: Task, make: bool) -> _Writer | None:
    global _at_exit
    key = (task.ws.location, task.name)
    with _writers_lock:
        w = _writers.get(key)
        if w is None and make:
            w = _writers[key] = _Writer()
            if not _at_exit:
                atexit.register(_wait_all)
                _at_exit = True
        return w


def host_copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """`obj` with every tensor copied to host memory (dicts, lists and tuples walked; other values as they
    are). A tensor met twice is copied once."""
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        got = memo.get(id(obj))
        if got is None:
            got = memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return got
    if isinstance(obj, Mapping):
        copied = {k: host_copy(v, memo) for k, v in obj.items()}
        try:
            return type(obj)(copied)  # type: ignore[call-arg]  # an OrderedDict stays one
        except TypeError:
            return copied
    if isinstance(obj, list):
        return [host_copy(v, memo) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(host_copy(v, memo) for v in obj)
    return obj


def save(task: Task, obj: Any, **kw: Any) -> Future[int]:
    """Copy `obj` to host memory and save it into `task` on the worker thread; see the module's text.

    Raises, before copying anything, the error of the previous background save of the task."""
    writer = _writer(task, make=True)
    assert writer is not None
    writer.settle()  # at most one pending; its error surfaces here
    copied = obj if isinstance(obj, bytes | bytearray | memoryview | str) or hasattr(obj, "__fspath__") else None
    if copied is None:
        copied = host_copy(obj)
    elif isinstance(obj, bytearray | memoryview):
        copied = bytes(obj)  # the caller may change its buffer once we return
    return writer.start(lambda: task.save(copied, **kw))


def settle(task: Task) -> None:
    """Wait for the task's pending background save and raise its error; nothing on the worker thread itself
    (whose own save is the pending one)."""
    writer = _writer(task, make=False) if _writers else None
    if writer is not None and writer.thread is not threading.current_thread():
        writer.settle()


def _wait_all() -> None:
    with _writers_lock:
        writers = list(_writers.values())
    for w in writers:
        try:
            w.settle()
        except BaseException as e:  # at exit: said, not raised into the interpreter's teardown
            import sys

            sys.stderr.write(f"ckpt: a background save failed: {e}\n")
