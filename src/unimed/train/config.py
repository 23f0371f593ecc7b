"""Configuration of the pre-training loop."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings (paper: AdamW 4e-5, wd 5e-2, warm-up + cosine)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 4.0e-5
    weight_decay: float = 5.0e-2
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 1
    max_steps: int | None = None
