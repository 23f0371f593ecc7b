"""InfoNCE objectives of Med-UniC: CVL (image-text, Eq. 2-3) and SSV (image-image, Eq. 4).

Negatives come from the global batch across ranks; each rank scores only its own rows against the
gathered keys (a (B, W*B) logit matrix instead of (W*B, W*B)), so the per-rank loss is the mean over
its rows and the mean over ranks equals the single-process loss (see :mod:`unimed.losses.common`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unimed.losses.common import float32_forward, gather_features


def info_nce(
    queries: torch.Tensor, keys: torch.Tensor, offset: int, temperature: float
) -> torch.Tensor:
    """Mean cross-entropy of `queries` (B, D) against `keys` (N, D); row i's positive is offset + i.

    Both inputs must already be L2-normalised, so the logits are cosine similarities / temperature.
    """
    logits = queries @ keys.T / temperature  # (B, N)
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, targets)


class CVLLoss(nn.Module):
    """Symmetric image-text InfoNCE (Eq. 2-3): (L_v2l + L_l2v) / 2 over L2-normalised features."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = temperature

    @float32_forward
    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """(B, D) paired local features -> {"cvl_loss": scalar}."""
        image = F.normalize(image_features, dim=-1)  # (B, D)
        text = F.normalize(text_features, dim=-1)  # (B, D)
        all_image = gather_features(image, rank, world_size)  # (W*B, D)
        all_text = gather_features(text, rank, world_size)  # (W*B, D)
        offset = rank * image.shape[0]
        image_to_text = info_nce(image, all_text, offset, self.temperature)
        text_to_image = info_nce(text, all_image, offset, self.temperature)
        return {"cvl_loss": (image_to_text + text_to_image) / 2}


class SSVLoss(nn.Module):
    """Image-view InfoNCE (Eq. 4): view 1 queries against view 2 keys.

    The paper's Eq. 4 is one-directional (v -> v'), which is the default; ``symmetric=True``
    averages both directions like CVL (what the authors' released code does).
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric

    @float32_forward
    def forward(
        self,
        image_features: torch.Tensor,
        image_aug_features: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """(B, D) features of two views of the same images -> {"ssv_loss": scalar}."""
        view1 = F.normalize(image_features, dim=-1)  # (B, D)
        view2 = F.normalize(image_aug_features, dim=-1)  # (B, D)
        offset = rank * view1.shape[0]
        loss = info_nce(view1, gather_features(view2, rank, world_size), offset, self.temperature)
        if self.symmetric:
            all_view1 = gather_features(view1, rank, world_size)  # (W*B, D)
            reverse = info_nce(view2, all_view1, offset, self.temperature)
            loss = (loss + reverse) / 2
        return {"ssv_loss": loss}
