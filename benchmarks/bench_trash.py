"""trash-unused on a task of 1,000 checkpoints, against one `mv` of the same 1,000 files.

The figure is the time trash-unused takes beyond ckpt's own start-up (a `ckpt tasks --json` timed
in the same run), divided by the time of one `mv` of the same files into a folder on the same file
system. Target: at most 3.

    python benchmarks/bench_trash.py [--checkpoints 1000] [--repeat 21]

The last lines are `RATIO <name> <value> <target>`, one per figure, for benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ckpt

ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "CKPT_WORKSPACE")}
CKPT = [sys.executable, "-m", "ckpt"]
SETTLE_S = 2.1


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def build(root: Path, n: int) -> None:
    ws = ckpt.Workspace.init(root)
    task = ws.create_task("big")
    for i in range(n):
        task.save(os.urandom(1024), step=i, metrics={"val_iou": (i % 97) / 100})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-trash-") as tmp:
        base = Path(tmp)
        template = base / "template"
        build(template, args.checkpoints)
        subprocess.run([*CKPT, "-w", str(template), "tasks", "--json"], env=ENV, check=True, stdout=subprocess.DEVNULL)
        # every copy first (trash-unused changes its workspace, so each run gets its own), then one wait
        workspaces, mv_trees = [], []
        for i in range(args.repeat):
            workspaces.append(base / f"ws-{i}")
            mv_trees.append(base / f"mv-{i}")
            shutil.copytree(template, workspaces[-1], symlinks=True)
            shutil.copytree(template, mv_trees[-1], symlinks=True)
        # `ckpt tasks` keeps a task's row only once its manifest is 2 s old (workspace.SETTLED_NS: a newer
        # one could change again within the same ctime tick); wait for that, or whether the timed start-up
        # finds the row would depend on how long the copy and the sync took (it moved the figure by ±40 ms)
        time.sleep(SETTLE_S)
        for ws in workspaces:
            # a copy has new inodes, so its manifest's derived cache is stale: refresh it untimed, so that
            # both timed commands read the cache and the difference is trash-unused's own work
            subprocess.run([*CKPT, "-w", str(ws), "tasks", "--json"], env=ENV, check=True, stdout=subprocess.DEVNULL)
        startup, trash, mv = [], [], []
        for ws, moved in zip(workspaces, mv_trees, strict=True):
            # what earlier runs wrote is still in the file system's journal: without a sync, trash-unused's
            # first fsync would commit it too (mv, which does not fsync, never pays for it)
            os.sync()
            startup.append(timed([*CKPT, "-w", str(ws), "tasks", "--json"]))
            trash.append(timed([*CKPT, "-w", str(ws), "trash-unused", "big", "--json"]))
            cdir = moved / "tasks" / "big" / "checkpoints"
            files = sorted(str(p) for p in cdir.iterdir())
            dest = moved / "trash" / "by-mv"
            dest.mkdir()
            os.sync()  # as before trash-unused: each command pays for its own writes only
            mv.append(timed(["mv", *files, str(dest)]))
    # one process's wall time here swings by ±30 ms from run to run (start-up alone: 110-170 ms), and the
    # figure is a difference of two of them: medians of many runs, and the halves shown, so that a reader
    # sees how far the figure itself moves
    halves = [figure(startup[h::2], trash[h::2], mv[h::2]) for h in (0, 1)]
    t_start, t_trash, t_mv = (statistics.median(x) for x in (startup, trash, mv))
    beyond = max(0.0, t_trash - t_start)
    ratio = beyond / t_mv
    print(f"checkpoints          {args.checkpoints}, {args.repeat} runs (medians)")
    print(f"ckpt tasks --json    {t_start * 1000:8.1f} ms (start-up)")
    print(f"ckpt trash-unused    {t_trash * 1000:8.1f} ms ({beyond * 1000:.1f} ms beyond start-up)")
    print(f"mv of the same files {t_mv * 1000:8.1f} ms")
    print(f"odd / even runs alone: {halves[0]:.2f} / {halves[1]:.2f}")
    print(f"RATIO trash_unused_vs_mv {ratio:.2f} <=3")


def figure(startup: list[float], trash: list[float], mv: list[float]) -> float:
    """Median trash-unused beyond median start-up, over median mv."""
    return max(0.0, statistics.median(trash) - statistics.median(startup)) / statistics.median(mv)


if __name__ == "__main__":
    main()
