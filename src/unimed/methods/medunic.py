"""Med-UniC as a method: the model of :mod:`unimed.models.medunic` trained with the weighted
CVL + SSV + CTR objective of :mod:`unimed.losses.medunic`, in one stage."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from unimed.losses.medunic import MedUniCLoss
from unimed.methods.base import Method, StepContext
from unimed.models.config import MedUniCConfig
from unimed.models.image import create_image_encoder, freeze_image_levels
from unimed.models.medunic import MedUniC
from unimed.models.text import create_text_encoder, freeze_text_layers


class MedUniCMethod(Method):
    """Med-UniC pre-training: ``forward`` runs the model on the batch and returns the weighted
    terms ("cvl_loss", "ssv_loss", "tf_loss", "tt_loss") and their sum "loss"."""

    def __init__(self, cfg: MedUniCConfig, model: MedUniC) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.loss = MedUniCLoss(cfg.loss)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.loss(**self.model(batch), rank=ctx.rank, world_size=ctx.world_size)


def build_medunic(
    cfg: MedUniCConfig, *, vocab_size: int | None = None,
    text_encoder: str | PretrainedConfig | None = None,
) -> MedUniCMethod:
    """Med-UniC from `cfg`: timm image preset, BERT text encoder with its first layers frozen."""
    image = create_image_encoder(cfg.image.encoder, cfg.image.weights)
    freeze_image_levels(image, cfg.image.frozen_levels)
    text = create_text_encoder(text_encoder or cfg.text.encoder, cfg.text, vocab_size=vocab_size)
    freeze_text_layers(text, cfg.text.frozen_layers)
    return MedUniCMethod(cfg, MedUniC(cfg, image, text))
