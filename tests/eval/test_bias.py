"""Community-bias audit: separability metrics on synthetic clouds, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
import pytest

from unimed.eval.bias import knn_accuracy, separability
from unimed.eval.config import BiasConfig
from unimed.eval.tasks import TASKS


def clouds(separated: bool, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two groups of n points in 8-D: far apart, or drawn from one distribution."""
    rng = np.random.default_rng(seed)
    labels = np.array(["en"] * n + ["es"] * n)
    x = rng.normal(size=(2 * n, 8))
    if separated:
        x[:n, 0] += 10.0
        x[n:, 1] += 10.0
    return x, labels


def test_separable_clouds_score_near_one() -> None:
    got = separability(*clouds(True), knn_k=5, folds=5, seed=0)
    assert got["probe_accuracy"] == pytest.approx(1.0)
    assert got["knn_accuracy"] == pytest.approx(1.0)
    assert got["silhouette"] > 0.5
    assert got["chance"] == 0.5


def test_mixed_clouds_score_near_chance() -> None:
    got = separability(*clouds(False, n=200), knn_k=5, folds=5, seed=0)
    assert abs(got["probe_accuracy"] - 0.5) < 0.12
    assert abs(got["knn_accuracy"] - 0.5) < 0.12
    assert abs(got["silhouette"]) < 0.05


def test_single_group_is_undefined_not_an_error() -> None:
    x, _ = clouds(False, n=5)
    got = separability(x, np.array(["en"] * 10), knn_k=3, folds=5, seed=0)
    assert got == {"probe_accuracy": None, "knn_accuracy": None, "silhouette": None, "chance": 1.0}


def test_knn_vote_tie_goes_to_nearest_neighbour() -> None:
    # Points on the unit circle at 0, 10, -20 and 180 degrees; k = 2.
    # 0 (a): 1 (a), 2 (b) tie -> a, right. 1 (a): 0 (a), 2 (b) tie -> a, right.
    # 2 (b): 0 (a), 1 (a) -> a, wrong. 3 (b): 2 (b) nearest, 1 (a) tie -> b, right.
    angles = np.deg2rad([0.0, 10.0, -20.0, 180.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [3.0], [0.5]])
    assert knn_accuracy(x, np.array(["a", "a", "b", "b"]), k=2) == pytest.approx(0.75)


def test_run_on_tiny_world(tiny_encoder, task_context) -> None:
    metrics = TASKS.get("bias")(tiny_encoder, task_context)
    json.dumps(metrics)
    assert set(metrics["samples"]) == {"en", "es"} and all(metrics["samples"].values())
    for modality, spaces in (("text", {"cls", "projected"}), ("image", {"pooled", "projected"})):
        assert set(metrics[modality]) == spaces
        for space in spaces:
            block = metrics[modality][space]
            assert set(block) == {"language", "site"}
            assert 0.0 <= block["language"]["knn_accuracy"] <= 1.0
            assert -1.0 <= block["language"]["silhouette"] <= 1.0
    assert set(metrics["figures"]) == {"tsne_text", "tsne_image"}
    for name in metrics["figures"].values():
        assert (task_context.out_dir / name).stat().st_size > 0


def test_run_caps_samples_per_language(tiny_encoder, task_context) -> None:
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(samples_per_group=3, folds=2))
    metrics = TASKS.get("bias")(tiny_encoder, dataclasses.replace(task_context, cfg=cfg))
    assert metrics["samples"] == {"en": 3, "es": 3}


def test_one_language_is_a_clear_error(tiny_encoder, task_context) -> None:
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(datasets=("padchest",)))
    with pytest.raises(ValueError, match="at least two languages"):
        TASKS.get("bias")(tiny_encoder, dataclasses.replace(task_context, cfg=cfg))


class _LanguageInText:
    """Text features that say only the report's language; image features that say nothing (all
    the same)."""

    name = label = "language-in-text"

    def __init__(self, languages: dict[str, str]) -> None:
        self.languages = languages

    def text_features(self, texts, projected=True, batch_size=64):
        spanish = torch.tensor([[float(self.languages[t] == "es")] for t in texts])
        return torch.cat([spanish, 1 - spanish], dim=1)

    def image_features(self, images, projected=True, batch_size=64):
        return torch.ones(len(images), 8)


def test_language_coded_in_text_is_found_there_and_not_in_the_images(task_context) -> None:
    records = [r for d in task_context.cfg.bias.datasets for r in task_context.data.records(d)]
    encoder = _LanguageInText({r.report: r.language for r in records if r.report})
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(knn_k=1))  # groups of a few test records
    metrics = TASKS.get("bias")(encoder, dataclasses.replace(task_context, cfg=cfg))
    assert min(metrics["samples"].values()) >= 4
    for space in ("cls", "projected"):
        text = metrics["text"][space]["language"]
        assert text["probe_accuracy"] == text["knn_accuracy"] == 1.0 and text["silhouette"] == 1.0
    image = metrics["image"]["pooled"]["language"]
    assert image["silhouette"] == 0.0 and image["probe_accuracy"] <= image["chance"]
