"""Med-UniC: image encoder F_v, cross-lingual BERT F_l, projectors P_v, P_l (CVL/SSV) and P_d (CTR).

Efficiency and BatchNorm semantics of the two-view forward:

* The two image views run through F_v as one concatenated (2B) batch, and the two text views as one
  (2B) batch through F_l; dropout masks are drawn per element, so the text rows still differ.
* For convolutional encoders this means F_v's BatchNorm normalises over both views together, as in
  SimCLR (the paper's reference [19] for SSV); ViTs use LayerNorm and are unaffected.
* The projectors run on each view separately, so the "BN before interaction" of ``image_features``
  uses the statistics of view 1 alone: switching SSV on or off does not change how the CVL features
  are normalised, and P_d normalises each dropout view on its own as in Barlow Twins.
* Work for a loss whose weight is 0 is skipped (no second image view without SSV, one text pass
  without CTR, no P_l pass without CVL). A module that then gets no gradient (P_l with
  ``cvl_weight`` 0) needs DDP's ``find_unused_parameters``, which the loop turns on
  (:meth:`unimed.methods.medunic.MedUniCMethod.unused_parameters`); P_d is not even built without
  CTR.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel

from unimed.models.config import ImageTowerConfig, MedUniCConfig
from unimed.models.heads import ProjectionHead
from unimed.models.text import pool_text, text_cache


class MedUniC(nn.Module):
    """The Med-UniC model; ``forward(batch)`` returns the features the Med-UniC losses consume.

    ``encode_image`` / ``encode_text`` return projected features after the final BatchNorm and are
    *not* L2-normalised unless ``normalize=True``; zero-shot and retrieval use cosine similarity.
    Every image entry point takes pixels in [0, 1] and applies :meth:`preprocess` (the image
    encoder's mean / std) itself, so callers never normalise.
    """

    def __init__(self, cfg: MedUniCConfig, image_encoder: nn.Module, text_encoder: BertModel,
                 *, trainable_rows_from: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.trainable_rows_from = trainable_rows_from  # appended word rows that train, if any
        self.visual = image_encoder
        if cfg.image.compile:
            # In place, so state-dict keys stay unchanged; on 2 CPU cores a compiled ResNet-50
            # forward + backward ran 30% faster than eager, after about a minute of compiling.
            self.visual.compile()
        self.text = text_encoder
        self.text_cache = text_cache(cfg.text.cache_frozen, text_encoder)
        mean, std = image_normalisation(cfg.image, image_encoder)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        image_width = int(image_encoder.num_features)
        text_width = int(text_encoder.config.hidden_size)
        hidden, embed_dim = cfg.projector.hidden_dim, cfg.projector.embed_dim
        self.image_proj = ProjectionHead(image_width, hidden, embed_dim, out_norm=True)  # P_v
        self.text_proj = ProjectionHead(text_width, hidden, embed_dim, out_norm=True)  # P_l
        self.ctr_proj = (  # P_d
            ProjectionHead(text_width, hidden, cfg.projector.ctr_dim, out_norm=False)
            if cfg.loss.ctr_weight > 0
            else None
        )

    @property
    def temperature(self) -> float:
        """The CVL temperature the model is trained with."""
        return self.cfg.loss.temperature

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> the image encoder's normalised input."""
        return (image - self.pixel_mean) / self.pixel_std

    def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> (B, D_v) pooled F_v features (linear probes)."""
        return self.visual(self.preprocess(image))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D_v) pooled image features -> (B, embed_dim): P_v."""
        return self.image_proj(pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, hidden) pooled text features -> (B, embed_dim): P_l."""
        return self.text_proj(pooled)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> (B, embed_dim): P_v(F_v(image))."""
        features = self.project_image(self.pooled_image(image))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False
    ) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, embed_dim): P_l(pooled F_l)."""
        features = self.project_text(self.pooled_text(input_ids, attention_mask))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, hidden) sentence features of F_l (`method.text.pooling`)."""
        return pool_text(self.text, input_ids, attention_mask, self.cfg.text.pooling)

    def forward_intermediates(
        self, image: torch.Tensor, indices: int | list[int] | None = None
    ) -> list[torch.Tensor]:
        """Dense feature maps of F_v, each (B, C_i, H_i, W_i), shallow to deep (timm's indices)."""
        return self.visual.forward_intermediates(
            self.preprocess(image), indices=indices, intermediates_only=True
        )

    def lock_image(self) -> None:
        """Freeze F_v and P_v (for evaluation protocols that train only a head)."""
        for module in (self.visual, self.image_proj):
            module.requires_grad_(False)

    def lock_text(self) -> None:
        """Freeze F_l and P_l."""
        for module in (self.text, self.text_proj):
            module.requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Features for the enabled losses from a batch with "image", "image_aug", "input_ids",
        "attention_mask".

        Returns "image_features" and "image_aug_features" (B, embed_dim), "text_features"
        (B, embed_dim) and "ctr_a", "ctr_b" (B, ctr_dim); keys whose loss has weight 0 are absent.
        """
        weights = self.cfg.loss
        out: dict[str, torch.Tensor] = {}
        if weights.cvl_weight > 0 or weights.ssv_weight > 0:
            out.update(self._image_views(batch, two_views=weights.ssv_weight > 0))
        if weights.cvl_weight > 0 or weights.ctr_weight > 0:
            out.update(self._text_views(batch))
        return out

    def _image_views(self, batch: dict[str, Any], two_views: bool) -> dict[str, torch.Tensor]:
        image = _require(batch, "image", "the image encoder")
        if not two_views:
            return {"image_features": self.encode_image(image)}
        image_aug = _require(batch, "image_aug", f"SSV (ssv_weight={self.cfg.loss.ssv_weight})")
        if image_aug.shape != image.shape:
            raise ValueError(
                f"batch 'image' {tuple(image.shape)} and 'image_aug' {tuple(image_aug.shape)} "
                "must have the same shape"
            )
        pooled = self.pooled_image(torch.cat([image, image_aug]))  # (2B, D_v)
        view1, view2 = pooled.chunk(2)
        # The augmented view trains but is never evaluated: it leaves the projector's running
        # statistics to the original views (ProjectionHead.untracked)
        return {
            "image_features": self.image_proj(view1),
            "image_aug_features": self.image_proj.untracked(view2),
        }

    def _text_views(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids = _require(batch, "input_ids", "the text encoder")
        attention_mask = _require(batch, "attention_mask", "the text encoder")
        text = self.cfg.text
        views = 1 if self.ctr_proj is None else 2  # CTR: two dropout views, drawn per row
        pooled = pool_text(self.text, input_ids, attention_mask, text.pooling, views=views,
                           shared_layers=0 if text.frozen_dropout else text.frozen_layers,
                           trainable_rows_from=self.trainable_rows_from,
                           cache=self.text_cache if self.training else None)
        if self.ctr_proj is None:
            return {"text_features": self.text_proj(pooled)}
        out: dict[str, torch.Tensor] = {}
        view_a, view_b = pooled.chunk(2)  # (B, H) each
        if self.cfg.loss.cvl_weight > 0:
            out["text_features"] = self.text_proj(view_a)
        out["ctr_a"] = self.ctr_proj(view_a)
        out["ctr_b"] = self.ctr_proj(view_b)
        return out


def image_normalisation(
    cfg: ImageTowerConfig, image_encoder: nn.Module
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the image input: the config's, else the encoder's own."""
    own = getattr(image_encoder, "pretrained_cfg", {}) or {}
    mean = cfg.mean or own.get("mean") or (0.0, 0.0, 0.0)
    std = cfg.std or own.get("std") or (1.0, 1.0, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _require(batch: dict[str, Any], key: str, needed_by: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no '{key}' (needed by {needed_by}); batch keys: {sorted(batch)}")
    return batch[key]
