"""Linear probe: label policy, training on separable data, fractions, an end-to-end run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimed.data.records import Record
from unimed.eval import linear_probe
from unimed.eval.config import EvalConfig, LinearProbeConfig
from unimed.eval.data import fraction_indices
from unimed.eval.metrics import Estimate
from unimed.eval.tasks import sweep_fractions


def test_uncertain_is_positive_and_unstated_is_negative(tmp_path: Path):
    record = Record("chexpert", tmp_path / "x.jpg", "p", "s", "train",
                    labels={"Atelectasis": -1.0, "Cardiomegaly": 1.0, "Edema": 0.0})
    y = linear_probe.targets([record], linear_probe.PROBE_TARGETS["chexpert"], "chexpert")
    assert y.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]


def test_multiclass_target_outside_the_classes_is_an_error(tmp_path: Path):
    record = Record("covidx", tmp_path / "x.png", "p", "s", "train", target="flu")
    with pytest.raises(ValueError, match="covidx: record .*x.png has no class"):
        linear_probe.targets([record], linear_probe.PROBE_TARGETS["covidx"], "covidx")


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    return centres[y] + torch.randn(n, 2, generator=g), y


def test_probe_separates_separable_classes():
    cfg = LinearProbeConfig(epochs=60, patience=60, lr=5e-2)
    layer = linear_probe.train_probe(_blobs(90, 0), _blobs(30, 1), "accuracy", cfg, seed=0)
    x, y = _blobs(60, 2)
    assert linear_probe.score(layer(x), y, "accuracy") > 0.95
    xb, yb = x[y < 2], (y[y < 2] == 1).float()[:, None]
    binary = linear_probe.train_probe((xb, yb), (xb, yb), "auc", cfg, seed=0)
    assert linear_probe.score(binary(xb), yb, "auc") > 0.99


def _binary(n: int, seed: int, shuffled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary problem in 5-D whose label is the sign of the first feature (or a permutation of
    those labels, which no feature predicts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, :1] > 0).float()
    return x, y[torch.randperm(n, generator=g)] if shuffled else y


def test_probe_on_shuffled_labels_scores_chance():
    cfg = LinearProbeConfig(epochs=30, patience=5, lr=5e-2)
    layer = linear_probe.train_probe(_binary(200, 0, True), _binary(200, 1, True), "auc", cfg, seed=0)
    x, y = _binary(2000, 2, True)
    assert abs(linear_probe.score(layer(x), y, "auc") - 0.5) < 0.05


def test_probe_is_deterministic_given_the_seed():
    cfg = LinearProbeConfig(epochs=5, patience=5, lr=5e-2, batch_size=16)
    fit = [linear_probe.train_probe(_binary(64, 0), _binary(32, 1), "auc", cfg, seed=s)
           for s in (3, 3, 4)]
    assert torch.equal(fit[0].weight, fit[1].weight) and torch.equal(fit[0].bias, fit[1].bias)
    assert not torch.equal(fit[0].weight, fit[2].weight)


def test_early_stopping_keeps_the_best_validation_state():
    """A probe trained on noise labels: the returned layer scores on the validation set exactly
    the best value seen when training as long without early stopping, and at least as well as the
    last epoch's state."""
    noise, valid = _binary(60, 0, True), _binary(60, 1, True)
    cfg = LinearProbeConfig(epochs=12, patience=100, lr=1e-1)
    kept = linear_probe.train_probe(noise, valid, "auc", cfg, seed=0)
    kept_score = linear_probe.score(kept(valid[0]), valid[1], "auc")
    per_epoch = [linear_probe.score(
        linear_probe.train_probe(noise, valid, "auc",
                                 dataclasses.replace(cfg, epochs=e, patience=e + 1), seed=0)(valid[0]),
        valid[1], "auc") for e in range(1, cfg.epochs + 1)]
    assert kept_score == pytest.approx(max(per_epoch))


def test_a_tie_in_the_validation_metric_goes_to_the_lower_validation_loss():
    """Separable classes and a small validation split: its AUC is 1.0 from the first epoch on, so
    the first-best rule kept the first epoch's barely-trained layer; the lower validation loss
    keeps training's later, better-fitted state (here the last: the loss falls every epoch)."""
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(16, 1)
    train, valid = (x, (x[:, :1] > 0).float()), (x[:4], (x[:4, :1] > 0).float())
    cfg = LinearProbeConfig(epochs=10, patience=3, lr=1e-1, batch_size=8)
    kept = linear_probe.train_probe(train, valid, "auc", cfg, seed=0)
    first = linear_probe.train_probe(train, valid, "auc", dataclasses.replace(cfg, epochs=1), seed=0)
    assert linear_probe.score(first(valid[0]), valid[1], "auc") == 1.0
    last_loss = F.binary_cross_entropy_with_logits(kept(valid[0]), valid[1])
    assert last_loss < 0.5 * F.binary_cross_entropy_with_logits(first(valid[0]), valid[1])
    longest = linear_probe.train_probe(train, valid, "auc", dataclasses.replace(cfg, patience=100), seed=0)
    assert torch.equal(kept.weight, longest.weight)


def test_an_accuracy_probe_has_a_logit_for_a_class_only_the_validation_split_holds():
    """A 1 % subset may lack the last class; the validation loss (the tie-break) still needs its logit."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(8, 1)
    train = (x, torch.arange(2).repeat(8))
    valid = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 2]))
    layer = linear_probe.train_probe(train, valid, "accuracy", LinearProbeConfig(epochs=3, lr=1e-1), seed=0)
    assert layer.out_features == 3


def test_a_validation_split_of_one_class_selects_by_validation_loss():
    """AUC is undefined on an all-positive validation split. Training pushes those validation rows
    towards the negative class, so their loss rises every epoch: the kept state must be the first
    epoch's (the old rule never improved on minus infinity and kept the live, last weights)."""
    x = torch.tensor([[1.0], [-1.0]]).repeat(16, 1)
    train = (x, (x < 0).float())
    valid = (torch.ones(6, 1), torch.ones(6, 1))
    cfg = LinearProbeConfig(epochs=10, patience=3, lr=1e-1, batch_size=8)
    kept = linear_probe.train_probe(train, valid, "auc", cfg, seed=0)
    first = linear_probe.train_probe(train, valid, "auc", dataclasses.replace(cfg, epochs=1), seed=0)
    assert torch.equal(kept.weight, first.weight) and torch.equal(kept.bias, first.bias)


@pytest.mark.parametrize("valid_labels, warned", [([1.0] * 6, True), ([1.0] * 5 + [0.0], False)])
def test_a_one_class_validation_split_is_said_once_per_dataset(valid_labels, warned, task_context,
                                                              caplog):
    """Every fraction and draw of a dataset shares its validation split, so the probes' selection
    by loss is one fact about the dataset: one warning, not one per fitted probe (the demo's log
    held 55 of them)."""
    ctx = dataclasses.replace(task_context, cfg=EvalConfig(min_train_images=8))
    generator = torch.Generator().manual_seed(0)
    y_train = (torch.arange(40) % 2).float()[:, None]
    split_y = {"train": y_train, "valid": torch.tensor(valid_labels)[:, None],
               "test": (torch.arange(10) % 2).float()[:, None]}
    split_x = {s: torch.randn(len(y), 3, generator=generator) for s, y in split_y.items()}
    target = linear_probe.ProbeTarget("auc", ("nodule",))
    with caplog.at_level("WARNING", logger=linear_probe.log.name):
        linear_probe.probe_fractions(ctx, split_x, split_y, target, "luna16", "volume probe luna16")
    messages = [r.getMessage() for r in caplog.records if r.name == linear_probe.log.name]
    expected = ("volume probe luna16: auc is undefined on the validation split (6 rows, one class); "
                "every fraction's probe early-stops on the validation loss")
    assert messages == ([expected] if warned else [])


def test_test_estimate_bootstraps_accuracy_with_the_given_resamples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1, 0])  # correct: 1, 1, 0, 1, 1
    resamples = np.random.default_rng(0).integers(0, 5, size=(300, 5))
    got = linear_probe.test_estimate(logits, y, "accuracy", resamples)
    correct = np.array([1, 1, 0, 1, 1])
    assert got.value == pytest.approx(0.8)
    assert np.allclose(got.replicates, correct[resamples].mean(1))
    assert got.ci == pytest.approx(tuple(np.percentile(correct[resamples].mean(1), [2.5, 97.5])))


def test_fractions_are_nested_and_have_a_floor():
    one, ten, full = (fraction_indices(500, f, 16, seed=3) for f in (0.01, 0.1, 1.0))
    assert len(one) == 16 and len(ten) == 50 and len(full) == 500
    assert set(one) <= set(ten) <= set(full)
    assert np.array_equal(one, fraction_indices(500, 0.01, 16, seed=3))


def test_a_fraction_below_the_training_split_is_the_mean_of_its_draws(task_context):
    ctx = dataclasses.replace(task_context, cfg=EvalConfig(seed=4, min_train_images=16))
    calls = []

    def score(index: np.ndarray, label: str) -> Estimate:
        calls.append((label, tuple(index)))
        value = float(index.mean()) / 500
        return Estimate(value, None, np.array([value, value + 0.1]))

    rows = sweep_fractions(ctx, 500, score, "probe", fractions=(0.01, 0.1, 1.0), draws=3)
    for label, fraction in (("1%", 0.01), ("10%", 0.1)):
        subsets = [fraction_indices(500, fraction, 16, seed) for seed in (4, 5, 6)]
        assert [index for name, index in calls if name == label] == [tuple(s) for s in subsets]
        values = [s.mean() / 500 for s in subsets]
        assert rows[label]["value"] == pytest.approx(np.mean(values))
        assert rows[label]["replicates"]["value"] == pytest.approx([np.mean(values), np.mean(values) + 0.1])
        assert rows[label]["draws"] == 3 and rows[label]["draw_sd"] == pytest.approx(np.std(values))
        assert rows[label]["train_images"] == len(subsets[0])
    assert [label for label, _ in calls].count("100%") == 1
    assert "draws" not in rows["100%"]


def test_draws_must_be_positive():
    with pytest.raises(ValueError, match="eval.linear_probe.draws must be >= 1, got 0"):
        EvalConfig(linear_probe=LinearProbeConfig(draws=0))


def test_runs_on_the_tiny_world(tiny_encoder, task_context):
    cfg = dataclasses.replace(task_context.cfg, fractions=(0.1, 1.0),
                              linear_probe=LinearProbeConfig(epochs=3, patience=2))
    out = linear_probe.run(tiny_encoder, dataclasses.replace(task_context, cfg=cfg))
    assert {k: v["metric"] for k, v in out.items()} == {
        "chexpert": "auc", "rsna": "auc", "covidx": "accuracy"}
    for dataset, result in out.items():
        n_train = len(task_context.data.records(dataset, "train"))
        assert result["fractions"]["100%"]["train_images"] == n_train
        assert result["fractions"]["10%"]["train_images"] == min(n_train, 8)
        for row in result["fractions"].values():
            assert row["ci"][0] <= row["value"] <= row["ci"][1]
            assert row["replicates"]["value"].shape == (cfg.bootstrap_resamples,)
