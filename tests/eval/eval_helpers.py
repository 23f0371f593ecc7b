"""Constants and helpers shared by the evaluation tests and their fixtures."""

import dataclasses

from unimed.eval.config import (
    BiasConfig,
    DetectionConfig,
    EvalConfig,
    LinearProbeConfig,
    SegmentationConfig,
)
from unimed.eval.tasks import TaskContext
from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)

IMAGE_SIZE = 64
TINY_MODEL = MedUniCConfig(
    image=ImageTowerConfig(encoder="resnet10t"), text=TextTowerConfig(frozen_layers=0),
    projector=MedUniCProjectorConfig(embed_dim=16, ctr_dim=16, hidden_dim=32),
)


def short_config(ctx: TaskContext) -> EvalConfig:
    """The tiny world's protocol, with heads that train in a second."""
    return dataclasses.replace(
        ctx.cfg, fractions=(0.5, 1.0), bootstrap_resamples=50,
        linear_probe=LinearProbeConfig(datasets=("rsna", "covidx"), epochs=5, patience=2),
        segmentation=SegmentationConfig(datasets=("rsna",), epochs=1, patience=1, min_epoch_steps=2),
        detection=DetectionConfig(datasets=("rsna",), epochs=1, patience=1, min_epoch_steps=2),
        bias=BiasConfig(samples_per_group=8, folds=2, knn_k=3),
    )


def numbers(tree: object, path: str = "") -> dict[str, float]:
    """Every number in a nested metrics tree, keyed by its path (figures' file names left out)."""
    if isinstance(tree, dict):
        return {k: v for key, child in tree.items() if key != "figures"
                for k, v in numbers(child, f"{path}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, child in enumerate(tree) for k, v in numbers(child, f"{path}/{i}").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {path: float(tree)}
    return {}
