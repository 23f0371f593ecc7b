"""PRIOR as a method: the model of :mod:`unimed.models.prior` trained with
:class:`unimed.losses.prior.PriorLoss` in three stages (spec shared/specs/PRIOR.md §6).

Stage "alignment" (1): global + local alignment on the raw sentences. "prototypes" (2): sentences
pass through the prototype bank, + its L1 term. "reconstruction" (3): + image and report
reconstruction. The loop re-creates optimizer and schedule at each stage start (also when a run
resumes inside a stage, with the schedule's state restored). Parts a stage does not use are frozen
for it, so with the presets' weights every trainable parameter gets a gradient (DDP needs no
``find_unused_parameters``); a loss weight set to 0 drops its term, and the parameters only that
term reads (e.g. the local attention of ``local_sentence_weight``) then need DDP's
``find_unused_parameters``, which the loop turns on (:meth:`PriorMethod.unused_parameters`).
The Gumbel temperature moves after every optimizer step of stages 2-3 (``method.gumbel_schedule``)
and is a checkpointed buffer of the bank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from unimed.data.config import DataConfig
from unimed.data.prior import PriorCollator, PriorPretrainDataset, filter_by_sentences
from unimed.data.pretrain import build_pretrain_loader, image_loader
from unimed.data.records import Record
from unimed.data.transforms import prior_transform
from unimed.errors import ConfigError
from unimed.losses.prior import PriorLoss
from unimed.methods.base import Method, Stage, StepContext
from unimed.models.image import create_image_encoder, freeze_image_levels
from unimed.models.prior import Prior
from unimed.models.prior_config import STAGE_NAMES, PriorConfig
from unimed.models.prior_layers import gumbel_temperature
from unimed.models.text import create_text_encoder, freeze_text_layers
from unimed.train.config import TrainConfig


class PriorMethod(Method):
    """PRIOR pre-training: ``forward`` returns the weighted terms of the current stage and "loss"."""

    def __init__(self, cfg: PriorConfig, model: Prior) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.loss = PriorLoss(cfg)
        self._bank_steps = (0, 1)  # (first step of stage 2 within the bank's span, span length)

    def stages(self, train: TrainConfig) -> list[Stage]:
        """Stages 1-3 with `method.stage_epochs`; a stage of 0 epochs is skipped."""
        return [Stage(name, epochs) for name, epochs in zip(STAGE_NAMES, self.cfg.stage_epochs)
                if epochs > 0]

    def start_stage(self, stage: Stage) -> None:
        number = STAGE_NAMES.index(stage.name) + 1
        self.model.set_stage(number)
        model = self.model
        model.bank.requires_grad_(number >= 2)
        model.image_decoder.requires_grad_(number == 3)
        model.report_decoder.requires_grad_(number == 3)

    def configure_optimizer(self, stage: Stage, train: TrainConfig, total_steps: int
                            ) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """A fresh optimizer and warm-up + cosine schedule for the stage; also fixes the span of
        steps over which the Gumbel temperature moves (stages 2 and 3 together)."""
        per_epoch = total_steps / max(stage.epochs, 1)
        _, second, third = self.cfg.stage_epochs
        offset = 0 if stage.name != "reconstruction" else round(per_epoch * second)
        self._bank_steps = (offset, max(round(per_epoch * (second + third)), 1))
        return super().configure_optimizer(stage, train, total_steps)

    def unused_parameters(self, loaders: Sequence[str]) -> str | None:
        """A training loss weight of 0 drops its term, and the parameters only it reads with it."""
        zero = [f.name for f in dataclasses.fields(self.cfg) if f.name.endswith("_weight")
                and f.name != "zero_shot_local_weight" and getattr(self.cfg, f.name) == 0]
        if zero:
            return f"method.{zero[0]} is 0, so the parameters only its term reads get no gradient"
        return None

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        stage = STAGE_NAMES.index(ctx.stage) + 1
        return self.loss(self.model(batch, stage), stage, rank=ctx.rank,
                         world_size=ctx.world_size)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Move the Gumbel temperature to its value for the next step (stages 2-3)."""
        if ctx.stage == STAGE_NAMES[0]:
            return
        offset, total = self._bank_steps
        cfg = self.cfg
        self.model.bank.set_temperature(gumbel_temperature(
            offset + ctx.stage_step + 1, total, cfg.gumbel_schedule, cfg.gumbel_start,
            cfg.gumbel_end))

    def build_loaders(self, records: Sequence[Record], tokenizer: Any, data: DataConfig, *,
                      batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                      pin_memory: bool = False) -> dict[str, DataLoader]:
        """Reports with >= `method.min_sentences` sentences, shuffled sentence order, PRIOR's
        resize + affine + flip view at `method.image_size`; a JPEG decoded at its smallest DCT scale
        that still covers that size, as evaluation reads it, through ``data.image_cache`` when
        set."""
        if data.sentence_keep < 1.0:
            raise ConfigError(f"data.sentence_keep={data.sentence_keep}: PRIOR aligns every sentence "
                              "of a report with the image (in a shuffled order); leave it 1")
        kept = filter_by_sentences(records, self.cfg.min_sentences)
        size = self.cfg.image_size
        dataset = PriorPretrainDataset(kept, tokenizer, max_length=data.max_length,
                                       transform=prior_transform(size), seed=seed,
                                       on_error=data.on_error,
                                       image_loader=image_loader(data, size, size))
        loader = build_pretrain_loader(
            dataset, data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
            pin_memory=pin_memory, collate_fn=PriorCollator(tokenizer.pad_token_id))
        return {"train": loader}


def build_prior(cfg: PriorConfig, *, vocab_size: int | None = None,
                text_encoder: str | None = None) -> PriorMethod:
    """PRIOR from `cfg`: a registered convolutional image preset and the BERT text encoder."""
    image = create_image_encoder(cfg.image.encoder, cfg.image.weights)
    freeze_image_levels(image, cfg.image.frozen_levels)
    text = create_text_encoder(text_encoder or cfg.text.encoder, cfg.text, vocab_size=vocab_size)
    freeze_text_layers(text, cfg.text.frozen_layers)
    return PriorMethod(cfg, Prior(cfg, image, text))
