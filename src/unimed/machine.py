"""How fast this machine multiplies matrices: the yardstick for throughput (MFU) and for the main
job's wall time, which scales about inversely with it."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import unimed

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


PACKAGES = ("torch", "torchvision", "transformers", "timm", "numpy", "scikit-learn", "monai")
"""The libraries whose versions move a result (kernels, tokenisation, metrics), recorded with it."""


def processor() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                          check=False)


def source_commit() -> str | None:
    """The git commit of the checkout unimed runs from, with "-dirty" when its tracked files were
    edited since; None for an installed package (even one inside another project's repository,
    such as a virtual environment there, whose files git does not track) or where git is missing."""
    source = Path(unimed.__file__).resolve().parent
    try:
        if _git(source, "ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        head = _git(source, "rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def software() -> dict[str, object]:
    """What produced a result, for its metrics.json and logs: unimed's version and commit, Python's
    and the key libraries' versions (None for one not installed), the processor, the GPUs torch
    sees (by name once CUDA has started) and the threads it uses."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # A GPU's name needs the CUDA runtime: a process that has not started it (a CPU job, a parent
    # about to fork loader or evaluation workers) is not made to, and names the devices by index.
    named = torch.cuda.is_initialized()
    gpus = [torch.cuda.get_device_name(i) if named else f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {"unimed": unimed.__version__, "commit": source_commit(), "python": platform.python_version(),
            **versions, "processor": processor(), "gpus": gpus, "threads": torch.get_num_threads()}


def describe_software(info: dict) -> str:
    """:func:`software`'s record in one line: "unimed 0.1.0 (commit 1a2b3c4), python 3.11.7, torch
    2.14.1, ...; AMD EPYC, 2 threads"."""
    sha, _, state = str(info.get("commit") or "").partition("-")
    commit = f" (commit {sha[:12]}{'-' + state if state else ''})" if sha else ""
    head = f"unimed {info.get('unimed')}{commit}"
    libraries = [f"{name} {info[name]}" for name in ("python", *PACKAGES) if info.get(name)]
    machine = [str(info.get("processor") or "unknown processor"), *(info.get("gpus") or []),
               f"{info.get('threads')} threads"]
    return f"{', '.join([head, *libraries])}; {', '.join(machine)}"
