"""The task registry and what every task receives.

A task is ``run(encoder, ctx) -> metrics``. Tasks that draw figures save PNGs under ``ctx.out_dir``
and list them under ``metrics["figures"]`` (name -> file name relative to ``ctx.out_dir``), so the
report can embed them.

Bootstrap intervals (see :mod:`unimed.eval.metrics`) sit beside the values they qualify: a dict of
metrics gains ``"ci": {name: [lo, hi]}`` (:func:`with_intervals`), a per-fraction row
``{"value", "train_images"}`` gains ``"ci": [lo, hi]``. The replicates behind them travel under
``"replicates"`` keys holding numpy arrays, which the runner moves out of the metrics into
``ctx.replicates`` (saved beside metrics.json for the paired comparisons of the checks); everything
else a task returns is JSON-serialisable.
The context's feature cache (:mod:`unimed.eval.features`) computes an encoder's frozen features
once per run and shares them across tasks: the dense maps of a split (segmentation, detection), the
pooled or projected embeddings of a split's images and of texts (zero-shot, linear probe,
retrieval, bias audit).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unimed.eval.config import DetectionConfig, EvalConfig, SegmentationConfig
from unimed.eval.data import EvalData, fraction_indices
from unimed.eval.dense import Maps
from unimed.eval.encoders import Encoder
from unimed.eval.features import FeatureCache
from unimed.eval.metrics import Estimate, mean_estimate, resample_indices
from unimed.registry import Registry

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TaskContext:
    """Shared by every task of one evaluation: cached data and frozen features, the eval config,
    where figures go."""

    data: EvalData
    cfg: EvalConfig
    out_dir: Path
    progress: bool = False
    replicates: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    features: FeatureCache = dataclasses.field(default_factory=FeatureCache)
    single: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # test sets of one, said once

    def resamples(self, dataset: str, split: str, n: int) -> np.ndarray:
        """(R, n) bootstrap indices of the `n` scored images of `dataset`/`split`, the same for
        every encoder (see :func:`unimed.eval.metrics.resample_indices`); a single one gets no
        interval, which is said once per set (not per encoder)."""
        if n == 1 and (dataset, split) not in self.single:
            self.single.add((dataset, split))
            log.warning("%s/%s: 1 scored image, so its metrics have no confidence interval (a "
                        "bootstrap resamples at least 2)", dataset, split)
        return resample_indices(n, self.cfg.bootstrap_resamples, self.cfg.seed, dataset, split)

    def dense_size(self, section: SegmentationConfig | DetectionConfig) -> int:
        """Side of the images a dense task reads: its own ``image_size``, else ``data.image_size``."""
        return section.image_size or self.data.image_size

    def dense_maps(self, encoder: Encoder, dataset: str, split: str,
                   section: SegmentationConfig | DetectionConfig) -> Maps:
        """`encoder`'s frozen maps of stride >= the task's ``min_stride`` on one split ("full"
        geometry at :meth:`dense_size`), cached and shared by the tasks that read the same size."""
        return self.features.maps(encoder, self.data, dataset, split, min_stride=section.min_stride,
                                  size=self.dense_size(section), batch_size=self.cfg.batch_size)

    def image_features(self, encoder: Encoder, dataset: str, split: str | None, space: str, *,
                       geometry: str = "crop", normalize: bool = False) -> torch.Tensor:
        """(N, D) `space` ("pooled" F_v or "projected" P_v F_v) embeddings of the split's images
        (``data.images(dataset, split, geometry)``, record order), cached."""
        features = self.features.images(encoder, self.data, dataset, split, space=space,
                                        geometry=geometry, batch_size=self.cfg.batch_size)
        return F.normalize(features, dim=-1) if normalize else features

    def text_features(self, encoder: Encoder, texts: Sequence[str], space: str, *,
                      normalize: bool = False) -> torch.Tensor:
        """(N, D) `space` ("pooled" or "projected") embeddings of `texts`, each text cached."""
        features = self.features.texts(encoder, texts, space=space, batch_size=self.cfg.batch_size)
        return F.normalize(features, dim=-1) if normalize and len(features) else features

    def figure_path(self, encoder: Encoder, name: str) -> Path:
        """Where `encoder`'s figure `name` (a PNG) is written; the folder is created."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / f"{encoder.name}_{name}.png"


Task = Callable[[Encoder, TaskContext], dict[str, Any]]
TASKS: Registry[Task] = Registry("evaluation task")


def fraction_label(fraction: float) -> str:
    """0.01 -> "1%", 1.0 -> "100%" (the keys of per-fraction metrics)."""
    return f"{fraction * 100:g}%"


def with_intervals(estimates: dict[str, Estimate], *, replicates: bool = True) -> dict[str, Any]:
    """{name: value, ..., "ci": {name: [lo, hi]}}, plus "replicates": {name: (R,) array} when
    `replicates` (the values that checks compare between encoders)."""
    out = {**{name: e.value for name, e in estimates.items()},
           "ci": {name: e.json_ci() for name, e in estimates.items()}}
    if replicates:
        out["replicates"] = {name: e.replicates for name, e in estimates.items()}
    return out


def fraction_row(score: Estimate | float | None, train_images: int) -> dict[str, Any]:
    """{"value", "train_images"} of one label fraction, with "ci" and "replicates" when `score`
    is a bootstrap :class:`Estimate`."""
    if not isinstance(score, Estimate):
        return {"value": score, "train_images": train_images}
    return {"value": score.value, "ci": score.json_ci(), "train_images": train_images,
            "replicates": {"value": score.replicates}}


def training_rows(values: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """`values`' rows `index` (sorted, as :func:`unimed.eval.data.fraction_indices` draws them):
    `values` itself when they are all of them, so a 100 % row trains on the split (which may be
    memory-mapped from disk), not on a copy of it."""
    return values if len(index) == len(values) else values[torch.from_numpy(index)]


def sweep_fractions(
    ctx: TaskContext, n_train: int, score: Callable[[np.ndarray, str], Estimate | float | None],
    desc: str, *, fractions: Sequence[float] | None = None, min_images: int | None = None,
    draws: int = 1,
) -> dict[str, dict[str, Any]]:
    """{"1%": {"value", "ci", "train_images"}, ...}: `score(train_indices, label)` for every label
    fraction (`fractions`, default ``eval.fractions``), on the seeded, nested training subsets of
    :func:`fraction_indices` (at least `min_images`, default ``eval.min_train_images``).
    A score that is an :class:`Estimate` brings its interval (see :func:`fraction_row`).

    With `draws` > 1, a fraction whose subset is smaller than the training split is scored on
    `draws` subsets (seeds ``eval.seed``, ``eval.seed + 1``, ...; each seed's subsets nested) and
    its row is their mean (:func:`unimed.eval.metrics.mean_estimate`; `score` must return
    Estimates), plus "draws" and "draw_sd", the standard deviation of the draws' values: which 16
    images a 1% row trains on moves it more than the test set's resampling does."""
    rows = {}
    floor = ctx.cfg.min_train_images if min_images is None else min_images
    for fraction in tqdm(fractions or ctx.cfg.fractions, desc=desc, unit="fraction", disable=not ctx.progress):
        label = fraction_label(fraction)
        index = fraction_indices(n_train, fraction, floor, ctx.cfg.seed)
        if draws == 1 or len(index) == n_train:
            rows[label] = fraction_row(score(index, label), int(len(index)))
            continue
        subsets = [index] + [fraction_indices(n_train, fraction, floor, ctx.cfg.seed + draw)
                             for draw in range(1, draws)]
        estimates = [score(subset, label) for subset in subsets]
        values = [e.value for e in estimates if e.value is not None]
        rows[label] = {**fraction_row(mean_estimate(estimates), int(len(index))), "draws": draws,
                       "draw_sd": float(np.std(values)) if values else None}
    return rows
