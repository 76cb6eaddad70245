"""Promoting a 1 GiB checkpoint (issue 3): the time `ckpt promote` takes beyond ckpt's own start-up
(a `ckpt models --json` in the same run) against `cp` of the same file. Target: at most 0.1x.

The checkpoint is written once through `Task.save_file` from a real (not sparse) file written in
chunks; every file is deleted at the end.

    python benchmarks/bench_promote.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from _bench import QUICK, bench_env, ckpt_script, info, ms, ratio, run_once

import ckpt

SIZE = 1 << 30
CHUNK = 16 << 20


def write_big(path: Path) -> None:
    block = bytearray(os.urandom(CHUNK))
    with open(path, "wb") as f:
        for i in range(SIZE // CHUNK):
            block[:8] = i.to_bytes(8, "little")  # no two chunks alike
            f.write(block)


def main() -> None:
    repeats = 3 if QUICK else 7
    ck = ckpt_script()
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-promote-"))
    try:
        src = tmp / "big.pt"
        write_big(src)
        ws = ckpt.Workspace.init(tmp / "ws")
        task = ws.create_task("T")
        task.save_file(src, step=1, metrics={"val_iou": 0.5})
        src.unlink()
        checkpoint = task.path_of(task.checkpoint(1))
        env = bench_env(ws.root)
        models = [ck, "models", "--json"]
        run_once(models, env)  # bytecode and page cache
        run_once(["cp", str(checkpoint), str(tmp / "warm.copy")], env)
        (tmp / "warm.copy").unlink()
        start_t, promote_t, cp_t = [], [], []
        for r in range(repeats):
            start_t.append(run_once(models, env))
            promote_t.append(run_once([ck, "promote", "T", "1", "--title", f"big-{r}", "--json"], env))
            copy = tmp / f"copy-{r}.pt"
            cp_t.append(run_once(["cp", str(checkpoint), str(copy)], env))
            copy.unlink()
        start, promote, cp = (statistics.median(x) for x in (start_t, promote_t, cp_t))
        storages = {m.storage for m in ckpt.Workspace.open(ws.root).models}
        beyond = max(0.0, promote - start)
        info(
            f"1 GiB checkpoint: ckpt promote {ms(promote)} ({', '.join(sorted(storages))}), "
            f"ckpt models --json {ms(start)}, so {ms(beyond)} beyond start-up; cp {ms(cp)}"
        )
        ratio("promote_1gib_beyond_startup_vs_cp", beyond / cp, "<=0.1")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
