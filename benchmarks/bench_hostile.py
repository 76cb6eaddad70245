"""Hostile checkpoint files (issue 15): each case must end with exit 6 in < 2 s and < 300 MB of peak RSS
beyond its baseline (a ckpt command that reads nothing; `import torch, ckpt.preview` where torch is needed).

Every case is a fresh process; its wall time and its peak RSS (ru_maxrss from wait4) are printed as
`RATIO` lines for run.py. The files are built here from opcodes, as tests/test_hostile_files.py does.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ckpt  # noqa: E402


def torch_zip(path: Path, pkl: bytes, compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        zf.writestr("archive/data.pkl", pkl, compresslevel=9 if compress else None)
        zf.writestr("archive/version", "3\n")
    return path


def zip_bomb(path: Path, pairs: int = 700 * 2**20) -> Path:
    """1.4 GB of pickle (None, POP, ...) deflated to 1.4 MB, written in chunks: this process stays small,
    since a child's peak RSS counts its parent's at the fork."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as member:
            member.write(b"\x80\x02")
            chunk = b"N0" * 2**20
            for _ in range(pairs // 2**20):
                member.write(chunk)
            member.write(b"N.")
        zf.writestr("archive/version", "3\n")
    return path


def nested_pairs(depth: int = 60) -> bytes:
    return b"\x80\x02]q\x00" + b"](h\x00h\x00eq\x00" * depth + b"."


def hashed_pairs(depth: int = 60) -> bytes:
    return b"\x80\x02})q\x00" + b"h\x00h\x00\x86q\x00" * depth + b"K\x01s."


def colliding_keys(n: int = 100_000) -> bytes:
    ops = bytearray(b"\x80\x02}(")
    for k in range(n):
        raw = pickle.encode_long(k * (2**61 - 1) + 1)  # type: ignore[attr-defined]
        ops += b"\x8a" + bytes([len(raw)]) + raw + b"N"
    return bytes(ops + b"u.")


def bytearray_bomb() -> bytes:
    return b"\x80\x02}X\x01\x00\x00\x00wcbuiltins\nbytearray\nJ\xff\xff\xff\x7f\x85Rs."


def dense_dicts(size: int = 1_400_000) -> bytes:
    """The costliest plain pickle per byte found: empty dicts kept in the memo, 2 bytes each, stored."""
    return b"\x80\x04" + b"}\x94" * (size // 2) + b"N."


def measure(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in MB) of `cmd` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stderr.close()
    print(f"    {' '.join(cmd[2:])[:90]}: exit {proc.returncode}, {err[-1][:150] if err else ''}", flush=True)
    return proc.returncode, seconds, usage.ru_maxrss / 1024


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    py = [sys.executable, "-m", "ckpt"]
    load = "import sys; from pathlib import Path; from ckpt.loading import load_state_dict\n"
    load += "try:\n    load_state_dict(Path(sys.argv[1]))\n"
    load += "except Exception as e:\n    print(e, file=sys.stderr); sys.exit(6)\n"
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = ckpt.Workspace.init(root / "ws")
        task = ws.create_task("t", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2, "width": 4, "depth": 1})
        files = {
            "nested": torch_zip(root / "nested.pt", nested_pairs()),
            "zipbomb": zip_bomb(root / "bomb.pt"),
            "hashed": torch_zip(root / "hashed.pt", hashed_pairs()),
            "collide": torch_zip(root / "collide.pt", colliding_keys()),
            "bytearray": torch_zip(root / "bytearray.pt", bytearray_bomb()),
            "dense": torch_zip(root / "dense.pt", dense_dicts()),
        }
        numbers = {name: task.save_file(path) for name, path in files.items()}
        for name, path in files.items():
            print(f"  {name}: {path.stat().st_size:,} bytes", flush=True)
        cdir = ws.root / "tasks" / "t" / "checkpoints"
        os.mkfifo(cdir / "000099.pt")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "im.png")
        w = str(ws.root)
        _, base_s, base = measure([*py, "-w", w, "tasks"], env)
        _, torch_s, torch_base = measure([sys.executable, "-c", "import torch, ckpt.preview"], env)
        cases: list[tuple[str, list[str], float]] = [
            (f"show_{name}", [*py, "-w", w, "show", "t", str(n)], base) for name, n in numbers.items()
        ]
        cases += [
            ("import_dev_zero", [*py, "-w", w, "import", "/dev/zero", "--task", "z"], base),
            ("scan_add_fifo", [*py, "-w", w, "scan", "t", "--add"], base),
            ("load_state_dict_fifo", [sys.executable, "-c", load, str(cdir / "000099.pt")], torch_base),
        ]
        cases += [
            (f"load_state_dict_{name}", [sys.executable, "-c", load, str(files[name])], torch_base)
            for name in ("nested", "zipbomb", "bytearray", "hashed")
        ]
        preview = [*py, "-w", w, "preview", "t", str(numbers["nested"]), "--images", str(root / "im.png")]
        cases.append(("preview_nested", preview, torch_base))
        print(f"RATIO baseline_s {base_s:.2f} -")
        print(f"RATIO baseline_rss_mb {base:.0f} -")
        print(f"RATIO baseline_torch_s {torch_s:.2f} -")
        print(f"RATIO baseline_torch_rss_mb {torch_base:.0f} -")
        for name, cmd, baseline in cases:
            code, seconds, rss = measure(cmd, env)
            failed += code != 6
            extra = seconds - (torch_s if baseline == torch_base else 0.0)
            print(f"RATIO {name}_exit {code} ==6")
            print(f"RATIO {name}_s {seconds:.2f} -")
            print(f"RATIO {name}_extra_s {extra:.2f} <2")
            print(f"RATIO {name}_extra_rss_mb {rss - baseline:.0f} <300", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
