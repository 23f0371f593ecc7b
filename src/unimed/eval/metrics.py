"""Classification metrics shared by the tasks: macro AUC / F1 over classes, accuracy.

A class whose test labels are all one value has no AUC; it is left out of the macro average and
reported as None, never as a made-up 0.5.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


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
    """AUC of every column of (N, C) `labels` / `scores`."""
    return [auc_or_none(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]


def binary_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """F1 of the positive class; 0 when there are neither positive labels nor predictions."""
    return float(f1_score(labels, predictions, zero_division=0.0))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Share of equal entries."""
    return float(np.mean(labels == predictions))
