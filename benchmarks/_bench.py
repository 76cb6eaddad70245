"""Helpers the `bench_*.py` scripts share: timing real `ckpt` processes and printing RATIO lines.

A figure is printed as `RATIO <name> <value> <target>` (e.g. `RATIO list_10k_warm_vs_import 1.6 <=2`);
`benchmarks/run.py` collects those lines. Everything else a script prints is for people.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

QUICK = "--quick" in sys.argv[1:] or os.environ.get("CKPT_BENCH_QUICK") == "1"
PYTHON = sys.executable


def ckpt_script() -> str:
    """The installed `ckpt` console script next to this interpreter (not a pyenv shim, which adds a bash start)."""
    here = Path(PYTHON).parent / "ckpt"
    if here.is_file():
        return str(here)
    found = shutil.which("ckpt")
    if found is None:
        sys.exit("benchmarks need the installed ckpt script: pip install -e .")
    return found


CHECKOUT = Path(__file__).resolve().parent.parent
if str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))  # the scripts' own `import ckpt` (making data) gets this checkout too


def bench_env(workspace: Path | None = None) -> dict[str, str]:
    """The environment users have: compiled bytecode allowed (this machine sets PYTHONDONTWRITEBYTECODE).

    PYTHONPATH is this checkout alone, so the `ckpt` script runs the code next to the benchmark even where
    the installed (editable) package points at another checkout; the baseline gets the same path.
    """
    env = dict(os.environ)
    for var in ("PYTHONDONTWRITEBYTECODE", "CKPT_DEBUG", "PYTHONPROFILEIMPORTTIME"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(CHECKOUT)
    if workspace is not None:
        env["CKPT_WORKSPACE"] = str(workspace)
    return env


def run_once(cmd: Sequence[str], env: dict[str, str]) -> float:
    """Wall time of one process, stdout read through a pipe as a script would; fails loudly on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
    return elapsed


def interleaved(cmds: dict[str, Sequence[str]], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median wall time of each command, the commands run in turn so that load on the machine hits all alike."""
    for cmd in cmds.values():  # warm the page cache and write bytecode
        run_once(cmd, env)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            times[name].append(run_once(cmd, env))
    return {k: statistics.median(v) for k, v in times.items()}


def ratio(name: str, value: float, target: str) -> None:
    print(f"RATIO {name} {value:.3g} {target}", flush=True)


def info(text: str) -> None:
    print(text, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
