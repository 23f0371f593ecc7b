"""What a training method is to the loop: one ``nn.Module`` owning its model, losses and state.

The loop (:mod:`unimed.train.loop`) knows nothing of any method. Per optimizer step it calls
``method(batch, ctx)`` for each micro-batch (the training forward, which returns the loss terms),
steps the optimizer of the current stage, then calls :meth:`Method.after_optimizer_step`. A method:

* keeps the model it is evaluated with in ``self.model`` (``encode_image``, ``encode_text``,
  ``forward_intermediates``, its own preprocessing); everything else it trains with (loss modules,
  learnable temperatures, memory banks, EMA teachers, decoders) are further submodules;
* is checkpointed whole: parameters and buffers of every submodule go to the weights file, and
  :meth:`train_state` (plain numbers and tensors) to the training state, so a resumed run continues
  on the same loss curve;
* runs in stages (:meth:`stages`), each with its own optimizer and schedule
  (:meth:`configure_optimizer`, re-created when the stage starts) and its own losses (the forward
  receives the stage's name); :meth:`start_stage` may freeze or unfreeze parts, but builds no new
  modules (they must all exist when the checkpoint is loaded);
* may build its own data (:meth:`build_loaders`); several loaders are alternated batch by batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from unimed.data.config import DataConfig
from unimed.data.records import Record
from unimed.train.config import TrainConfig
from unimed.train.optim import build_optimizer, build_scheduler


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage: its name and how many epochs it lasts."""

    name: str
    epochs: int


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where the loop stands when it calls the method.

    `step` is the 0-based index of the optimizer step being made (global over stages), `epoch` the
    0-based global epoch, `stage` the current stage's name and `stage_step` the step's index within
    the stage; `loader` names the loader the batch came from; `rank` and `world_size` are for
    losses that gather across processes.
    """

    step: int
    epoch: int
    stage: str
    stage_step: int = 0
    loader: str = "train"
    rank: int = 0
    world_size: int = 1


class Method(nn.Module):
    """Base class of every training method; subclasses set ``self.model`` and define
    :meth:`forward`. `reads_volumes`: whether its loaders take 3D records (CT volumes) beside the
    2D image-report pairs; a method that does not refuses pre-training data holding them."""

    model: nn.Module
    reads_volumes: bool = False

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The training forward: the loss terms of `batch`, the total under "loss" (0-dim tensors
        are logged, averaged over the step's micro-batches)."""
        raise NotImplementedError

    def stages(self, train: TrainConfig) -> list[Stage]:
        """The stages in order; by default one stage spanning `train.epochs`."""
        return [Stage("pretrain", train.epochs)]

    def start_stage(self, stage: Stage) -> None:
        """Called when `stage` starts (and again when a run resumes inside it)."""

    def configure_optimizer(
        self, stage: Stage, train: TrainConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """The optimizer and schedule of `stage`, which lasts `total_steps` optimizer steps; by
        default AdamW over every trainable parameter with warm-up + cosine (``train.*``)."""
        optimizer = build_optimizer(self, train)
        return optimizer, build_scheduler(optimizer, train, total_steps)

    def unused_parameters(self, loaders: Sequence[str]) -> str | None:
        """Why a step on the named `loaders` may leave a trainable parameter without a gradient, or
        None. DDP needs ``find_unused_parameters`` then; the loop turns it on and says why."""
        return None

    def start_from_model(self) -> None:
        """Called after ``self.model``'s weights were replaced from outside (``train.init_from`` an
        exported model): what the method derived from the model when it was built follows it."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called after every optimizer step (EMA teachers, temperature schedules, queues)."""

    def train_state(self) -> dict[str, Any]:
        """State beside parameters and buffers that a resumed run needs (numbers, strings, tensors,
        lists and dicts of them)."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`train_state` returned."""

    def build_loaders(
        self, records: Sequence[Record], tokenizer: Any, data: DataConfig, *, batch_size: int,
        rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False,
    ) -> dict[str, DataLoader]:
        """The named training loaders of this rank; by default the image-report pairs of
        :mod:`unimed.data.pretrain` as one loader "train"."""
        from unimed.data.pretrain import build_pretrain_dataset, build_pretrain_loader

        dataset = build_pretrain_dataset(records, tokenizer, data, seed=seed)
        loader = build_pretrain_loader(dataset, data, batch_size=batch_size, rank=rank,
                                       world_size=world_size, seed=seed, pin_memory=pin_memory)
        return {"train": loader}
