"""trash-unused on a task of 1,000 checkpoints, against one `mv` of the same 1,000 files.

The figure is the time trash-unused takes beyond ckpt's own start-up (a `ckpt tasks --json` timed
in the same run), divided by the time of one `mv` of the same files into a folder on the same file
system. Target: at most 3.

    python benchmarks/bench_trash.py [--checkpoints 1000] [--repeat 7]

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
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-trash-") as tmp:
        base = Path(tmp)
        template = base / "template"
        build(template, args.checkpoints)
        subprocess.run([*CKPT, "-w", str(template), "tasks", "--json"], env=ENV, check=True, stdout=subprocess.DEVNULL)
        startup, trash, mv = [], [], []
        for i in range(args.repeat):
            # a fresh copy each time: trash-unused changes the workspace
            ws = base / f"ws-{i}"
            shutil.copytree(template, ws, symlinks=True)
            # `ckpt tasks` keeps a task's row only once its manifest is 2 s old (workspace.SETTLED_NS: a newer
            # one could change again within the same ctime tick); wait for that, or whether the timed start-up
            # finds the row would depend on how long the copy and the sync took (it moved the figure by ±40 ms)
            time.sleep(SETTLE_S)
            # the copy has new inodes, so the manifest's derived cache is stale: refresh it untimed, so that
            # both timed commands read the cache and the difference is trash-unused's own work
            subprocess.run([*CKPT, "-w", str(ws), "tasks", "--json"], env=ENV, check=True, stdout=subprocess.DEVNULL)
            # the copy's metadata is still in the file system's journal: without a sync, trash-unused's first
            # fsync would commit the copy too (mv, which does not fsync, never pays for it)
            os.sync()
            startup.append(timed([*CKPT, "-w", str(ws), "tasks", "--json"]))
            trash.append(timed([*CKPT, "-w", str(ws), "trash-unused", "big", "--json"]))
            moved = base / f"mv-{i}"
            shutil.copytree(template, moved, symlinks=True)
            cdir = moved / "tasks" / "big" / "checkpoints"
            files = sorted(str(p) for p in cdir.iterdir())
            dest = moved / "trash" / "by-mv"
            dest.mkdir()
            os.sync()  # as before trash-unused: each command pays for its own writes only
            mv.append(timed(["mv", *files, str(dest)]))
            shutil.rmtree(ws)
            shutil.rmtree(moved)
    t_start, t_trash, t_mv = (statistics.median(x) for x in (startup, trash, mv))
    beyond = max(0.0, t_trash - t_start)
    ratio = beyond / t_mv
    print(f"checkpoints          {args.checkpoints}")
    print(f"ckpt tasks --json    {t_start * 1000:8.1f} ms (start-up)")
    print(f"ckpt trash-unused    {t_trash * 1000:8.1f} ms ({beyond * 1000:.1f} ms beyond start-up)")
    print(f"mv of the same files {t_mv * 1000:8.1f} ms")
    print(f"RATIO trash_unused_vs_mv {ratio:.2f} <=3")


if __name__ == "__main__":
    main()
