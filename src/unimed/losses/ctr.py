"""Cross-lingual Text alignment Regularisation (CTR, Eq. 5-7): L_TF + L_TT on two dropout views.

Both terms have the redundancy-reduction form of Barlow Twins on a cross-correlation matrix C:
``sum_j (1 - C_jj)^2 + lambda * sum_{i != j} C_ij^2``. The off-diagonal term is squared as in
Barlow Twins and the authors' code (the paper's typeset Eq. 5-6 drops the square).

* L_TF (feature level): standardise each of the D' features over the global batch of K rows,
  C = Z~A^T Z~B / K (D' x D'), loss divided by D'. Every rank computes it on the gathered batch, so
  its value on every rank equals the single-process value.
* L_TT (sample level): standardise each sample over its D' features, C = Z^A Z^B^T / D' (K x K),
  loss divided by K. Samples are standardised independently, so each rank only builds its own
  (B, K) block of rows against the gathered view B; the mean over ranks is the global value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unimed.losses.common import float32_forward, gather_features

# Variance floor of the standardisations (BatchNorm's default), so a constant feature or sample
# gives a zero row in C instead of a division by zero.
_EPS = 1e-5


def redundancy_loss(corr: torch.Tensor, diagonal: torch.Tensor, lambd: float) -> torch.Tensor:
    """``sum (1 - diagonal)^2 + lambd * sum of squared off-diagonal entries`` of `corr`.

    `corr` is a block of rows of a cross-correlation matrix and `diagonal` its entries that lie on
    the full matrix's diagonal.
    """
    on_diag = (1 - diagonal).pow(2).sum()
    off_diag = corr.pow(2).sum() - diagonal.pow(2).sum()
    return on_diag + lambd * off_diag


class CTRLoss(nn.Module):
    """L_TF and L_TT between the P_d projections of two dropout views of the same reports."""

    def __init__(self, lambd: float = 5.1e-3) -> None:
        super().__init__()
        self.lambd = lambd

    @float32_forward
    def forward(
        self, ctr_a: torch.Tensor, ctr_b: torch.Tensor, *, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """(B, D') local views -> {"tf_loss": scalar, "tt_loss": scalar}."""
        all_a = gather_features(ctr_a, rank, world_size)  # (K, D')
        all_b = gather_features(ctr_b, rank, world_size)  # (K, D')
        return {
            "tf_loss": self._feature_loss(all_a, all_b),
            "tt_loss": self._sample_loss(ctr_a, all_b, rank * ctr_a.shape[0]),
        }

    def _feature_loss(self, all_a: torch.Tensor, all_b: torch.Tensor) -> torch.Tensor:
        k, d = all_a.shape
        if k < 2:
            raise ValueError("L_TF standardises over the batch and needs at least 2 samples")
        std_a = F.batch_norm(all_a, None, None, training=True, eps=_EPS)  # (K, D') per feature
        std_b = F.batch_norm(all_b, None, None, training=True, eps=_EPS)
        corr = std_a.T @ std_b / k  # (D', D')
        return redundancy_loss(corr, corr.diagonal(), self.lambd) / d

    def _sample_loss(self, local_a: torch.Tensor, all_b: torch.Tensor, offset: int) -> torch.Tensor:
        b, d = local_a.shape
        std_a = F.layer_norm(local_a, (d,), eps=_EPS)  # (B, D') per sample
        std_b = F.layer_norm(all_b, (d,), eps=_EPS)  # (K, D')
        corr = std_a @ std_b.T / d  # (B, K): this rank's rows of the K x K matrix
        rows = torch.arange(b, device=corr.device)
        return redundancy_loss(corr, corr[rows, rows + offset], self.lambd) / b
