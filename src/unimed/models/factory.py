"""The model registry: ``create_model(cfg)`` builds the method named by ``cfg.name``."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from unimed.models.config import ModelConfig
from unimed.registry import Registry


class ModelFactory(Protocol):
    """Signature every registered model factory has."""

    def __call__(
        self, cfg: ModelConfig, *, vocab_size: int | None = None, text_encoder: str | None = None
    ) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("model")


def create_model(
    cfg: ModelConfig, *, vocab_size: int | None = None, text_encoder: str | None = None
) -> nn.Module:
    """Build the model registered as ``cfg.name``.

    `vocab_size` is the tokenizer's size; `text_encoder` (a local Hugging Face folder, e.g. the MLM
    stage's output) overrides ``cfg.text_encoder``.
    """
    return MODELS.get(cfg.name)(cfg, vocab_size=vocab_size, text_encoder=text_encoder)


# Imported last: the built-in model modules register themselves in MODELS, which must exist first.
from unimed.models import medunic as _medunic  # noqa: E402,F401
from unimed.models import prior as _prior  # noqa: E402,F401
