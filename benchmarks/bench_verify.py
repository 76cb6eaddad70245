"""`ckpt verify` on 8 checkpoints of 128 MiB (in the page cache) against a single-threaded
`hashlib.file_digest` loop over the same files, in the same run.

The figure is the loop's time over the wall time of the whole `ckpt verify --json` process, start-up
included: what a user waits for. Target: at least 1.6. A second figure leaves ckpt's start-up out (a
`ckpt tasks --json` timed in the same run is subtracted), and the `seconds` the command reports is printed.
Prints `RATIO verify_8x128MiB_vs_file_digest_loop <value> >=1.6` and
`RATIO verify_8x128MiB_beyond_startup_vs_file_digest_loop <value> >=1.6` last.
Run: python benchmarks/bench_verify.py [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = "--quick" in sys.argv[1:] or os.environ.get("CKPT_BENCH_QUICK") == "1"
FILES = 8
SIZE = (32 if QUICK else 128) * 2**20
REPEATS = 3 if QUICK else 5


def ckpt_cmd() -> list[str]:
    script = Path(sys.executable).parent / "ckpt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ckpt"]


def env_for(ws: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONDONTWRITEBYTECODE", "CKPT_DEBUG"):
        env.pop(var, None)  # users run with compiled bytecode
    # the checkout this script lives in, not whichever one is installed
    checkout = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    env["CKPT_WORKSPACE"] = str(ws)
    return env


def digest_loop(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - start


def thread_ceiling(seconds_each: int = 64) -> float:
    """How much faster N threads hash in-memory data than one, here and now: the most verify can gain."""
    import threading

    data = os.urandom(seconds_each * 2**20)
    n = os.cpu_count() or 1

    def one() -> None:
        hashlib.sha256(data).digest()

    start = time.perf_counter()
    for _ in range(n):
        one()
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=one) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial / (time.perf_counter() - start)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-verify-"))
    try:
        src = tmp / "run"
        src.mkdir()
        for i in range(FILES):
            block = os.urandom(2**20)  # each file different: import keeps one of identical files
            with open(src / f"model_{i}.pt", "wb") as f:
                for j in range(SIZE // 2**20):
                    f.write(block[j:] + block[:j])  # distinct bytes per MiB, cheap to make
        ws = tmp / "ws"
        env = env_for(ws)
        subprocess.run([*ckpt_cmd(), "init", str(ws)], env=env, check=True, capture_output=True)
        subprocess.run(
            [*ckpt_cmd(), "import", str(src), "--task", "big", "--move"], env=env, check=True, capture_output=True
        )
        paths = sorted((ws / "tasks" / "big" / "checkpoints").iterdir())
        digest_loop(paths)  # warm the page cache
        subprocess.run([*ckpt_cmd(), "tasks", "--json"], env=env, check=True, capture_output=True)
        loop: list[float] = []
        inner: list[float] = []
        wall: list[float] = []
        startup: list[float] = []
        for _ in range(REPEATS):  # interleaved, so drift on the machine hits all alike
            loop.append(digest_loop(paths))
            start = time.perf_counter()
            subprocess.run([*ckpt_cmd(), "tasks", "--json"], env=env, check=True, capture_output=True)
            startup.append(time.perf_counter() - start)
            start = time.perf_counter()
            proc = subprocess.run([*ckpt_cmd(), "verify", "big", "--json"], env=env, capture_output=True)
            wall.append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"ckpt verify failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
            inner.append(json.loads(proc.stdout)["seconds"])
        start = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, paths)], check=True, capture_output=True)
        sha256sum = time.perf_counter() - start
        total = FILES * SIZE / 2**20
        lp, i, w, s = (statistics.median(x) for x in (loop, inner, wall, startup))
        beyond = max(w - s, 1e-9)
        print(
            f"{FILES} files of {SIZE // 2**20} MiB in the page cache, {os.cpu_count()} cores, medians of {REPEATS}:",
            file=sys.stderr,
        )
        print(f"  hashlib.file_digest loop  {lp:.3f} s  {total / lp:.0f} MiB/s", file=sys.stderr)
        print(f"  ckpt verify (process)     {w:.3f} s  {total / w:.0f} MiB/s (start-up included)", file=sys.stderr)
        print(f"  ckpt tasks --json         {s:.3f} s  (ckpt's start-up)", file=sys.stderr)
        print(f"  verify beyond start-up    {beyond:.3f} s  {total / beyond:.0f} MiB/s", file=sys.stderr)
        print(f"  ckpt verify (command)     {i:.3f} s  {total / i:.0f} MiB/s (its own `seconds`)", file=sys.stderr)
        print(f"  sha256sum (once)          {sha256sum:.3f} s  {total / sha256sum:.0f} MiB/s", file=sys.stderr)
        print(
            f"  ceiling: {os.cpu_count()} threads hash in-memory data {thread_ceiling():.2f}x as fast as one "
            f"(load average {os.getloadavg()[0]:.1f})",
            file=sys.stderr,
        )
        print(f"RATIO verify_8x128MiB_vs_file_digest_loop {lp / w:.2f} >=1.6")
        print(f"RATIO verify_8x128MiB_beyond_startup_vs_file_digest_loop {lp / beyond:.2f} >=1.6")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
