"""Projection heads mapping encoder features into the spaces where the losses interact."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU-Linear, optionally followed by a non-affine BatchNorm1d.

    The trailing BatchNorm1d is the paper's "batch normalization before interaction" for P_v and
    P_l; it has no affine parameters because the features are L2-normalised right after, so a
    learned per-dimension scale would only re-weight dimensions of the cosine similarity.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, out_norm: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = nn.BatchNorm1d(out_dim, affine=False) if out_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.norm(self.mlp(x))
