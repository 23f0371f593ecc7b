"""Projection heads mapping encoder features into the spaces where the losses interact."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

# A domain batch norm's statistic in a state dict: the head's prefix, the norm (0: hidden, 1:
# output) and the statistic's name.
_DOMAIN_STATISTIC = re.compile(r"(?P<head>.*)domain_norms\.[^.]+\.(?P<norm>[01])\."
                               r"(?P<name>running_mean|running_var|num_batches_tracked)")


def statistic_before_domains(key: str) -> str | None:
    """The key of the default batch norm's statistic from which the domain norm's statistic `key`
    starts when a checkpoint written before its head had domains (UniMedI before 0c2060e) is
    loaded; None for any other key."""
    match = _DOMAIN_STATISTIC.fullmatch(key)
    if match is None:
        return None
    return f"{match['head']}{'mlp.1.' if match['norm'] == '0' else 'norm.'}{match['name']}"


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU-Linear, optionally followed by a non-affine BatchNorm1d.

    The trailing BatchNorm1d is the paper's "batch normalization before interaction" for P_v and
    P_l; it has no affine parameters because the features are L2-normalised right after, so a
    learned per-dimension scale would only re-weight dimensions of the cosine similarity.

    `domains` name inputs of another kind than the default one (UniMedI's CT volumes beside its
    X-rays) that train in batches of their own: each gets batch norms with running statistics of
    its own and the default ones' affine parameters (the same tensors), selected by ``forward``'s
    `domain`. A batch norm trains on its batch's statistics whatever they are, but evaluates with
    running ones, and one set of running statistics averaged over two kinds of batches fits
    neither (measured on UniMedI's CT volumes: docs/LEARNING.md, "UniMedI learns the findings only
    in part").
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, out_norm: bool,
                 domains: Sequence[str] = ()) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = nn.BatchNorm1d(out_dim, affine=False) if out_norm else nn.Identity()
        self.domain_norms = nn.ModuleDict({domain: self._norms_like_default(out_dim, out_norm)
                                           for domain in domains})

    def _norms_like_default(self, out_dim: int, out_norm: bool) -> nn.ModuleList:
        """The hidden and output batch norms of another domain: fresh running statistics, the
        default hidden norm's affine parameters."""
        default = self.mlp[1]
        hidden = nn.BatchNorm1d(default.num_features)
        hidden.weight, hidden.bias = default.weight, default.bias
        out = nn.BatchNorm1d(out_dim, affine=False) if out_norm else nn.Identity()
        return nn.ModuleList([hidden, out])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
                              ) -> None:
        """A checkpoint written before the head had `domains` holds one set of running statistics:
        each domain starts from it (the statistics its samples were evaluated with then), said in
        one warning."""
        filled = []
        for key in self.domain_norms.state_dict(prefix=f"{prefix}domain_norms."):
            default = statistic_before_domains(key)
            if key not in state_dict and default in state_dict:
                state_dict[key] = state_dict[default].clone()
                filled.append(key)
        if filled:
            log.warning("%s: the checkpoint predates running statistics per domain (%s): each starts "
                        "from the one set it holds, as its samples were evaluated before 0c2060e",
                        prefix.rstrip(".") or "projection head", ", ".join(self.domain_norms))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim), through the batch norms of `domain` (one of `domains`;
        None: the default ones)."""
        if domain is None:
            return self.norm(self.mlp(x))
        return self._through(x, *self.domain_norms[domain])

    def untracked(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward`` computes, leaving the running statistics as they are: for a view that
        trains but is never evaluated (Med-UniC's augmented SSV view), whose batches would
        otherwise average into the statistics the evaluation reads. In training the batch norms
        normalise by the batch's statistics either way; in evaluation this is ``forward``."""
        return self._through(x, functools.partial(_untracked, self.mlp[1]),
                             functools.partial(_untracked, self.norm))

    def _through(self, x: torch.Tensor, hidden_norm: Callable[[torch.Tensor], torch.Tensor],
                 out_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The head's layers with `hidden_norm` and `out_norm` in place of its own two norms."""
        first, _, act, second = self.mlp
        return out_norm(second(act(hidden_norm(first(x)))))


def _untracked(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm` applied to `x`; a training batch norm (a SyncBatchNorm too) by the batch's statistics
    with a momentum of 0 for the call, so its running ones stay as they are."""
    if not (isinstance(norm, _BatchNorm) and norm.training):
        return norm(x)
    momentum, norm.momentum = norm.momentum, 0.0
    try:
        return norm(x)
    finally:
        norm.momentum = momentum
