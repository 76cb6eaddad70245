"""The foundation's figures (issue 2): start-up, `ckpt list` on 10,000 checkpoints, `ckpt tasks` on 1,000
tasks, the cost of a save late in a task, and that the light commands never import torch.

Every command runs as a user runs it: the installed `ckpt` script in a fresh process, bytecode compiled
(PYTHONDONTWRITEBYTECODE unset, each command run once before timing), the median of several runs
interleaved with the baseline `python -c "import typer, rich"` so that load on the machine hits both.

    python benchmarks/bench_cli.py [--quick]
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

from _bench import PYTHON, QUICK, bench_env, ckpt_script, info, interleaved, ms, ratio, run_once

import ckpt

BASELINE = [PYTHON, "-c", "import typer, rich"]
BIG = 10_000
MANY = 1_000
PER_TASK = 3
WINDOW = 50  # saves averaged around the 10th and the 10,000th while the big task is made
PAIRS = 100  # then saves into a task of 9 and into the big one, in turn: #10-#109 against #10,0xx on


def payload(i: int) -> bytes:
    return i.to_bytes(8, "little") * 8  # 64 bytes, different for every checkpoint


def metrics(i: int) -> dict[str, float]:
    return {"loss": 1.0 / (i + 1), "val_iou": i / BIG, "lr": 1e-3}


def startup(tmp: Path, ck: str, repeats: int) -> float:
    ws = ckpt.Workspace.init(tmp / "small")
    t = ws.create_task("T")
    for i in range(5):
        t.save(payload(i), step=i * 100, epoch=i, metrics=metrics(i))
    env = bench_env(ws.root)
    res = interleaved(
        {
            "baseline": BASELINE,
            "help": [ck, "--help"],
            "tasks": [ck, "tasks", "--json"],
            "list": [ck, "list", "T", "--json"],
            "python -m ckpt list": [PYTHON, "-m", "ckpt", "list", "T", "--json"],
        },
        env,
        repeats,
    )
    base = res["baseline"]
    info(f"baseline python -c 'import typer, rich': {ms(base)}")
    for k in ("help", "tasks", "list", "python -m ckpt list"):
        info(f"  ckpt {k} (small workspace): {ms(res[k])} = {res[k] / base:.2f}x")
    ratio("startup_help_vs_import", res["help"] / base, "<=2")
    ratio("startup_tasks_vs_import", res["tasks"] / base, "<=2")
    ratio("startup_list_vs_import", res["list"] / base, "<=2")
    return base


def big_task(tmp: Path, ck: str, repeats: int) -> None:
    ws = ckpt.Workspace.init(tmp / "big")
    t = ws.create_task("T", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2})
    times = []
    start = time.perf_counter()
    for i in range(BIG):
        a = time.perf_counter()
        t.save(payload(i), step=i * 10, epoch=i // 100, metrics=metrics(i))
        times.append(time.perf_counter() - a)
    total = time.perf_counter() - start
    info(f"creating a task of {BIG:,} checkpoints through Task.save: {total:.1f} s ({ms(total / BIG)} a save)")
    early = times[9 : 9 + WINDOW]
    late = times[BIG - WINDOW :]
    info(
        f"  save #{10}-#{9 + WINDOW}: median {ms(statistics.median(early))}, mean {ms(statistics.mean(early))}; "
        f"#{BIG - WINDOW + 1}-#{BIG}: median {ms(statistics.median(late))}, mean {ms(statistics.mean(late))} "
        "(a minute apart: the disk's load then decides)"
    )
    env = bench_env(ws.root)
    caches = [t.folder / ".task.cache.json", t.folder / ".task.list.cache"]
    listing = [ck, "list", "T", "--json"]
    cold_base, cold_t = [], []
    for _ in range(repeats):
        cold_base.append(run_once(BASELINE, env))
        for cache in caches:
            cache.unlink(missing_ok=True)
        cold_t.append(run_once(listing, env))  # parses task.toml and writes both caches
    res = interleaved({"baseline": BASELINE, "warm": listing}, env, repeats)
    base, warm, cold = res["baseline"], res["warm"], statistics.median(cold_t)
    info(f"ckpt list T --json, {BIG:,} checkpoints: warm {ms(warm)}, cold {ms(cold)}; baseline {ms(base)}")
    ratio("list_10k_warm_vs_import", warm / base, "<=2")
    table_vs_json(ck, env, repeats)
    # reported only: the first run parses 10,000 TOML records (tomllib alone takes 0.65 s)
    ratio("list_10k_cold_vs_import", cold / statistics.median(cold_base), "-")

    # one appended checkpoint: the cache is brought up to date from the appended bytes only
    appended_t = []
    for i in range(repeats):
        t.save(payload(BIG + i), step=BIG + i, metrics=metrics(BIG + i))
        appended_t.append(run_once(listing, env))
    info(f"  after one more save (cache extended): {ms(statistics.median(appended_t))}")

    # the figure: saves into a young task and into the big one in turn (which goes first alternates), so that
    # the fsyncs of both meet the same load on the disk
    small = ws.create_task("S")
    for i in range(9):
        small.save(payload(i), step=i, metrics=metrics(i))
    first = t.state().max_number + 1
    young, old = [], []
    for i in range(PAIRS):
        order = [(small, young), (t, old)] if i % 2 == 0 else [(t, old), (small, young)]
        for task, into in order:
            a = time.perf_counter()
            task.save(payload(BIG + i), step=BIG + i, metrics=metrics(BIG + i))
            into.append(time.perf_counter() - a)
    info(
        f"  in turn: save #10-#{9 + PAIRS} median {ms(statistics.median(young))}, "
        f"#{first:,}-#{first + PAIRS - 1:,} median {ms(statistics.median(old))}"
    )
    ratio("save_10000th_vs_10th", statistics.median(old) / statistics.median(young), "<=1.5")


def table_vs_json(ck: str, env: dict[str, str], repeats: int) -> None:
    """`ckpt list T` as a table (piped: every column; and fitted to COLUMNS=120) against its JSON, warm."""
    env = {k: v for k, v in env.items() if k != "COLUMNS"}
    cmds = {"json": [ck, "list", "T", "--json"], "table": [ck, "list", "T"]}
    res = interleaved(cmds, env, repeats)
    fitted = interleaved({"json": cmds["json"], "table": cmds["table"]}, {**env, "COLUMNS": "120"}, repeats)
    info(
        f"ckpt list T, {BIG:,} checkpoints: table {ms(res['table'])} (COLUMNS=120: {ms(fitted['table'])}), "
        f"JSON {ms(res['json'])}"
    )
    ratio("list_10k_table_vs_json", res["table"] / res["json"], "<=2")
    ratio("list_10k_table_120_columns_vs_json", fitted["table"] / fitted["json"], "<=2")


def many_tasks(tmp: Path, ck: str, repeats: int) -> None:
    ws = ckpt.Workspace.init(tmp / "many")
    start = time.perf_counter()
    for k in range(MANY):
        t = ws.create_task(f"task-{k:04d}")
        for i in range(PER_TASK):
            t.save(payload(i), step=i, metrics=metrics(i))
    info(f"creating {MANY:,} tasks of {PER_TASK} checkpoints: {time.perf_counter() - start:.1f} s")
    env = bench_env(ws.root)
    tasks = [ck, "tasks", "--json"]
    cold = run_once(tasks, env)
    res = interleaved({"baseline": BASELINE, "tasks": tasks}, env, repeats)
    warm, base = ms(res["tasks"]), ms(res["baseline"])
    info(f"ckpt tasks --json, {MANY:,} tasks: warm {warm}, first run {ms(cold)}; baseline {base}")
    ratio("tasks_1000_vs_import", res["tasks"] / res["baseline"], "<=2")


def torch_free(tmp: Path, ck: str) -> None:
    env = bench_env(tmp / "small")
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    loaded = 0
    for label, cmd in {
        "import ckpt": [PYTHON, "-c", "import ckpt"],
        "ckpt --help": [ck, "--help"],
        "ckpt tasks --json": [ck, "tasks", "--json"],
        "ckpt list T --json": [ck, "list", "T", "--json"],
    }.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        mods = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        torch = any(m == "torch" or m.startswith("torch.") for m in mods)
        loaded += torch
        extra = ", ".join(sorted(m for m in ("rich.console", "rich.table", "filelock", "tomli_w") if m in mods))
        info(f"  {label}: {len(mods)} modules, torch {'IMPORTED' if torch else 'not imported'}; also: {extra or '-'}")
    ratio("light_commands_importing_torch", loaded, "==0")


def main() -> None:
    repeats = 3 if QUICK else 11
    ck = ckpt_script()
    import typer

    info(f"python {sys.version.split()[0]}, typer {typer.__version__}, {os.cpu_count()} cores, repeats {repeats}")
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-cli-"))
    try:
        startup(tmp, ck, repeats)
        torch_free(tmp, ck)
        big_task(tmp, ck, repeats)
        many_tasks(tmp, ck, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
