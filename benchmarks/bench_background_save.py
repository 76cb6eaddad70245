"""How long a training loop is blocked by saving a 1 GiB state dict, with `task.save(..., background=True)`.

In one run, in turn (so that load on the machine hits each): one in-memory copy of the tensors (`clone`), a
background save (the time until it returns; its write is then waited for, untimed), and a synchronous
`task.save` (write, fsync, sha256, commit). Targets (issue 18): blocked <= 1.5x one copy, <= 0.25x a
synchronous save. `--quick`: two rounds instead of three.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _bench import QUICK, info, ratio

import ckpt

GIB = 1 << 30


def main() -> None:
    import torch

    n = 16
    weights = {f"layer{i}.weight": torch.randn(GIB // 4 // n) for i in range(n)}  # 16 x 64 MiB float32
    assert sum(t.numel() * t.element_size() for t in weights.values()) == GIB
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-bg-"))
    try:
        ws = ckpt.Workspace.init(root / "ws")
        copies: list[float] = []
        blocked: list[float] = []
        syncs: list[float] = []
        for i in range(2 if QUICK else 3):
            task = ws.create_task(f"bg{i}")
            start = time.perf_counter()
            copy = {k: v.clone() for k, v in weights.items()}
            copies.append(time.perf_counter() - start)
            del copy
            start = time.perf_counter()
            pending = task.save(weights, step=1, background=True)
            blocked.append(time.perf_counter() - start)
            pending.result()  # the write, untimed: the training loop would be computing meanwhile
            start = time.perf_counter()
            task.save(weights, step=2)
            syncs.append(time.perf_counter() - start)
            shutil.rmtree(task.folder)  # keep the disk from filling: 2 GiB a round
        copy_s, blocked_s, sync_s = (statistics.median(x) for x in (copies, blocked, syncs))
        info(f"1 GiB: one copy {copy_s:.3f} s, background save blocks {blocked_s:.3f} s, sync save {sync_s:.3f} s")
        ratio("background_blocked_vs_one_copy", blocked_s / copy_s, "<=1.5")
        ratio("background_blocked_vs_sync_save", blocked_s / sync_s, "<=0.25")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
