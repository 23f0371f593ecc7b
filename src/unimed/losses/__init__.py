"""Training objectives: one module per objective, tensors in, {"<name>_loss": tensor} out.

Rank and world size are explicit forward arguments; features are all-gathered with gradient so
negatives and batch statistics span every rank (conventions in :mod:`unimed.losses.common`).
"""

from unimed.losses.common import gather_features
from unimed.losses.contrastive import CVLLoss, SSVLoss, info_nce
from unimed.losses.ctr import CTRLoss
from unimed.losses.medunic import MedUniCLoss

__all__ = ["CTRLoss", "CVLLoss", "MedUniCLoss", "SSVLoss", "gather_features", "info_nce"]
