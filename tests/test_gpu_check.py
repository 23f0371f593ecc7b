"""benchmarks/gpu_check.sh runs end to end in its CPU dry run, so the GPU script cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_scripts import benchmark_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_gpu_check_dry_run_passes_every_check() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--steps", "1", "--profile", "3"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for check in ("throughput", "fp32 GPU = CPU", "nccl", "evaluation"):
        assert f"[ok] {check}:" in done.stdout
    # every paper preset took its steps, UniMedI's X-ray and CT steps apart
    for row in ("medunic_resnet50", "medunic_vit_b16", "medunic_vit_l32", "prior_resnet50",
                "unimedi_vit_b16 (xray)", "unimedi_vit_b16 (ct)"):
        assert f"{row} " in done.stdout.split("[ok] throughput:")[1].split("\n")[0]
    assert done.stdout.count(": one step, top ops ---") == 6  # --profile: one table a row
    assert "2-process gloo DDP step (fp32)" in done.stdout
    assert "weights moved by up to" in done.stdout


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_mfu_peak_is_the_datasheet_figure_of_the_name_the_gpu_reports(name, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    with benchmark_script("gpu_check") as gpu_check:
        assert gpu_check.dense_fp16_peak(torch.device("cuda")) == (tflops * 1e12, name)
