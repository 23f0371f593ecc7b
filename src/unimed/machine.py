"""How fast this machine multiplies matrices: the yardstick for throughput (MFU) and for the main
job's wall time, which scales about inversely with it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time

import torch

# The main job was sized on 2 CPU cores whose fp32 GEMM peak measured about this (FLOP/s).
DEMO_SIZED_ON_FLOPS = 190e9


# glibc's mallopt parameters (malloc.h) and the values set_malloc_for_training gives them.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
MALLOC_SETTINGS = {
    M_MMAP_MAX: 0,  # every block from the heap, none mapped on its own (unmapped when freed)
    M_TRIM_THRESHOLD: -1,  # never give freed heap back to the kernel (malloc(3): -1 disables trimming)
    M_TOP_PAD: 1 << 30,  # grow the heap in 1 GiB steps (address space; pages are touched on use)
}


def set_malloc_for_training() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory for reuse.

    A CPU training step allocates and frees its activations (gigabytes at the paper presets' sizes)
    every step. With glibc's defaults, blocks above a few MiB are mapped afresh and unmapped when
    freed, so each step touches its memory anew: about 10 million minor page faults in a 4-step
    ResNet-50 + BERT-base benchmark run, and page faults are slow in a virtual machine. Here the
    step reuses its heap (benchmarks/pretrain_throughput.py, 2 cores, runs alternated: paper preset
    0.55-0.57 -> 0.71-0.74 samples/s, 1.75 million faults; demo preset 12.2-13.4 -> 16.0-18.2
    samples/s; benchmarks/eval_speed.py one encoder 88-97 -> 85-92 s). The price is memory the
    process keeps at its high-water mark and some fragmentation: peak resident memory +13 % (paper
    preset), +5 % (evaluation). The unimed command line calls this unless ``--system-malloc``.
    Returns False, changing nothing, where the C library is not glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes the kernel can hand out without swapping (Linux's MemAvailable in `meminfo`,
    reclaimable page cache included), or None where it does not say (another OS)."""
    try:
        with open(meminfo, encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


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
