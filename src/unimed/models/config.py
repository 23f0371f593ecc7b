"""Configuration of the vision-language model."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoders, projectors and which losses are on (weight 0 switches a loss off)."""

    name: str = "medunic"
    image_encoder: str = "resnet18"
    image_weights: str | None = None
    text_encoder: str | None = None
    frozen_text_layers: int = 9
    embed_dim: int = 512
    ctr_dim: int = 1024
    temperature: float = 0.07
    ssv_temperature: float = 0.07
    ctr_lambda: float = 5.1e-3
    cvl_weight: float = 1.0
    ssv_weight: float = 1.0
    ctr_weight: float = 1.0
    text_dropout: float = 0.1
