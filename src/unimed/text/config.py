"""Configuration of the cross-lingual vocabulary and MLM stages."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VocabConfig:
    """Cross-lingual vocabulary: base English WordPiece vocabulary + top-M Spanish TF-IDF terms."""

    base_model: str | None = None
    english_vocab_size: int = 4000
    new_terms: int = 500
    language: str = "es"
    lowercase: bool = True


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """Cross-lingual masked language modelling (paper: Adam 5e-4, 10% warm-up, 15 epochs, len 256)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    epochs: int = 15
    batch_size: int = 32
    lr: float = 5.0e-4
    warmup_ratio: float = 0.1
    max_length: int = 256
    mask_prob: float = 0.15
    weight_decay: float = 0.0
