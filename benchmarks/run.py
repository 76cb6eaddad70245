"""Run every `benchmarks/bench_*.py` and print its figures against their targets.

    python benchmarks/run.py            # all of them (a few minutes each)
    python benchmarks/run.py --quick    # fewer repeats / smaller data where a script supports it
    python benchmarks/run.py --only cli --only promote

Each script prints lines `RATIO <name> <value> <target>`, target one of `<=X`, `<X`, `>=X`, `>X`, `==X`,
or `-` for a figure that is only reported (e.g. `RATIO list_10k_warm_vs_import 1.6 <=2`); everything
else it prints is shown as it runs. A script
gets `--quick` when it mentions that flag, and `CKPT_BENCH_QUICK=1` either way.

Benchmarks are not part of CI or the tests. This exits 1 when a target is missed or a script failed,
so that a person running it sees it; 0 when every figure meets its target.
"""

from __future__ import annotations

import argparse
import operator
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATIO_LINE = re.compile(r"^RATIO\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
TARGET = re.compile(r"^(<=|>=|==|<|>)(-?[0-9.]+(?:e-?[0-9]+)?)$")
OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}


@dataclass
class Figure:
    script: str
    name: str
    value: str
    target: str
    ok: bool | None  # None: the line could not be judged


def judge(value: str, target: str) -> bool | None:
    if target == "-":
        return True
    m = TARGET.match(target)
    try:
        v = float(value)
    except ValueError:
        return None
    if m is None:
        return None
    return bool(OPS[m.group(1)](v, float(m.group(2))))


def run_script(path: Path, quick: bool, timeout: float) -> tuple[list[Figure], str | None]:
    """Run one benchmark, echoing its output; return its figures and an error, if it failed."""
    cmd = [sys.executable, str(path)]
    env = dict(os.environ)
    if quick:
        env["CKPT_BENCH_QUICK"] = "1"
        if "--quick" in path.read_text(encoding="utf-8"):
            cmd.append("--quick")
    figures: list[Figure] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(f"  {line}")
            sys.stdout.flush()
            m = RATIO_LINE.match(line.strip())
            if m:
                name, value, target = m.groups()
                figures.append(Figure(path.stem, name, value, target, judge(value, target)))
            if time.monotonic() - start > timeout:
                proc.kill()
                return figures, f"killed after {timeout:.0f} s"
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        raise
    if rc != 0:
        return figures, f"exit code {rc}"
    if not figures:
        return figures, "printed no RATIO line"
    return figures, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller run")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run bench_NAME.py only (repeatable)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one script may take (default 900)")
    args = ap.parse_args(argv)

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in args.only}
        unknown = wanted - {p.stem.removeprefix("bench_") for p in scripts}
        if unknown:
            ap.error(f"no benchmark named {', '.join(sorted(unknown))} (have: {', '.join(p.stem for p in scripts)})")
        scripts = [p for p in scripts if p.stem.removeprefix("bench_") in wanted]

    figures: list[Figure] = []
    failures: list[str] = []
    for path in scripts:
        print(f"== {path.name}", flush=True)
        start = time.monotonic()
        got, error = run_script(path, args.quick, args.timeout)
        figures += got
        print(f"== {path.name}: {time.monotonic() - start:.0f} s{f' — FAILED: {error}' if error else ''}", flush=True)
        if error:
            failures.append(f"{path.name}: {error}")

    print()
    rows = [("script", "figure", "value", "target", "result")]
    for f in figures:
        result = "reported" if f.target == "-" else {True: "ok", False: "MISSED", None: "?"}[f.ok]
        rows.append((f.script, f.name, f.value, f.target, result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    missed = [f for f in figures if f.ok is not True]
    for line in failures:
        print(f"failed: {line}")
    if missed or failures:
        print(f"{len(missed)} figure(s) missed or unreadable, {len(failures)} script(s) failed")
        return 1
    print(f"all {len(figures)} figures meet their targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
