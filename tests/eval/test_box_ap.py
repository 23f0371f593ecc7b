"""COCO mAP with a bootstrap over images: equal to torchmetrics on the test set and on resamples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from box_sets import random_set

from unimed.eval.box_ap import bootstrap_map, match_detections, weighted_map

IOUS = tuple(np.round(np.arange(0.40, 0.76, 0.05), 2).tolist())


def torchmetrics_map(preds, targets) -> float:
    metric = MeanAveragePrecision(iou_thresholds=list(IOUS))
    metric.update(preds, targets)
    return float(metric.compute()["map"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_set_equals_torchmetrics(seed):
    preds, targets = random_set(30, seed)
    estimate = bootstrap_map(preds, targets, IOUS, np.zeros((0, 30), dtype=int))
    assert 0.05 < estimate.value < 0.95  # a set where matching matters
    assert estimate.value == pytest.approx(torchmetrics_map(preds, targets), abs=1e-6)


def test_a_resample_equals_torchmetrics_on_the_duplicated_images():
    preds, targets = random_set(25, 3)
    matched = match_detections(preds, targets, IOUS)
    rng = np.random.default_rng(0)
    for _ in range(4):
        draw = rng.integers(0, 25, 25)
        counts = np.bincount(draw, minlength=25)[None].astype(float)
        expected = torchmetrics_map([preds[i] for i in draw], [targets[i] for i in draw])
        assert weighted_map(*matched[:3], counts)[0] == pytest.approx(expected, abs=1e-6)


def test_interval_brackets_the_value_and_no_detection_scores_zero():
    preds, targets = random_set(40, 4)
    resamples = np.random.default_rng(1).integers(0, 40, (200, 40))
    estimate = bootstrap_map(preds, targets, IOUS, resamples)
    assert estimate.ci[0] < estimate.value < estimate.ci[1]
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
             for _ in preds]
    assert bootstrap_map(empty, targets, IOUS, resamples).value == 0.0


def test_a_single_test_image_has_no_interval():
    preds, targets = random_set(1, 5)
    estimate = bootstrap_map(preds, targets, IOUS, np.zeros((50, 1), dtype=int))
    assert estimate.value == pytest.approx(torchmetrics_map(preds, targets), abs=1e-6)
    assert estimate.ci is None and np.isnan(estimate.replicates).all() and estimate.replicates.shape == (50,)
