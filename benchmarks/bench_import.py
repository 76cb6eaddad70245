"""`ckpt import` of a Lightning folder of 1,000 checkpoints, with links, against `cp -al` of the same folder.

The figure is the time `ckpt import` takes beyond ckpt's own start-up (`ckpt --version`), over the
time of `cp -al`. Target: at most 3. Prints `RATIO import_1000_links_vs_cp_al <value> <=3` last.
Run: python benchmarks/bench_import.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = "--quick" in sys.argv[1:] or os.environ.get("CKPT_BENCH_QUICK") == "1"
N = 1000
SIZE = 4 * 1024  # bytes per checkpoint: small, so the figure is the per-file work (hashing is measured in bench_verify)
REPEATS = 3 if QUICK else 7


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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-import-"))
    try:
        src = tmp / "lightning_logs" / "version_0" / "checkpoints"
        src.mkdir(parents=True)
        for i in range(N):
            (src / f"epoch={i // 10}-step={(i + 1) * 50}-val_loss={1 / (i + 1):.4f}.ckpt").write_bytes(os.urandom(SIZE))
        ws = tmp / "ws"
        env = env_for(ws)
        subprocess.run([*ckpt_cmd(), "init", str(ws)], env=env, check=True, capture_output=True)
        startup = [timed([*ckpt_cmd(), "--version"], env) for _ in range(REPEATS)]
        cp_al: list[float] = []
        imports: list[float] = []
        for r in range(REPEATS):  # interleaved, so drift on the machine hits both alike
            dst = tmp / f"copy{r}"
            cp_al.append(timed(["cp", "-al", str(src), str(dst)], env))
            imports.append(timed([*ckpt_cmd(), "import", str(src), "--task", f"run{r}", "--json"], env))
            shutil.rmtree(dst)
        s, c, i = (statistics.median(x) for x in (startup, cp_al, imports))
        beyond = i - s
        print(f"{N} checkpoints of {SIZE // 1024} KiB (Lightning names), medians of {REPEATS}:", file=sys.stderr)
        print(f"  ckpt start-up (--version) {s * 1000:.0f} ms", file=sys.stderr)
        print(
            f"  ckpt import --link        {i * 1000:.0f} ms ({beyond * 1000:.0f} ms beyond start-up)", file=sys.stderr
        )
        print(f"  cp -al                    {c * 1000:.0f} ms", file=sys.stderr)
        print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
        print(f"RATIO import_1000_links_vs_cp_al {beyond / c:.2f} <=3")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
