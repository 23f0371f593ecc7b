"""Run a function on gloo ranks in spawned processes, for tests of cross-rank loss code."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, fn: Callable[[int, int], Any], world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int], Any], world: int, out_dir: Path) -> list[Any]:
    """`fn(rank, world)` on each of `world` gloo ranks (a module-level function, so spawned
    processes can import it); its results, saved with torch.save, in rank order."""
    mp.spawn(_rank, args=(fn, world, _free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=True) for r in range(world)]
