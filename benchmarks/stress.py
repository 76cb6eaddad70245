"""Stress and crash run: does ckpt lose a checkpoint when everything happens at once, or is killed?

1. Concurrency: one process saves checkpoints through the library for 30 s (sha256 of each in its log)
   while six threads each loop one `ckpt` command as a fresh process: list, promote (random titles from a
   small pool, so some collide), trash-unused, trash restore, models remove, trash empty --yes.
2. Crashes: save, promote, trash-unused, trash restore and trash empty, each SIGKILLed at a random moment
   (file-system steps slowed a little so kills land inside the operation), 200 times; each kill is followed
   by the next command (a doctor, or the next operation) and a check.

Checked after each kill and at the end: every checkpoint ever saved is in its task, in a model or in the
trash (unless its entry was deliberately emptied), byte-identical by sha256; every manifest parses; no model
points at a missing file; no process printed a traceback or "internal error". Exit status 1 when anything
was lost or broken.

    python benchmarks/stress.py            # 30 s of concurrency, 200 kills
    python benchmarks/stress.py --quick    # 6 s, 50 kills (what tests/test_stress.py runs)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ckpt  # noqa: E402
from ckpt import trash  # noqa: E402

TASK = "run"
OK_CODES = {0, 3, 4}  # not found (an entry another command emptied or restored first), conflict (a taken title)

WRITER = """
import hashlib, os, random, sys, time
import ckpt
task = ckpt.Workspace.open(sys.argv[1]).task(sys.argv[2])
end = time.monotonic() + float(sys.argv[3])
rng = random.Random(int(sys.argv[4]))
with open(sys.argv[5], "a") as log:
    while time.monotonic() < end:
        data = os.urandom(rng.randint(1, 16) * 1024)
        n = task.save(data, step=rng.randint(0, 10**6), metrics={"val_iou": rng.random()})
        log.write(f"{n} {hashlib.sha256(data).hexdigest()}\\n")
        log.flush()
        time.sleep(rng.uniform(0, 0.02))
"""

# One of the six loops: a process running one kind of `ckpt` command over and over (in process, so that
# thousands run in 30 s), printing a JSON line per command: its exit code and whether it printed a traceback.
LOOPER = """
import json, random, sys, time
from types import SimpleNamespace
import typer.main
from typer.testing import CliRunner
from ckpt.cli import app
root, name, end, seed = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
command, runner = typer.main.get_command(app), CliRunner()

def invoke(args):
    # CliRunner.invoke(app) would build the command again at every call: run the one built above instead
    exc = None
    with runner.isolation() as streams:
        try:
            command.main(args=args, prog_name="ckpt")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            exc = e if code else None
        except Exception as e:
            code, exc = 1, e
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        text = [s.getvalue().decode("utf-8", "replace") for s in streams]
    return SimpleNamespace(exit_code=code, stdout=text[0], stderr=text[1], exception=exc)

def ck(*args):
    r = invoke(["-w", root, *args])
    out = r.stdout + r.stderr
    bad = r.exception is not None and not isinstance(r.exception, SystemExit)
    bad = bad or "Traceback" in out or "internal error" in out
    what = args[0] if args[0] not in ("trash", "models") else args[0] + " " + args[1]
    shown = out[-400:] if bad or r.exit_code not in (0, 3, 4) else ""
    print(json.dumps({"op": what, "code": r.exit_code, "bad": bad, "out": shown}), flush=True)
    return r

def listed(*args):
    r = ck(*args, "--json")
    return json.loads(r.stdout) if r.exit_code == 0 else []

while time.monotonic() < end:
    if name == "list":
        ck("list", "run", "--json")
    elif name == "promote":
        ck("promote", "run", "--best", "val_iou", "--title", "m%d" % rng.randint(1, 12))
    elif name == "trash-unused":
        ck("trash-unused", "run", "--keep-last", str(rng.randint(0, 3)))
        time.sleep(rng.uniform(0, 0.05))
    elif name == "restore":
        entries = listed("trash", "list")
        if entries:
            ck("trash", "restore", rng.choice(entries)["id"])
    elif name == "models remove":
        models = listed("models")
        if models:
            ck("models", "remove", rng.choice(models)["title"])
        time.sleep(rng.uniform(0, 0.1))
    elif name == "empty":
        time.sleep(rng.uniform(1, 2.5))
        entries = {e["id"]: e for e in listed("trash", "list")}
        chosen = [i for i in entries if rng.random() < 0.05]
        if chosen:
            r = ck("trash", "empty", *chosen, "--yes", "--json")
            if r.exit_code == 0:
                gone = [n for i in json.loads(r.stdout)["emptied"] for n in (entries[i]["checkpoints"] or [])]
                print(json.dumps({"emptied": gone}), flush=True)
"""

# A process to kill: fs steps slowed by SLOW_STEP seconds; says "go" on stderr when the first step starts.
CHILD = """
import hashlib, os, sys, time
import ckpt.fsutil as f
import ckpt.placing as p
delay = float(os.environ.get("SLOW_STEP", "0"))
started = []
steps = [(f, n) for n in ("atomic_write", "move_noreplace", "remove_file", "make_dirs", "fsync_dir",
                          "make_dir_new", "append_durably", "write_new_file", "remove_tree")]
for mod, name in steps + [(p, "link_new")]:
    def step(*a, _fn=getattr(mod, name), **k):
        if not started:
            started.append(1)
            sys.stderr.write("go\\n")
            sys.stderr.flush()
        if delay:
            time.sleep(delay)
        return _fn(*a, **k)
    setattr(mod, name, step)
if sys.argv[1] == "save":
    import ckpt
    data = os.urandom(int(sys.argv[4]))
    n = ckpt.Workspace.open(sys.argv[2]).task(sys.argv[3]).save(data, metrics={"val_iou": 0.5})
    with open(sys.argv[5], "a") as log:
        log.write(f"{n} {hashlib.sha256(data).hexdigest()}\\n")
else:
    from ckpt.cli import main
    sys.argv = ["ckpt", *sys.argv[1:]]
    main()
"""


class Run:
    def __init__(self, root: Path, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.saved: dict[int, str] = {}
        self.emptied: set[int] = set()
        self.ops: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []  # tracebacks, internal errors, undocumented exit codes
        self.lock = threading.Lock()
        self.env = {k: v for k, v in os.environ.items() if k not in ("CKPT_WORKSPACE", "CKPT_DEBUG")}
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")

    def ckpt(self, *args: str, ok: set[int] = OK_CODES) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", "ckpt", "-w", str(self.root), *args],
            capture_output=True,
            text=True,
            env=self.env,
        )
        self.note(args[0] if args[0] not in ("trash", "models") else f"{args[0]} {args[1]}", p.returncode, p)
        if p.returncode not in ok:
            with self.lock:
                self.bad.append(f"ckpt {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-300:]}")
        return p

    def note(self, what: str, code: int, p: Any) -> None:
        out = (p.stdout or "") + (p.stderr or "")
        with self.lock:
            self.ops[what] += 1
            self.codes[str(code)] += 1
            if "Traceback" in out or "internal error" in out:
                self.bad.append(f"{what}: {out.strip()[-500:]}")

    def read_log(self, log: Path) -> None:
        if log.exists():
            for line in log.read_text().splitlines():
                n, digest = line.split()
                if int(n) in self.saved and self.saved[int(n)] != digest:
                    self.bad.append(f"checkpoint number {n} was given twice")
                self.saved[int(n)] = digest

    def entries_json(self) -> list[dict[str, Any]]:
        p = self.ckpt("trash", "list", "--json")
        return json.loads(p.stdout) if p.returncode == 0 else []

    def concurrency(self, seconds: float) -> float:
        log = self.root.parent / "writer.log"
        script = self.root.parent / "writer.py"
        script.write_text(WRITER)
        start = time.monotonic()
        seed = str(self.rng.randint(0, 10**9))
        writer = subprocess.Popen(
            [sys.executable, str(script), str(self.root), TASK, str(seconds), seed, str(log)],
            env=self.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        looper = self.root.parent / "looper.py"
        looper.write_text(LOOPER)
        loops = ["list", "promote", "trash-unused", "restore", "models remove", "empty"]
        procs = [
            subprocess.Popen(
                [sys.executable, str(looper), str(self.root), name, str(seconds), str(self.rng.randint(0, 10**9))],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in loops
        ]
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                self.bad.append(f"a loop failed: {out[-500:]}")
            for line in out.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    self.bad.append(f"a loop printed: {line[:300]}")
                    continue
                if "emptied" in rec:
                    self.emptied.update(rec["emptied"])
                    continue
                self.ops[rec["op"]] += 1
                self.codes[str(rec["code"])] += 1
                if rec["bad"] or rec["code"] not in OK_CODES:
                    self.bad.append(f"{rec['op']} exited {rec['code']}: {rec['out']}")
        _, err = writer.communicate()
        if writer.returncode != 0 or "Traceback" in err:
            self.bad.append(f"the writer failed: {err[-500:]}")
        self.read_log(log)
        self.ops["save"] += len(self.saved)
        return time.monotonic() - start

    # -- crashes --

    def crashes(self, kills: int) -> dict[str, int]:
        script = self.root.parent / "child.py"
        script.write_text(CHILD)
        log = self.root.parent / "crash-saves.log"
        stats: Counter[str] = Counter()
        i = -1
        while stats["killed"] < kills and i < 3 * kills:
            i += 1
            op = ["save", "promote", "trash-unused", "restore", "empty"][i % 5]
            asked: list[dict[str, Any]] = []
            if op in ("trash-unused", "restore", "empty"):
                self.save_some(3)  # something unused to trash, so that the kill can land inside the move
            if op == "save":
                args = ["save", str(self.root), TASK, str(self.rng.randint(1, 64) * 1024), str(log)]
            elif op == "promote":
                args = ["-w", str(self.root), "promote", TASK, "--best", "val_iou", "-t", f"k{self.rng.randint(1, 30)}"]
            elif op == "trash-unused":
                args = ["-w", str(self.root), "trash-unused", TASK, "--keep-last", "2"]
            else:
                entries = self.entries_json()
                if not entries:
                    self.ckpt("trash-unused", TASK)
                    entries = self.entries_json()
                if not entries:
                    continue
                entries = [e for e in entries if e["state"] == "complete"] or entries
                asked = [self.rng.choice(entries)]
                verb = ["trash", "restore"] if op == "restore" else ["trash", "empty", "--yes"]
                args = ["-w", str(self.root), *verb, asked[0]["id"]]
            slow = "0" if i % 4 == 3 else "0.002"
            proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                env={**self.env, "SLOW_STEP": slow},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stderr is not None
            go = proc.stderr.readline()
            if go == "go\n":
                time.sleep(self.rng.uniform(0, 0.04 if slow != "0" else 0.004))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
            killed = proc.returncode == -signal.SIGKILL
            stats["killed" if killed else "finished"] += 1
            if any(p.name.startswith(".pending-") for p in (self.root / "tasks" / TASK).iterdir()):
                stats["mid-operation"] += 1
            self.note(f"{op} (killed)" if killed else op, proc.returncode, argparse.Namespace(stdout=out, stderr=err))
            if op == "empty" and asked and _being_emptied(self.root / "trash" / asked[0]["id"]):
                self.emptied.update(asked[0]["checkpoints"] or [])
            # the invariants hold after the next command, which recovers: a doctor, or a save (it takes the
            # task's lock, which finishes or undoes an interrupted trash or restore of the task)
            if i % 2 == 0:
                self.ckpt("doctor")
            else:
                self.save_some(1)
            self.read_log(log)
            lost = self.check()
            if lost:
                stats["lost"] += len(lost)
                self.bad.extend(f"after a killed {op}: {x}" for x in lost[:5])
        self.ops["save"] += sum(1 for _ in (log.read_text().splitlines() if log.exists() else []))
        return dict(stats)

    def save_some(self, n: int) -> None:
        task = ckpt.Workspace.open(self.root).task(TASK)
        for _ in range(n):
            data = os.urandom(self.rng.randint(1, 8) * 1024)
            self.saved[task.save(data, metrics={"val_iou": self.rng.random()})] = _sha256(data)
            self.ops["save"] += 1

    # -- the invariants --

    def check(self) -> list[str]:
        """What is lost or broken: every saved checkpoint in its task, a model or the trash, byte-identical."""
        problems: list[str] = []
        ws = ckpt.Workspace.open(self.root)
        places: dict[int, list[Path]] = {}
        try:
            task = ws.task(TASK)
            for cp in task.checkpoints:
                places.setdefault(cp.number, []).append(task.path_of(cp))
        except ckpt.CkptError as e:
            problems.append(f"the task manifest does not read: {e}")
        models, errors = ws.models.read_all()
        problems += [f"a model manifest does not read: {e}" for e in errors]
        for m in models:
            if not m.path.is_file():
                problems.append(f"model '{m.title}' points at a missing file")
            elif m.task == TASK:
                places.setdefault(m.checkpoint, []).append(m.path)
        entries, errors = trash.list_entries(ws)
        problems += [f"a trash entry does not read: {e}" for e in errors]
        for e in entries:
            for cp in e.checkpoints:
                places.setdefault(cp.number, []).append(e.folder / "files" / cp.file)
        for n, digest in self.saved.items():
            if n in self.emptied:
                continue
            found = [p for p in places.get(n, []) if p.is_file() and _sha(p) == digest]
            if not found:
                problems.append(f"checkpoint {n} is lost (looked in {[str(p) for p in places.get(n, [])]})")
        return problems


def _being_emptied(entry: Path) -> bool:
    """Whether the empty of this entry got far enough to commit to it: the entry is gone, or marked "emptying"
    (its files are going; the next empty or doctor finishes it, and restore refuses it)."""
    try:
        return b'state = "emptying"' in (entry / "entry.toml").read_bytes()
    except FileNotFoundError:
        return not entry.exists() or not (entry / "entry.toml").exists()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 s of concurrency and 50 kills (CI)")
    ap.add_argument("--seconds", type=float, help="seconds of concurrency (default 30; quick 6)")
    ap.add_argument("--kills", type=int, help="SIGKILLs (default 200; quick 50)")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CKPT_STRESS_SEED", "1")))
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    opts = ap.parse_args()
    seconds = opts.seconds if opts.seconds is not None else (6.0 if opts.quick else 30.0)
    kills = opts.kills if opts.kills is not None else (50 if opts.quick else 200)
    with tempfile.TemporaryDirectory(prefix="ckpt-stress-") as tmp:
        root = Path(tmp) / "ws"
        ckpt.Workspace.init(root).create_task(TASK)
        run = Run(root, opts.seed)
        t0 = time.monotonic()
        concurrent_s = run.concurrency(seconds)
        run.bad += run.check()
        crash = run.crashes(kills)
        run.ckpt("doctor")
        final = run.check()
        run.bad += final
        figures = {
            "seconds_concurrent": round(concurrent_s, 1),
            "seconds_total": round(time.monotonic() - t0, 1),
            "checkpoints_saved": len(run.saved),
            "checkpoints_emptied_deliberately": len(run.emptied & set(run.saved)),
            "checkpoints_checked": len(set(run.saved) - run.emptied),
            "operations": dict(sorted(run.ops.items())),
            "operations_total": sum(run.ops.values()),
            "exit_codes": dict(sorted(run.codes.items())),
            "kills": crash.get("killed", 0),
            "finished_before_the_kill": crash.get("finished", 0),
            "killed_mid_operation": crash.get("mid-operation", 0),
            "lost": len([p for p in final if "lost" in p]),
            "problems": run.bad[:20],
        }
    if opts.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:34} {v}")
    return 1 if run.bad else 0


if __name__ == "__main__":
    sys.exit(main())
