"""The short stress run in CI: benchmarks/stress.py --quick (6 s of six concurrent commands against a saving
writer, then 50 SIGKILLs during save, promote, trash-unused, restore and empty). Nothing may be lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STRESS = Path(__file__).resolve().parent.parent / "benchmarks" / "stress.py"


@pytest.mark.stress
def test_quick_stress_run_loses_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_WORKSPACE", "CKPT_LOCK_TIMEOUT")}
    proc = subprocess.run(
        [sys.executable, str(STRESS), "--quick", "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.stdout.strip(), proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(figures))
    assert proc.returncode == 0, figures["problems"]
    assert figures["lost"] == 0 and not figures["problems"]
    assert figures["kills"] >= 50
    assert figures["checkpoints_checked"] > 0
    assert figures["operations_total"] > 200
