"""UniMedI's self-distillation (spec §6): DINO's head and loss on the [CLS] token (L_icl) and on
the masked patch tokens (L_pcl, iBOT's form), with the EMA teacher's schedules and update.

The schedules are plain functions of the epoch or step: the training loop computes them and passes
the values in (DINOv2's split), so the loss and the head hold no schedule state.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from unimed.losses.common import float32_forward


class DinoHead(nn.Module):
    """DINO's projection head: MLP (GELU, no BatchNorm) to a bottleneck, L2-normalise, then a
    weight-normalised Linear onto `out_dim` prototypes without bias.

    With `norm_last_layer` the last layer's magnitude is fixed to 1, so its rows stay unit-norm and
    the logits are cosines; otherwise the magnitude starts at 1 and is learnt.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"DinoHead needs at least one MLP layer, got layers={layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                blocks.append(nn.GELU())
            blocks.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*blocks)
        self.mlp.apply(_init_linear)
        # As in DINO, the last layer keeps PyTorch's default init: with magnitude 1 only the
        # direction of each row matters.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        nn.init.ones_(magnitude)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) prototype logits."""
        x = F.normalize(self.mlp(x), dim=-1)  # (..., bottleneck_dim)
        return self.last_layer(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def teacher_temperature(epoch: int, *, start: float, end: float, warmup_epochs: int) -> float:
    """DINO's per-epoch teacher temperature: linear from `start` (epoch 0) to `end` (epoch
    warmup_epochs - 1), then constant `end`; no warm-up when ``warmup_epochs == 0``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch >= warmup_epochs:
        return float(end)
    return float(np.linspace(start, end, warmup_epochs)[epoch])


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum at `step`: a cosine from `base` (step 0) to 1 (step >= total_steps)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step, total_steps) / total_steps
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def _matched(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], kind: str
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The floating tensors of two name -> tensor maps with the same names, in order."""
    for position, (t_name, s_name) in enumerate(itertools.zip_longest(teacher, student)):
        if t_name != s_name:
            raise ValueError(
                f"teacher and student {kind} differ at position {position}: teacher has "
                f"{t_name!r}, student has {s_name!r}"
            )
    names = [name for name, t in teacher.items() if t.is_floating_point()]
    return [teacher[n] for n in names], [student[n] for n in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for every floating parameter, matched by
    name; floating buffers (e.g. BatchNorm statistics) are copied from the student.

    The teacher must be a structural copy of the student (same parameter and buffer names).
    """
    t_params, s_params = _matched(
        dict(teacher.named_parameters()), dict(student.named_parameters()), "parameters"
    )
    t_buffers, s_buffers = _matched(
        dict(teacher.named_buffers()), dict(student.named_buffers()), "buffers"
    )
    if t_params:
        torch._foreach_lerp_(t_params, s_params, 1 - momentum)
    for t_buffer, s_buffer in zip(t_buffers, s_buffers):
        t_buffer.copy_(s_buffer)


class DistillationLoss(nn.Module):
    """DINO's cross-entropy between a centred, sharpened teacher and the student (spec §6).

    [CLS] form (L_icl): (B, K) logits, mean over samples of
    sum_K -softmax((t - c) / T_t) log_softmax(s / T_s). Patch form (L_pcl, iBOT): (B, T, K) logits
    and a (B, T) mask, the per-token cross-entropy averaged over each image's masked tokens, then
    over images. In training the center c then moves towards the batch mean of the raw teacher
    logits (all tokens in the patch form), averaged over ranks: c <- m c + (1 - m) mean.
    """

    def __init__(
        self, out_dim: int, *, student_temperature: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @float32_forward
    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        teacher_temperature: float,
        mask: torch.Tensor | None = None,
        *,
        world_size: int = 1,
    ) -> torch.Tensor:
        """(B, K) logits, or (B, T, K) logits with a (B, T) bool mask (True = masked for the
        student, where the loss is taken) -> scalar loss."""
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
        expected_dim = 2 if mask is None else 3
        if student.dim() != expected_dim:
            raise ValueError(
                f"expected {expected_dim}-D logits {'without' if mask is None else 'with'} a "
                f"mask, got shape {tuple(student.shape)}"
            )
        teacher = teacher.detach()
        targets = F.softmax((teacher - self.center) / teacher_temperature, dim=-1)
        log_probs = F.log_softmax(student / self.student_temperature, dim=-1)
        per_token = -(targets * log_probs).sum(-1)  # (B,) or (B, T)
        if mask is None:
            loss = per_token.mean()
        else:
            if mask.shape != per_token.shape:
                raise ValueError(f"mask {tuple(mask.shape)} != logits {tuple(per_token.shape)}")
            weights = mask.bool().to(per_token.dtype)
            loss = ((per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1)).mean()
        if self.training:
            self._update_center(teacher, world_size)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor, world_size: int) -> None:
        if teacher.dim() == 3:
            teacher = teacher.mean(1)  # (B, K): each image's mean over its tokens
        batch_mean = teacher.mean(0, keepdim=True)  # (1, K)
        if world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"world_size={world_size} but torch.distributed is not initialised"
                )
            dist.all_reduce(batch_mean)
            batch_mean = batch_mean / world_size
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
