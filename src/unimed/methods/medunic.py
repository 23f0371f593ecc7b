"""Med-UniC as a method: the model of :mod:`unimed.models.medunic` trained with the weighted
CVL + SSV + CTR objective of :mod:`unimed.losses.medunic`, in one stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import PretrainedConfig

from unimed.losses.medunic import MedUniCLoss
from unimed.methods.base import Method, Stage, StepContext
from unimed.models.config import MedUniCConfig
from unimed.models.image import create_image_encoder, freeze_image_levels
from unimed.models.medunic import MedUniC
from unimed.models.text import (
    appended_rows_start,
    create_text_encoder,
    freeze_text_layers,
    train_appended_rows,
)
from unimed.train.config import TrainConfig
from unimed.train.optim import build_optimizer, build_scheduler


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

    def unused_parameters(self, loaders: Sequence[str]) -> str | None:
        """P_l without CVL; the word embeddings in a batch without an appended term when the
        appended rows train under a shared frozen trunk (:mod:`unimed.models.medunic`)."""
        if self.cfg.loss.cvl_weight == 0:
            return "method.loss.cvl_weight is 0, so P_l gets no gradient"
        if self.cfg.text.train_appended_rows and not self.cfg.text.frozen_dropout:
            return ("method.text.train_appended_rows: a batch without an appended term gives the word "
                    "embeddings no gradient")
        return None

    def configure_optimizer(
        self, stage: Stage, train: TrainConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """AdamW with warm-up + cosine; trainable appended word rows get no weight decay, which
        would shrink the base rows they share a tensor with."""
        words = self.model.text.embeddings.word_embeddings.weight
        appended = self.model.trainable_rows_from is not None
        optimizer = build_optimizer(self, train, no_decay=(words,) if appended else ())
        return optimizer, build_scheduler(optimizer, train, total_steps)


def build_medunic(
    cfg: MedUniCConfig, *, vocab_size: int | None = None,
    text_encoder: str | PretrainedConfig | None = None,
) -> MedUniCMethod:
    """Med-UniC from `cfg`: timm image preset, BERT text encoder with its first layers frozen."""
    image = create_image_encoder(cfg.image.encoder, cfg.image.weights)
    freeze_image_levels(image, cfg.image.frozen_levels)
    text = create_text_encoder(text_encoder or cfg.text.encoder, cfg.text, vocab_size=vocab_size)
    freeze_text_layers(text, cfg.text.frozen_layers)
    rows_from = None
    if cfg.text.train_appended_rows:
        rows_from = appended_rows_start(text, text_encoder or cfg.text.encoder)
        train_appended_rows(text.embeddings.word_embeddings.weight, rows_from,
                            "method.text.train_appended_rows")
    return MedUniCMethod(cfg, MedUniC(cfg, image, text, trainable_rows_from=rows_from))
