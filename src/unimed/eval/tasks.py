"""The task registry and what every task receives.

A task is ``run(encoder, ctx) -> metrics`` where `metrics` is JSON-serialisable. Tasks that draw
figures save PNGs under ``ctx.out_dir`` and list them under ``metrics["figures"]`` (name -> file name
relative to ``ctx.out_dir``), so the report can embed them. The context's feature cache computes an
encoder's dense maps of a split once for every dense task (segmentation, detection).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from unimed.eval.config import EvalConfig
from unimed.eval.data import EvalData, fraction_indices
from unimed.eval.dense import FeatureCache, Maps
from unimed.eval.encoders import Encoder
from unimed.registry import Registry


@dataclasses.dataclass
class TaskContext:
    """Shared by every task of one evaluation: cached data and dense maps, the eval config, where
    figures go."""

    data: EvalData
    cfg: EvalConfig
    out_dir: Path
    progress: bool = False
    features: FeatureCache = dataclasses.field(default_factory=FeatureCache)

    def dense_maps(self, encoder: Encoder, dataset: str, split: str, min_stride: int) -> Maps:
        """`encoder`'s frozen maps of stride >= `min_stride` on one split ("full" geometry), cached."""
        return self.features.maps(encoder, self.data, dataset, split, min_stride=min_stride,
                                  batch_size=self.cfg.batch_size)

    def figure_path(self, encoder: Encoder, name: str) -> Path:
        """Where `encoder`'s figure `name` (a PNG) is written; the folder is created."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / f"{encoder.name}_{name}.png"


Task = Callable[[Encoder, TaskContext], dict[str, Any]]
TASKS: Registry[Task] = Registry("evaluation task")


def fraction_label(fraction: float) -> str:
    """0.01 -> "1%", 1.0 -> "100%" (the keys of per-fraction metrics)."""
    return f"{fraction * 100:g}%"


Score = Callable[[np.ndarray, str], float | None | Mapping[str, Any]]


def sweep_fractions(ctx: TaskContext, n_train: int, score: Score, desc: str) -> dict[str, dict[str, Any]]:
    """{"1%": {"value", "train_images"}, ...}: `score(train_indices, label)` for every configured
    label fraction, on the seeded, nested training subsets of :func:`fraction_indices`. A score
    that is a mapping (holding "value") adds its other keys to the row, e.g. per-image values."""
    rows = {}
    for fraction in tqdm(ctx.cfg.fractions, desc=desc, unit="fraction", disable=not ctx.progress):
        label = fraction_label(fraction)
        index = fraction_indices(n_train, fraction, ctx.cfg.min_train_images, ctx.cfg.seed)
        result = score(index, label)
        cell = dict(result) if isinstance(result, Mapping) else {"value": result}
        rows[label] = {**cell, "train_images": int(len(index))}
    return rows
