"""Background saves: `task.save(state, background=True)`.

The training thread pays only for a copy of the tensors in host memory; a worker thread writes, fsyncs,
hashes and commits each save in the order given, through the same steps as a synchronous save (so a
crash mid-write leaves no record without its file). At most one save is outstanding: a further save
first waits for it, so host memory holds at most one extra copy of the state. An error in the worker is
raised by the next `save` or `wait` of the task. Every pending save is waited for at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["PendingSave", "Writer", "host_copy", "writer_for"]


class PendingSave:
    """A save handed to the background writer. Its checkpoint number is known once it is committed:
    `result()` waits for that and returns it (or raises the save's error); `done()` says whether it ended."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._number: int | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> int:
        """The checkpoint's number, once committed; raises the save's error, or TimeoutError."""
        if not self._event.wait(timeout):
            raise TimeoutError("the background save has not finished yet")
        if self._error is not None:
            raise self._error
        assert self._number is not None
        return self._number

    @property
    def number(self) -> int:
        return self.result()

    def __repr__(self) -> str:
        if not self.done():
            return "PendingSave(pending)"
        return f"PendingSave(error={self._error!r})" if self._error else f"PendingSave(number={self._number})"


def writer_for(key: tuple[str, str]) -> Writer:
    """The writer of task `key` (workspace location, task name): one per task in the process, so that
    `ws.task(name).wait()` waits for what another handle of the same task saved."""
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            writer = _WRITERS[key] = Writer(key[1])
        return writer


class Writer:
    """One worker thread of one task: runs the saves handed to it, one at a time, in order."""

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._current: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._job: tuple[Callable[[], int], PendingSave] | None = None
        self._ready = threading.Condition(self._lock)
        self._error: BaseException | None = None  # of a save no one has been told of yet
        _LIVE.add(self)

    def submit(self, run: Callable[[], int]) -> PendingSave:
        """Hand `run` (which commits a save and returns its number) to the worker; the caller has waited."""
        pending = PendingSave()
        with self._lock:
            self._job = (run, pending)
            self._current = pending
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name=f"ckpt-save-{self._name}", daemon=True)
                self._thread.start()
            self._ready.notify()
        return pending

    def wait(self) -> None:
        """Wait for the outstanding save; raise the error of a save that failed since the last call."""
        current = self._current
        if current is not None:
            current._event.wait()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._job is None:
                    if not self._ready.wait(timeout=5.0) and self._job is None:
                        self._thread = None  # idle: the thread ends; the next submit starts another
                        return
                run, pending = self._job
                self._job = None
            try:
                pending._number = run()
            except BaseException as e:  # handed to the training thread at its next save or wait
                pending._error = e
                with self._lock:
                    self._error = e
            finally:
                pending._event.set()


_LIVE: weakref.WeakSet[Writer] = weakref.WeakSet()
_WRITERS: dict[tuple[str, str], Writer] = {}
_WRITERS_LOCK = threading.Lock()


@atexit.register
def _wait_all() -> None:
    """At interpreter exit, let every outstanding save finish (its error, if any, is lost with the process)."""
    for writer in list(_LIVE):
        current = writer._current
        if current is not None:
            current._event.wait()


def host_copy(obj: Any) -> Any:
    """A copy of `obj` whose tensors are in host memory and no longer shared with the caller's, so training
    may change its own at once; containers are copied, other leaves kept (they are not changed in place by
    training). Bytes are copied too."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    copier = _tensor_copier()

    def walk(x: Any) -> Any:
        if copier is not None and copier[0](x):
            return copier[1](x)
        if isinstance(x, dict):
            return type(x)((k, walk(v)) for k, v in x.items())  # an OrderedDict stays one
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(walk(v) for v in x)
        return x

    return walk(obj)


def _tensor_copier() -> tuple[Callable[[Any], bool], Callable[[Any], Any]] | None:
    """(is a tensor, copy it to host memory) when torch is imported (a state dict of tensors needs it)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None

    def copy(t: Any) -> Any:
        t = t.detach()
        if t.device.type == "cpu":
            return t.clone()
        return t.to("cpu", copy=True)

    return (lambda x: isinstance(x, torch.Tensor)), copy
