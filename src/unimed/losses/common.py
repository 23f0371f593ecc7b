"""Shared pieces of the losses: the cross-rank feature gather and float32 evaluation.

Distributed convention (shared by every loss here): each rank passes its local rows, all ranks
have the same local batch size B, and the global batch is the rank-ordered concatenation
(rank r owns rows r*B .. r*B+B-1). The all-gather keeps the gradient, and its backward *sums* the
gradients that every rank's loss sends to a row. A loss whose per-rank values average (over ranks)
to the single-process loss L on the global batch therefore gives each rank ``world_size * dL/dx``
for its own rows; DDP's averaging of parameter gradients over ranks then yields exactly dL/dtheta.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

ForwardFn = TypeVar("ForwardFn", bound=Callable[..., dict[str, torch.Tensor]])


def gather_features(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` (B, ...) into (world_size * B, ...), with gradient.

    Identity when ``world_size == 1``. Needs an initialised default process group whose rank and
    size match the arguments (a mismatch means the caller's bookkeeping is wrong: an error).
    """
    if world_size == 1:
        return x
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"gather_features got rank={rank}, world_size={world_size} but the process group has "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )
    # The registered functional op (its autograd, registered by funcol: backward a summed
    # reduce-scatter) waited at once. funcol.all_gather_single wraps the same op's output in an
    # AsyncCollectiveTensor, and with it a gloo rank aborted at exit in 4-5 of 10 runs of
    # tests/losses/test_distributed_prior.py ("terminate called without an active exception").
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(
        x.contiguous(), world_size, dist.group.WORLD.group_name)
    return funcol.wait_tensor(gathered)  # (W*B, ...)


def float32_forward(forward: ForwardFn) -> ForwardFn:
    """Run a loss's forward in float32 with autocast off, whatever precision the model ran in.

    Standardisation over the batch and exp(logit / 0.07) overflow or lose precision in fp16.
    """

    @functools.wraps(forward)
    def wrapper(self, *args: torch.Tensor, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.autocast(device_type=device_type, enabled=False):
            return forward(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
