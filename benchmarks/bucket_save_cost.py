"""Requests and metadata bytes per save into a bucket task, at the Nth checkpoint (docs/s3.md, "Saves: the log").

Runs on the in-memory store (ckpt.storage.memory), counting every primitive call and the bytes each sends
and receives, less the checkpoints' own bytes (their uploads are not counted). Each figure is the mean over one
fold cycle (FOLD_EVERY saves) ending at the checkpoint named: a fold's commit is spread over the saves that led
to it; and over one merge cycle (FAN fold cycles, where the task has that many saves): a merge of segments
(ckpt.store_segments) is spread over the saves whose folds made them.

    python benchmarks/bucket_save_cost.py 10 2000 10000
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import ckpt
from ckpt import store
from ckpt.storage import Blob
from ckpt.storage.memory import MemoryStorage, mounted
from ckpt.store_log import FOLD_EVERY
from ckpt.store_segments import FAN

PAYLOAD = b"x" * 64  # the checkpoint itself (its bytes are not counted)


class Clock:
    """store's `time` module with a monotonic clock the loop moves on."""

    now = 0.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


class Counting(MemoryStorage):
    def __init__(self, url: str):
        super().__init__(url)
        self.sent = self.received = self.listed = 0

    def get(self, key: str) -> tuple[bytes, str]:
        data, etag = super().get(key)
        self.received += len(data)
        return data, etag

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        got = super().get_if_changed(key, etag)
        self.received += len(got[0]) if got else 0
        return got

    def put(self, key: str, data: bytes, **kw: object) -> str:  # (`upload`, the checkpoint's, is not counted)
        self.sent += len(data)
        return super().put(key, data, **kw)  # type: ignore[arg-type]

    def list_prefix(self, prefix: str) -> list[Blob]:
        out = super().list_prefix(prefix)
        self.listed += len(out)
        return out


def main(marks: list[int]) -> None:
    os.environ.setdefault("CKPT_CACHE", tempfile.mkdtemp(prefix="ckpt-bench-cache-"))
    clock = Clock()
    store.time = clock  # type: ignore[assignment]  # saves a minute apart: each revalidates what it read
    st = Counting("memory://bench")
    with mounted(st):
        task = ckpt.Workspace.init(st.url).create_task("unet")
        rows = []
        for n in range(1, max(marks) + 1):
            clock.now += 60.0
            before = (len(st.calls), st.sent, st.received, st.listed)
            task.save(PAYLOAD, step=n, metrics={"val_iou": n / 1e4, "loss": 1 / n})
            now = (len(st.calls), st.sent, st.received, st.listed)
            rows.append((n, *(a - b for a, b in zip(now, before, strict=True))))
        manifest = len(st.objects["tasks/unet/task.toml"][0])
        for label in ("warm", "cold"):  # a reader on this machine (its cache), then on another one
            if label == "cold":
                os.environ["CKPT_CACHE"] = tempfile.mkdtemp(prefix="ckpt-bench-cold-")
            start = len(st.calls)
            assert ckpt.Workspace.open(st.url).task("unet").checkpoints
            print(f"{label} read of the task: {len(st.calls) - start} requests ({', '.join(st.calls[start:])})")
    print(f"FOLD_EVERY={FOLD_EVERY}; task.toml at the end: {manifest:,} bytes")
    for cycle, what in ((FOLD_EVERY, "the fold cycle"), (FOLD_EVERY * FAN, "the merge cycle")):
        print(f"checkpoint  requests/save  sent B/save  received B/save  keys listed/save  (mean over {what})")
        for m in marks if cycle == FOLD_EVERY else [m for m in marks if m >= cycle]:
            window = [r for r in rows if max(m, cycle) - cycle < r[0] <= max(m, cycle)]
            k = len(window)
            print(
                f"{m:>10,}  {sum(r[1] for r in window) / k:>13.2f}  {sum(r[2] for r in window) / k:>11,.0f}"
                f"  {sum(r[3] for r in window) / k:>15,.0f}  {sum(r[4] for r in window) / k:>16.1f}"
            )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 1000])
