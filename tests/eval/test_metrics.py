"""Bootstrap intervals and the vectorised metrics behind them, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from unimed.eval.config import EvalConfig
from unimed.eval.metrics import (
    Estimate,
    batched_auc,
    batched_f1,
    batched_mean,
    bootstrap,
    mean_estimate,
    paired_difference,
    per_class_auc,
    percentile_interval,
    resample_indices,
)
from unimed.eval.tasks import TaskContext


def test_resamples_depend_only_on_seed_dataset_split_and_size():
    first = resample_indices(50, 100, seed=0, dataset="cxp500", split="test")
    assert first.shape == (100, 50) and first.min() >= 0 and first.max() < 50
    assert np.array_equal(first, resample_indices(50, 100, seed=0, dataset="cxp500", split="test"))
    for other in (dict(seed=1, dataset="cxp500", split="test"),
                  dict(seed=0, dataset="pdc", split="test"),
                  dict(seed=0, dataset="cxp500", split="valid")):
        assert not np.array_equal(first, resample_indices(50, 100, **other))
    assert not np.array_equal(first[:, :49], resample_indices(49, 100, seed=0, dataset="cxp500",
                                                              split="test"))


def test_bootstrap_of_a_mean_matches_numpy_percentiles_of_resampled_means():
    rng = np.random.default_rng(1)
    dice = rng.uniform(size=40)
    indices = resample_indices(40, 1000, seed=0, dataset="siim", split="test")
    got = bootstrap(batched_mean, [dice], indices)
    means = np.array([dice[i].mean() for i in indices])
    assert got.value == pytest.approx(dice.mean())
    assert np.allclose(got.replicates, means)
    assert got.ci == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert got.ci[0] < dice.mean() < got.ci[1]
    assert got.json_ci() == [got.ci[0], got.ci[1]]


def test_batched_auc_equals_sklearn_with_ties_and_is_nan_for_one_class():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(20, 30))
    scores = rng.integers(0, 5, size=(20, 30)).astype(float)  # many ties
    expected = [roc_auc_score(y, s) for y, s in zip(labels, scores)]
    assert np.allclose(batched_auc(labels, scores), expected)
    assert np.isnan(batched_auc(np.ones((1, 4)), np.arange(4.0)[None]))[0]


def test_per_class_auc_equals_sklearn_per_column_and_is_none_for_one_class():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=(40, 5))
    labels[:, 3] = 1  # one class only: AUC undefined
    scores = rng.normal(size=(40, 5)).astype(np.float32)  # a probe's logits
    scores[:10, 1] = 0.0  # ties
    got = per_class_auc(labels, scores)
    assert got[3] is None
    for c in (0, 1, 2, 4):
        assert got[c] == pytest.approx(roc_auc_score(labels[:, c], scores[:, c]), abs=1e-12)


def test_batched_f1_equals_sklearn_including_no_positives():
    rng = np.random.default_rng(3)
    labels, predictions = rng.integers(0, 2, size=(2, 25, 12))
    labels[0], predictions[0] = 0, 0
    expected = [f1_score(y, p, zero_division=0.0) for y, p in zip(labels, predictions)]
    assert np.allclose(batched_f1(labels, predictions), expected)


def test_a_nan_label_leaves_its_entry_out_of_auc_and_f1():
    """Each row's AUC and F1 are sklearn's on the entries with a label; rows without NaN read as
    they do with integer labels."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=(12, 40)).astype(float)
    scores = rng.integers(0, 6, size=(12, 40)).astype(float)  # ties, also with left-out entries
    labels[rng.random(labels.shape) < 0.3] = np.nan
    labels[0] = rng.integers(0, 2, 40)  # a row with every label
    predictions = scores > 2
    for row in range(12):
        known = ~np.isnan(labels[row])
        y = labels[row, known].astype(int)
        assert batched_auc(labels, scores)[row] == pytest.approx(roc_auc_score(y, scores[row, known]))
        assert batched_f1(labels, predictions)[row] == pytest.approx(
            f1_score(y, predictions[row, known], zero_division=0.0))
    assert batched_auc(labels[:1], scores[:1])[0] == batched_auc(labels[:1].astype(int), scores[:1])[0]
    one_class = np.array([[1.0, np.nan, 1.0, np.nan]])  # the labelled entries hold one value
    assert np.isnan(batched_auc(one_class, np.array([[0.1, 0.9, 0.2, 0.0]])))[0]


def test_mean_estimate_averages_the_defined_classes_per_resample():
    a = Estimate(0.6, None, np.array([0.5, np.nan, 0.7, np.nan]))
    b = Estimate(None, None, np.array([0.9, 0.8, np.nan, np.nan]))
    got = mean_estimate([a, b])
    assert got.value == 0.6
    assert np.allclose(got.replicates, [0.7, 0.8, 0.7, np.nan], equal_nan=True)


def test_interval_needs_half_the_replicates_defined():
    assert percentile_interval(np.array([0.1, np.nan, np.nan])) is None
    assert percentile_interval(np.array([0.2, 0.2, np.nan])) == (0.2, 0.2)


def test_paired_difference_cancels_the_shared_resampling_noise():
    """Encoder B is A plus 0.01 on every image: the unpaired intervals overlap, the paired one
    is exactly 0.01."""
    rng = np.random.default_rng(4)
    a_images = rng.uniform(size=60)
    indices = resample_indices(60, 500, seed=0, dataset="rsna", split="test")
    a = bootstrap(batched_mean, [a_images], indices)
    b = bootstrap(batched_mean, [a_images + 0.01], indices)
    assert b.ci[0] < a.ci[1]
    assert paired_difference(b.replicates, a.replicates) == pytest.approx((0.01, 0.01))
    with pytest.raises(ValueError, match="different resamples"):
        paired_difference(a.replicates, a.replicates[:10])


def test_a_single_test_item_has_no_interval_and_no_paired_difference():
    """One item's resamples all repeat it: the interval was its value twice ("20.0 (20.0-20.0)") and
    two encoders' difference on it came out certain."""
    one = resample_indices(1, 200, seed=0, dataset="pdc", split="test")
    a = bootstrap(batched_f1, [np.array([1.0]), np.array([True])], one)
    b = bootstrap(batched_f1, [np.array([1.0]), np.array([False])], one)
    assert (a.value, b.value) == (1.0, 0.0)
    assert a.ci is None and a.json_ci() is None and a.replicates.shape == (200,)
    assert np.isnan(a.replicates).all()
    assert paired_difference(a.replicates, b.replicates) is None
    two = bootstrap(batched_mean, [np.array([0.0, 1.0])], resample_indices(2, 200, 0, "pdc", "test"))
    assert two.ci == (0.0, 1.0)


def test_a_task_on_a_single_test_image_says_it_has_no_interval(tmp_path, caplog):
    ctx = TaskContext(None, EvalConfig(bootstrap_resamples=20), tmp_path)
    with caplog.at_level("WARNING", logger="unimed.eval.tasks"):
        assert ctx.resamples("pdc", "test", 2).shape == (20, 2)
        assert not caplog.text
        assert ctx.resamples("pdc", "test", 1).shape == (20, 1)
        ctx.resamples("pdc", "test", 1)  # the next encoder's
    assert caplog.text.count("pdc/test: 1 scored image, so its metrics have no confidence interval") == 1
