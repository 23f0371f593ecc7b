"""How fast this machine multiplies matrices: the yardstick for throughput (MFU) and for the main
job's wall time, which scales about inversely with it."""

from __future__ import annotations

import time

import torch

# The main job was sized on 2 CPU cores whose fp32 GEMM peak measured about this (FLOP/s).
DEMO_SIZED_ON_FLOPS = 190e9


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device: torch.device, dtype: torch.dtype = torch.float32,
              sizes: tuple[int, ...] = (2048, 4096), reps: int = 5) -> float:
    """Best FLOP/s of square matmuls over `sizes` and `reps` repeats (after one warm-up each):
    the machine's GEMM peak on the threads torch uses.

    Best-of rather than mean because other processes share the cores: the peak is what the
    hardware does when it is not interrupted.
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best
