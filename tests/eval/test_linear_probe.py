"""Linear probe: label policy, training on separable data, fractions, an end-to-end run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.data.records import Record
from unimed.eval import linear_probe
from unimed.eval.config import LinearProbeConfig
from unimed.eval.data import fraction_indices


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


def test_best_validation_state_is_kept():
    """With labels that are noise, later epochs cannot beat the best one: the returned layer scores
    exactly the best validation value seen."""
    cfg = LinearProbeConfig(epochs=15, patience=100, lr=1e-1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 2, (40, 1), generator=g).float()
    xv, yv = torch.randn(40, 5, generator=g), torch.randint(0, 2, (40, 1), generator=g).float()
    layer = linear_probe.train_probe((x, y), (xv, yv), "auc", cfg, seed=0)
    kept = linear_probe.score(layer(xv).detach(), yv, "auc")
    seen = []
    probe = torch.nn.Linear(5, 1)
    torch.manual_seed(0)
    probe.reset_parameters()
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    perm = torch.Generator().manual_seed(0)
    for _ in range(cfg.epochs):
        for batch in torch.randperm(40, generator=perm).split(cfg.batch_size):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(probe(x[batch]), y[batch]).backward()
            opt.step()
        seen.append(linear_probe.score(probe(xv).detach(), yv, "auc"))
    assert kept == pytest.approx(max(seen))


def test_fractions_are_nested_and_have_a_floor():
    one, ten, full = (fraction_indices(500, f, 16, seed=3) for f in (0.01, 0.1, 1.0))
    assert len(one) == 16 and len(ten) == 50 and len(full) == 500
    assert set(one) <= set(ten) <= set(full)
    assert np.array_equal(one, fraction_indices(500, 0.01, 16, seed=3))


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
        assert all(0.0 <= v["value"] <= 1.0 for v in result["fractions"].values()
                   if not math.isnan(v["value"]))
