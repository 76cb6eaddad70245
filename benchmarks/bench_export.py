"""`ckpt export` of a pickled .pt state dict to safetensors against the naive way, in one run.

The naive way is `torch.load(path, weights_only=True)` then `safetensors.torch.save_file`. Each side runs
in its own process, one after the other, on the same file with the page cache warm for both; each reports
its wall time and its peak resident memory (VmHWM: anonymous memory and the file pages it maps). Targets:
time <= 1.0x naive, peak RSS <= 0.25x naive's.

    python benchmarks/bench_export.py                 # 2 GiB, tensors of at most 256 MiB
    python benchmarks/bench_export.py --size-mib 256  # quick (--quick is the same)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import CHECKOUT, PYTHON, QUICK, bench_env

NAIVE = """
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], weights_only=True)
save_file(sd, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": PEAK()}))
"""
CKPT = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from ckpt.export import export
from ckpt.sources import open_contents
export(open_contents(Path(sys.argv[1])), Path(sys.argv[2]))
assert "torch" not in sys.modules
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": PEAK()}))
"""
PEAK = """
def PEAK():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""


def make(path: Path, total: int, largest: int) -> int:
    """A state dict of float32 tensors, each at most `largest` bytes, `total` bytes in all, saved with torch."""
    import torch

    g = torch.Generator().manual_seed(0)
    sd, left, i = {}, total, 0
    sizes = [largest, largest // 4, largest // 16, 4 << 20, 1 << 20]
    while left > 0:
        size = min(sizes[i % len(sizes)], left)
        sd[f"layers.{i}.weight"] = torch.randn(size // 4 // 256, 256, generator=g)
        left -= size
        i += 1
    torch.save(sd, path)
    return len(sd)


def run(code: str, src: Path, out: Path) -> dict[str, float]:
    env = bench_env()
    env["PYTHONPATH"] = str(CHECKOUT)
    proc = subprocess.run(
        [PYTHON, "-c", PEAK + code, str(src), str(out)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256 if QUICK else 2048)
    parser.add_argument("--largest-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-export-", dir=os.environ.get("CKPT_BENCH_DIR")) as tmp:
        src = Path(tmp) / "model.pt"
        n = make(src, args.size_mib << 20, args.largest_mib << 20)
        print(f"{src.stat().st_size / 2**30:.2f} GiB in {n} tensors (at most {args.largest_mib} MiB each)")
        warm(src)
        naive = run(NAIVE, src, Path(tmp) / "naive.safetensors")
        (Path(tmp) / "naive.safetensors").unlink()
        warm(src)
        ours = run(CKPT, src, Path(tmp) / "ckpt.safetensors")
        for name, r in (("naive", naive), ("ckpt export", ours)):
            print(f"{name:12} {r['seconds']:6.2f} s   peak RSS {r['peak'] / 2**20:7.0f} MiB")
        print(f"RATIO export_time_vs_naive {ours['seconds'] / naive['seconds']:.2f} <=1.0")
        print(f"RATIO export_peak_rss_vs_naive {ours['peak'] / naive['peak']:.3f} <=0.25")


if __name__ == "__main__":
    main()
