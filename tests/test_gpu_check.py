"""benchmarks/gpu_check.sh runs end to end in its CPU dry run, so the GPU script cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_gpu_check_dry_run_passes_every_check() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--steps", "1"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for check in ("throughput", "fp32 GPU = CPU", "nccl", "evaluation"):
        assert f"[ok] {check}:" in done.stdout
    assert "medunic_vit_l32" in done.stdout  # every paper preset took its steps
    assert "2-process gloo DDP step" in done.stdout
