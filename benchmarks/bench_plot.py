"""`ckpt plot` and `ckpt report` of a task of 10,000 checkpoints (issue 20): targets 2 s and 3 s, wall time of
the command as a user runs it (the installed script, a fresh process, matplotlib's import included).

The task is made in one `Task.add_existing` call (each checkpoint a hard link to one small file: about 0.3 s),
with three metrics, three models, and 4,000 checkpoints in the trash, so that every kind of mark is drawn.

    python benchmarks/bench_plot.py [--quick]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import PYTHON, QUICK, bench_env, ckpt_script, info, ms, ratio, run_once

import ckpt
from ckpt.trash import KeepRules, trash_unused
from ckpt.workspace import Incoming

BIG = 10_000


def make_big(root: Path) -> ckpt.Workspace:
    ws = ckpt.Workspace.init(root / "ws")
    t = ws.create_task("big")
    src = root / "one.pt"
    data = b"w" * 256
    src.write_bytes(data)
    sha, dev = hashlib.sha256(data).hexdigest(), os.stat(src).st_dev
    items = [
        Incoming(
            src,
            f"{i}.pt",
            len(data),
            sha,
            step=i * 10,
            epoch=i // 100,
            metrics={"val_loss": 1 / i + (i % 7) / 1000, "val_iou": i / BIG, "lr": 1e-3},
            dev=dev,
        )
        for i in range(1, BIG + 1)
    ]
    start = time.perf_counter()
    t.add_existing(items, mode="link")
    info(f"made a task of {BIG:,} checkpoints in {time.perf_counter() - start:.2f} s (one add_existing)")
    for n in (2_000, 5_000, 8_000):
        ws.promote("big", n, title=f"big-{n}")
    trash_unused(ws, "big", KeepRules(keep_last=BIG - 4_000))
    return ws


def main() -> None:
    repeats = 3 if QUICK else 7
    ck = ckpt_script()
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-plot-"))
    try:
        ws = make_big(tmp)
        env = bench_env(ws.root)
        out = tmp / "out"
        out.mkdir()
        cmds = {
            "baseline": [PYTHON, "-c", "import typer, rich"],
            "plot png": [ck, "plot", "big", "--out", str(out / "p.png")],
            "plot svg": [ck, "plot", "big", "--out", str(out / "p.svg")],
            "plot --with-plan": [ck, "plot", "big", "--with-plan", "--keep-last", "100", "--out", str(out / "q.png")],
            "report": [ck, "report", "big", "--out", str(out / "r.html")],
        }
        for cmd in cmds.values():  # bytecode, matplotlib's font cache, the task's caches
            run_once(cmd, env)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(repeats):
            for name, cmd in cmds.items():
                times[name].append(run_once(cmd, env))
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, t in med.items():
            info(f"  {name}: {ms(t)} (median of {repeats}; min {ms(min(times[name]))})")
        size = (out / "r.html").stat().st_size
        info(f"  report: {size / 1e6:.1f} MB of HTML; plot: {(out / 'p.png').stat().st_size / 1e3:.0f} kB PNG")
        ratio("plot_10k_png_seconds", med["plot png"], "<=2")
        ratio("plot_10k_svg_seconds", med["plot svg"], "-")
        ratio("plot_10k_with_plan_seconds", med["plot --with-plan"], "-")
        ratio("report_10k_seconds", med["report"], "<=3")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
