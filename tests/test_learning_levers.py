"""benchmarks/learning_levers.py: the validation macro AUC and the per-class probe it prints."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def levers():
    with benchmark_script("learning_levers") as module:
        yield module


def test_zero_shot_valid_is_the_macro_auc_per_dataset_and_prompt_set(levers) -> None:
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    perfect, reversed_ = labels.astype(float), -labels.astype(float)
    half = np.stack([labels[:, 0], -labels[:, 1]], axis=1).astype(float)  # AUC 1 and 0
    scores = {"en": perfect, "es": reversed_, "es*": half}
    scored = {"padchest": levers.ValidSet(labels, torch.zeros(4, 3), torch.zeros(4, 2), scores)}
    assert levers.zero_shot_valid(scored) == {
        "padchest en": pytest.approx(1.0), "padchest es": pytest.approx(0.0),
        "padchest es*": pytest.approx(0.5),
    }


def test_probe_auc_separates_a_learnable_label_from_noise(levers) -> None:
    rng = np.random.default_rng(0)
    train_y, valid_y = rng.integers(0, 2, 200), rng.integers(0, 2, 100)
    noise_train, noise_valid = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    signal_train = noise_train + 3.0 * train_y[:, None] * np.eye(8)[0]
    signal_valid = noise_valid + 3.0 * valid_y[:, None] * np.eye(8)[0]
    assert levers.probe_auc(signal_train, train_y, signal_valid, valid_y) > 0.95
    assert abs(levers.probe_auc(noise_train, train_y, noise_valid, valid_y) - 0.5) < 0.15
    assert levers.probe_auc(signal_train, np.zeros(200, dtype=int), signal_valid, valid_y) is None
    assert levers.probe_auc(signal_train, train_y, signal_valid, np.ones(100, dtype=int)) is None


@pytest.mark.parametrize("argv", [["configs/demo.yaml", "--checkpoint", "runs/demo"], []])
def test_rows_or_a_checkpoint_not_both(levers, argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["learning_levers.py", *argv])
    with pytest.raises(SystemExit):
        levers.main()
    assert "give a preset to train rows on, or --checkpoint, not both" in capsys.readouterr().err


def test_a_checkpoint_takes_no_rows(levers, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["learning_levers.py", "--checkpoint", "runs/demo", "--row", "a:"])
    with pytest.raises(SystemExit):
        levers.main()
    assert "--checkpoint scores that run only" in capsys.readouterr().err


def test_a_row_keeps_the_commas_of_a_list_value(levers) -> None:
    assert levers.parse_row("h3d:method.volume_shape=[16,96,96],train.epochs=1,a.b=[1, 2]") == (
        "h3d", ["method.volume_shape=[16,96,96]", "train.epochs=1", "a.b=[1, 2]"])
    assert levers.parse_row("base:") == ("base", [])


def test_true_ranks_count_the_candidates_scored_above_the_true_match(levers) -> None:
    sims = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.2, 0.1]])
    assert levers.true_ranks(sims).tolist() == [1, 3, 3]


def test_the_selection_column_gives_hits_against_random_and_slices_on_a_finding_against_the_prior(
        levers, monkeypatch) -> None:
    results = {"valid": {"hit_rate": 1.0, "random": 0.84, "precision": 0.919, "prior_precision": 0.952},
               "train": {"hit_rate": 0.5, "random": 0.25, "precision": 0.4}}  # no training prior
    monkeypatch.setattr(levers, "selects_slices", lambda encoder: True)
    monkeypatch.setattr(levers, "select", lambda encoder, ctx, dataset, split: results[split])
    cfg = levers.EvalConfig()
    cell = levers.selection_rates(None, None, cfg)
    assert cell == ", ".join(["100.0 / 84.0; 91.9 / 95.2", "50.0 / 25.0; 40.0 / -"]
                             * len(cfg.volume.selection_datasets))
    monkeypatch.setattr(levers, "select", lambda encoder, ctx, dataset, split: {"skipped": "none"})
    assert set(levers.selection_rates(None, None, cfg).split(", ")) == {"-"}
