"""Background saves (issue 18): the time a training loop is blocked by `task.save(state, background=True)`
of a 1 GiB state dict, against one in-memory copy of those tensors (target ≤ 1.5x) and against a
synchronous `task.save` of the same state (target ≤ 0.25x), all in one process, interleaved.

The blocked time is what `save(..., background=True)` takes to return, measured after the previous
background save was waited for (`task.wait()`, not counted), so each one pays for its own copy only.

    python benchmarks/bench_background_save.py [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import QUICK, info, ms, ratio

import ckpt

SIZE = (256 << 20) if QUICK else (1 << 30)
TENSOR = 64 << 20  # bytes per tensor: 16 tensors of 64 MiB make 1 GiB


def make_state() -> dict[str, torch.Tensor]:
    n = TENSOR // 4
    return {f"layer{i}.weight": torch.randn(n) for i in range(SIZE // TENSOR)}


def main() -> None:
    repeats = 2 if QUICK else 4
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-bg-"))
    try:
        state = make_state()
        ws = ckpt.Workspace.init(tmp / "ws")
        task = ws.create_task("T")
        copy_t, blocked_t, sync_t = [], [], []
        # warm: the allocator, the page cache, the worker thread's first start
        _ = {k: v.clone() for k, v in state.items()}
        task.save(state, background=True)
        task.wait()
        for _r in range(repeats):
            t0 = time.perf_counter()
            copied = {k: v.clone() for k, v in state.items()}
            copy_t.append(time.perf_counter() - t0)
            del copied
            t0 = time.perf_counter()
            task.save(state, background=True)
            blocked_t.append(time.perf_counter() - t0)
            task.wait()
            t0 = time.perf_counter()
            task.save(state)
            sync_t.append(time.perf_counter() - t0)
        copy, blocked, sync = (statistics.median(x) for x in (copy_t, blocked_t, sync_t))
        info(
            f"{SIZE >> 20} MiB state dict: blocked by a background save {ms(blocked)}, one in-memory copy "
            f"{ms(copy)}, a synchronous save {ms(sync)}"
        )
        ratio("background_save_blocked_vs_copy", blocked / copy, "<=1.5")
        ratio("background_save_blocked_vs_sync", blocked / sync, "<=0.25")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
