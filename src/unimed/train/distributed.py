"""All distributed state in one place: torchrun's environment -> :class:`DistInfo`.

Launch with `torchrun --nproc-per-node N ...` (multi-node via torchrun's rendezvous); without
torchrun's variables everything runs as world size 1 with no process group, unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as torch_dist

from unimed.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global rank, rank on its node, job size, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the one process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group spans more than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def dist_info_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun); defaults describe a single process.

    The device is `cuda:<local_rank>` when CUDA is available, else CPU, unless given.
    """
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}: torchrun "
                          "sets 0 <= LOCAL_RANK and 0 <= RANK < WORLD_SIZE")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return DistInfo(rank, local_rank, world_size, torch.device(device))


EACH_RANK = {"each_rank": True}
"""``extra=`` of a log record that every rank of a torchrun job prints: an event of its own shard of
the data (a sample skipped in its batches). The rest, which every rank would log alike (what the
adapters read, a warning about the settings), prints on rank 0 only: :func:`log_on_rank_zero`."""


def log_on_rank_zero() -> None:
    """On a rank other than 0 of a torchrun job, let the root logger's handlers print errors and
    :data:`EACH_RANK` records only, each line starting with the rank; as one process, nothing
    changes. Eight ranks would otherwise print every line eight times."""
    info = dist_info_from_env("cpu")
    if info.is_main:
        return

    def own_or_error(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "each_rank", False)

    for handler in logging.getLogger().handlers:
        handler.addFilter(own_or_error)
        handler.setFormatter(logging.Formatter(f"rank {info.rank}: %(levelname)s %(name)s: %(message)s"))


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun job (nccl on CUDA, gloo on CPU); world size 1 creates no process group."""
    info = dist_info_from_env(device)
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if info.world_size > 1 and not torch_dist.is_initialized():
        backend = backend or ("nccl" if info.device.type == "cuda" else "gloo")
        torch_dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
        log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return info


def barrier(info: DistInfo) -> None:
    """Wait for every rank; a no-op with world size 1."""
    if info.distributed and torch_dist.is_initialized():
        torch_dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with `seed + rank`, so ranks draw different
    dropout masks while the run stays reproducible; returns the seed used."""
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    return rank_seed


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over ranks (a copy; the input is untouched); identity with world size 1."""
    if not info.distributed:
        return value.detach().clone()
    out = value.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / info.world_size


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` with world size 1."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out
