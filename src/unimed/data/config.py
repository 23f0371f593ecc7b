"""Configuration of dataset reading and the pre-training data pipeline."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the datasets live, how records are filtered and split, and the pre-training views.

    `rotation` is the largest random rotation of a pre-training view in degrees (paper: 180).
    """

    root: str = "data/phantom"
    pretrain_datasets: tuple[str, ...] = ("mimic-cxr", "padchest")
    min_report_tokens: int = 3
    split_seed: int = 0
    on_error: str = "raise"
    image_size: int = 224
    resize_size: int = 256
    rotation: float = 180.0
    max_length: int = 128
    num_workers: int = 0
    split_dir: str | None = None
    check_images: bool = False
    progress: bool = True
