"""Metrics shared by the tasks: macro AUC / F1 over classes, accuracy, and their bootstrap intervals.

A class whose test labels are all one value has no AUC; it is left out of the macro average and
reported as None, never as a made-up 0.5.

Every reported metric carries a percentile bootstrap 95 % interval over resamples of the test
images (:func:`bootstrap`). The resamples depend only on the eval seed, the dataset, the split and
the number of images (:func:`resample_indices`), so two encoders scored on one test set share them
and the difference of their replicates is a paired bootstrap (:func:`paired_difference`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of binary `labels` (N,) against `scores` (N,), None when only one class is present."""
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def macro(values: list[float | None]) -> float | None:
    """Mean of the defined values, None when none is."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def per_class_auc(labels: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """AUC of every column of (N, C) `labels` / `scores` (None where a column has one class), all
    columns at once (:func:`batched_auc`): a linear probe scores its validation split every epoch."""
    aucs = batched_auc(np.asarray(labels).T, np.asarray(scores).T)
    return [None if math.isnan(a) else float(a) for a in aucs]


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Share of equal entries."""
    return float(np.mean(labels == predictions))


# ---- bootstrap ------------------------------------------------------------------------------------

CONFIDENCE = 0.95
CHUNK = 250  # resamples evaluated at once, bounding the memory of the (chunk, N, ...) arrays
Statistic = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A metric on the whole test set, its percentile bootstrap interval and its replicates.

    ``replicates`` (R,) holds the metric on each resample (NaN where it is undefined, e.g. an AUC
    of a resample with one label value); ``ci`` is None when fewer than half are defined.
    """

    value: float | None
    ci: tuple[float, float] | None
    replicates: np.ndarray

    def json_ci(self) -> list[float] | None:
        """The interval as a JSON list [lo, hi], or None."""
        return None if self.ci is None else [self.ci[0], self.ci[1]]


def resample_indices(n: int, resamples: int, seed: int, dataset: str, split: str) -> np.ndarray:
    """(R, n) indices of `resamples` draws with replacement of `n` test items.

    They depend only on (seed, dataset, split, n), so every encoder evaluated on one test set gets
    the same resamples and the difference of two encoders' replicates is a paired bootstrap.
    """
    name = int.from_bytes(hashlib.sha256(f"{dataset}/{split}".encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name, n])
    return rng.integers(0, n, size=(resamples, n))


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE
                        ) -> tuple[float, float] | None:
    """The central `confidence` percentile interval of the defined replicates, or None when fewer
    than half of them are defined."""
    defined = replicates[np.isfinite(replicates)]
    if len(replicates) == 0 or len(defined) < len(replicates) / 2:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(defined, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap(statistic: Statistic, arrays: Sequence[np.ndarray], indices: np.ndarray) -> Estimate:
    """`statistic` on the per-image `arrays` (each (N, ...)) and on each resample of them.

    `statistic` is vectorised over a leading batch axis: it receives every array as (B, N, ...)
    and returns (B,) values (NaN where undefined); it is called once with B = 1 on the arrays as
    they are, and on the resamples `indices` (R, N) in chunks. The mean of per-image values is
    ``lambda x: x.mean(-1)``; a metric that cannot be vectorised may loop over the batch.
    A single test item has no spread to resample: every replicate is NaN (no interval).
    """
    arrays = [np.asarray(a) for a in arrays]
    value = float(statistic(*(a[None] for a in arrays))[0])
    parts = [statistic(*(a[chunk] for a in arrays)) for chunk in _chunks(indices)]
    replicates = np.concatenate(parts).astype(np.float64) if parts else np.empty(0)
    if indices.shape[-1] < 2:
        replicates = np.full(len(replicates), np.nan)
    value_or_none = value if math.isfinite(value) else None
    return Estimate(value_or_none, percentile_interval(replicates), replicates)


def _chunks(indices: np.ndarray) -> list[np.ndarray]:
    return [indices[start : start + CHUNK] for start in range(0, len(indices), CHUNK)]


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE
                      ) -> tuple[float, float] | None:
    """Percentile interval of `a - b` for replicates of two encoders on the same resamples."""
    if a.shape != b.shape:
        raise ValueError(f"replicates of different resamples: shapes {a.shape} and {b.shape}")
    return percentile_interval(a - b, confidence)


def _known(labels: np.ndarray) -> np.ndarray | None:
    """Where float `labels` are not NaN (None for labels without NaN: every entry counts)."""
    if labels.dtype.kind != "f":
        return None
    known = ~np.isnan(labels)
    return None if known.all() else known


def batched_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B,) ROC AUC of each row of binary `labels` (B, N) against finite `scores` (B, N): the
    Mann–Whitney statistic with mid-ranks for ties; NaN for a row with one label value. A NaN label
    leaves its entry out (a record without a label for the class)."""
    known = _known(labels)
    if known is not None:  # left-out entries rank above every other: the others' ranks are theirs alone
        scores = np.where(known, scores, np.inf)
        labels = np.where(known, labels, 0.0)
    positive = labels.astype(bool)
    n_pos = positive.sum(-1)
    n_neg = (labels.shape[-1] if known is None else known.sum(-1)) - n_pos
    ranks = rankdata(scores, axis=-1)
    rank_sum = np.where(positive, ranks, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def batched_f1(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """(B,) F1 of the positive class per row of (B, N) binary arrays; 0 without positives at all.
    A NaN label leaves its entry out."""
    known = _known(labels)
    if known is not None:
        labels, predictions = np.where(known, labels, 0.0), predictions & known
    labels, predictions = labels.astype(bool), predictions.astype(bool)
    tp = (labels & predictions).sum(-1)
    wrong = (labels != predictions).sum(-1)
    denominator = 2 * tp + wrong
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def mean_estimate(estimates: Sequence[Estimate]) -> Estimate:
    """The mean of estimates made on the same resamples (the macro average of per-class estimates,
    or of a label fraction's training-subset draws): the mean of the defined values, and per
    resample the mean of the defined replicates (NaN when none is)."""
    replicates = np.stack([e.replicates for e in estimates])  # (C, R)
    defined = np.isfinite(replicates)
    count = defined.sum(0)
    total = np.where(defined, replicates, 0.0).sum(0)
    mean_replicates = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    value = macro([e.value for e in estimates])
    return Estimate(value, percentile_interval(mean_replicates), mean_replicates)


def batched_mean(values: np.ndarray) -> np.ndarray:
    """(B,) mean over the last axis of (B, N) per-image values (Dice, hits, correct predictions)."""
    return values.mean(-1)
