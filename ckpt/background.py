"""Background saves: `task.save(state, background=True)`.

The caller pays only for a copy of the tensors in host memory; a worker thread writes, fsyncs, hashes and
commits the save through the same steps as a synchronous save (so a crash mid-write leaves no record
without its file). One save per task is outstanding at most: a further save, from any thread, first
waits for it, so host memory holds at most one extra copy of the state, freed once it is committed.
Saves are committed in the order they were made. An error in the worker is raised by the next `save`
or `wait` of the task (with a note saying which save it was); one that no later call reported is said
on stderr at interpreter exit, which then exits 1.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PendingSave", "Writer", "host_copy", "writer_for"]


class PendingSave:
    """A save handed to the background writer. Its checkpoint number is known once it is committed:
    `result()` (or `.number`) waits for that and returns it, or raises the save's error; `done()` says
    whether it has ended."""

    def __init__(self, what: str) -> None:
        self.what = what  # "task 'unet', step 300": said with its error
        self._event = threading.Event()
        self._number: int | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> int:
        """The checkpoint's number, once committed; raises the save's error, or TimeoutError."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"the background save of {self.what} has not finished yet")
        if self._error is not None:
            raise self._error
        assert self._number is not None
        return self._number

    @property
    def number(self) -> int:
        """The checkpoint's number: waits for the commit (as `result()`)."""
        return self.result()

    def __repr__(self) -> str:
        if not self.done():
            return f"PendingSave({self.what}, pending)"
        if self._error is not None:
            return f"PendingSave({self.what}, error={self._error!r})"
        return f"PendingSave({self.what}, number={self._number})"


class Writer:
    """The background saves of one task in this process: one at a time, in order, each on its own thread."""

    def __init__(self, name: str):
        self.name = name
        self._turn = threading.Lock()  # one saver at a time: wait for the last save, copy, hand over
        self._last: PendingSave | None = None
        self._unreported: PendingSave | None = None  # a failed save no save/wait has raised yet
        self._guard = threading.Lock()

    def save(self, what: str, prepare: Callable[[], Any], commit: Callable[[Any], int]) -> PendingSave:
        """Wait for the outstanding save (raising its error), then `prepare()` the host copy here and hand
        it to a new thread that runs `commit(copy)`."""
        with self._turn:
            self._settle()
            data = prepare()
            pending = PendingSave(what)
            self._last = pending
            thread = threading.Thread(target=self._run, args=(pending, commit, data), name=f"ckpt-save-{self.name}")
            del data  # the thread holds the only reference: the copy is freed when it is committed
            thread.start()
            return pending

    def wait(self) -> None:
        """Wait for the outstanding save; raise the error of a save that failed and was not reported yet."""
        with self._turn:
            self._settle()

    def _settle(self) -> None:
        last = self._last
        if last is not None:
            last._event.wait()
        with self._guard:
            failed, self._unreported = self._unreported, None
        if failed is not None and failed._error is not None:
            error = failed._error
            error.add_note(f"(raised by the earlier background save of {failed.what})")
            raise error

    def _run(self, pending: PendingSave, commit: Callable[[Any], int], data: Any) -> None:
        try:
            pending._number = commit(data)
        except BaseException as e:  # handed to the caller at its next save or wait
            pending._error = e
            with self._guard:
                self._unreported = pending
        finally:
            del data
            pending._event.set()


_WRITERS: dict[tuple[str, str], Writer] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(key: tuple[str, str]) -> Writer:
    """The writer of task `key` (workspace location, task name): one per task in the process, so that
    `ws.task(name).wait()` waits for what another handle of the same task saved."""
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            writer = _WRITERS[key] = Writer(key[1])
        return writer


@atexit.register
def _wait_all() -> None:
    """At interpreter exit, let every outstanding save finish; a failure no call reported is said on stderr
    and the process exits 1, so that a job whose last checkpoint was lost does not report success."""
    lost = []
    for writer in list(_WRITERS.values()):
        last = writer._last
        if last is not None:
            last._event.wait()
        failed = writer._unreported
        if failed is not None and failed._error is not None:
            lost.append(failed)
    if not lost:
        return
    for p in lost:
        sys.stderr.write(f"ckpt: error: the background save of {p.what} failed: {p._error}; it was not saved\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def host_copy(obj: Any) -> Any:
    """A copy of `obj` whose tensors are in host memory and no longer shared with the caller's, so training
    may change its own at once. Tensors that share storage (tied weights, views) still share it in the
    copy, which holds each storage once; containers are copied, other leaves kept. Bytes are copied."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    torch: Any = sys.modules.get("torch")  # a state dict of tensors has imported it
    storages: dict[tuple[Any, ...], Any] = {}

    def tensor(t: Any) -> Any:
        t = t.detach()
        if t.device.type == "meta":
            return t  # no data to copy
        if t.layout != torch.strided or t.is_quantized:
            return t.to("cpu", copy=True)  # sparse and quantized tensors: copied whole, aliasing not kept
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr(), st.nbytes())
        new = storages.get(key)
        if new is None:
            new = storages[key] = st.clone() if t.device.type == "cpu" else st.cpu()
        out = torch.empty(0, dtype=t.dtype)
        out.set_(new, t.storage_offset(), t.size(), t.stride())
        return out

    def walk(x: Any) -> Any:
        if torch is not None and isinstance(x, torch.Tensor):
            return tensor(x)
        if isinstance(x, dict):
            return type(x)((k, walk(v)) for k, v in x.items())  # an OrderedDict stays one
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(walk(v) for v in x)
        return x

    return walk(obj)
