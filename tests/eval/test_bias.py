"""Community-bias audit: separability metrics on synthetic clouds, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import pytest

from unimed.data.records import Record
from unimed.eval.bias import (
    control_sites,
    distance_ratio,
    knn_accuracy,
    parallel_hits,
    separability,
)
from unimed.eval.config import BiasConfig
from unimed.eval.retrieval import parallel_path, read_parallel
from unimed.eval.runner import pop_replicates
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
    assert got == {"probe_accuracy": None, "knn_accuracy": None, "silhouette": None,
                   "distance_ratio": None, "chance": 1.0}


def test_patient_grouping_stops_the_probe_from_recognising_patients() -> None:
    # 40 patients with 3 records each; the label is a coin flip per patient and the features are
    # the patient's own random anatomy plus a little noise: nothing but the patient predicts it.
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(40), 3).astype(str)
    labels = np.repeat(rng.permutation(["en", "es"] * 20), 3)
    x = np.repeat(rng.normal(size=(40, 64)), 3, axis=0) + rng.normal(scale=0.05, size=(120, 64))
    leaky = separability(x, labels, knn_k=3, folds=5, seed=0)
    grouped = separability(x, labels, knn_k=3, folds=5, seed=0, patients=patients)
    assert leaky["probe_accuracy"] > 0.95 and leaky["knn_accuracy"] == 1.0
    assert grouped["probe_accuracy"] < 0.7 and grouped["knn_accuracy"] < 0.7
    assert grouped["distance_ratio"] == pytest.approx(1.0, abs=0.01)
    assert leaky["distance_ratio"] > grouped["distance_ratio"]


def test_knn_without_other_patients_is_undefined() -> None:
    x, labels = clouds(True, n=2)
    assert knn_accuracy(x, labels, k=3, patients=np.array(["p"] * 4)) is None


def on_circle(degrees: list[float], norms: list[float]) -> np.ndarray:
    angles = np.deg2rad(degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array(norms)[:, None]


def test_distance_ratio_of_separated_groups_by_hand() -> None:
    # a at 0 and 60 degrees, b at 180 and 240 (norms vary: the ratio uses cosines only).
    # Within: 1 - cos 60 = 0.5 for both pairs. Between: 1 - cos 180 = 2, 1 - cos 240 = 1.5,
    # 1 - cos 120 = 1.5, 1 - cos 180 = 2 -> mean 1.75. Ratio 1.75 / 0.5 = 3.5.
    x = on_circle([0, 60, 180, 240], [1.0, 3.0, 0.5, 2.0])
    assert distance_ratio(x, np.array(["a", "a", "b", "b"])) == pytest.approx(3.5)


def test_distance_ratio_excludes_self_pairs_and_pools_within_pairs() -> None:
    # Both groups hold the points at 0 and 90 degrees. Within pairs (a0, a1), (b0, b1): distance 1.
    # Between pairs: (0, 0) and (90, 90) distance 0, (0, 90) twice distance 1 -> mean 0.5. Ratio 0.5.
    x = on_circle([0, 90, 0, 90], [1.0, 1.0, 2.0, 2.0])
    assert distance_ratio(x, np.array(["a", "a", "b", "b"])) == pytest.approx(0.5)
    # Three groups, sizes 3 / 1 / 1: within pairs only from "a" (0-90: 1, 0-180: 2, 90-180: 1) -> 4/3.
    # Between pairs: a x b (b at 270): 1, 2, 1; a x c (c at 0): 0, 1, 2; b x c: 1 -> mean 8/7.
    x = on_circle([0, 90, 180, 270, 0], [1.0] * 5)
    assert distance_ratio(x, np.array(["a", "a", "a", "b", "c"])) == pytest.approx((8 / 7) / (4 / 3))


def test_distance_ratio_leaves_out_pairs_of_one_patient() -> None:
    # a: 0 and 0 degrees (patient p1), 90 (p2); b: 180 (p3). Within pairs of different patients:
    # (0, 90) twice -> distance 1. Between: 2, 2, 1 -> 5/3. Ratio 5/3 (5/2 with the p1 pair kept).
    x = on_circle([0, 0, 90, 180], [1.0, 2.0, 1.0, 1.0])
    labels, patients = np.array(["a", "a", "a", "b"]), np.array(["p1", "p1", "p2", "p3"])
    assert distance_ratio(x, labels, patients) == pytest.approx(5 / 3)
    assert distance_ratio(x, labels) == pytest.approx(5 / 2)


def test_distance_ratio_is_one_when_labels_carry_nothing_and_grows_with_separation() -> None:
    mixed = distance_ratio(*clouds(False, n=300))
    assert mixed == pytest.approx(1.0, abs=0.02)
    assert distance_ratio(*clouds(True)) > 3.0


def test_distance_ratio_edge_cases() -> None:
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert distance_ratio(x, np.array(["a", "a", "b", "b"])) == math.inf
    assert distance_ratio(x, np.array(["a"] * 4)) is None
    assert distance_ratio(x[:2], np.array(["a", "b"])) is None


def parallel_retrieval(first: np.ndarray, second: np.ndarray) -> dict[str, dict[str, float]]:
    """The means of :func:`parallel_hits` per query side, as the bias audit reports them."""
    return {side: {name: float(values.mean()) for name, values in hits.items()}
            for side, hits in parallel_hits(first, second).items()}


def brute_force_parallel(first: np.ndarray, second: np.ndarray) -> dict[str, dict[str, float]]:
    """The nearest other report of every report, one query at a time."""
    x = np.concatenate([first, second])
    n = len(first)
    out = {}
    for name, queries in (("first", range(n)), ("second", range(n, 2 * n))):
        own = cross = rank = 0
        for q in queries:
            cosines = [float(x[q] @ x[j] / np.linalg.norm(x[q]) / np.linalg.norm(x[j])) if j != q else -2.0
                       for j in range(2 * n)]
            best = int(np.argmax(cosines))
            translation = (q + n) % (2 * n)
            own += best == translation
            cross += (best < n) != (q < n)
            rank += sum(cosines[j] >= cosines[translation] for j in range(2 * n)
                        if j not in (q, translation)) / (2 * n - 2)
        out[name] = {"R@1": own / n, "cross_top1": cross / n, "translation_rank": rank / n}
    return out


def test_parallel_retrieval_identity_and_language_clusters() -> None:
    rng = np.random.default_rng(0)
    content = rng.normal(size=(20, 6))
    perfect = parallel_retrieval(content, content.copy())
    assert perfect == {side: {"R@1": 1.0, "cross_top1": 1.0, "translation_rank": 0.0}
                       for side in ("first", "second")}
    offset = np.zeros(6)
    offset[0] = 20.0
    clustered = parallel_retrieval(content + offset, content - offset)
    assert {side: {k: v for k, v in got.items() if k != "translation_rank"}
            for side, got in clustered.items()} == {side: {"R@1": 0.0, "cross_top1": 0.0}
                                                    for side in ("first", "second")}
    for got in clustered.values():  # behind the 19 reports of its own language, at the latest last
        assert 19 / 38 <= got["translation_rank"] <= 1.0


def test_parallel_retrieval_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    content = rng.normal(size=(15, 4))
    first, second = (content + rng.normal(scale=0.8, size=(15, 4)) for _ in range(2))
    got = parallel_retrieval(first, second)
    expected = brute_force_parallel(first, second)
    assert got == {side: pytest.approx(values) for side, values in expected.items()}
    assert 0.0 < got["first"]["R@1"] < 1.0
    hits = parallel_hits(first, second)
    for side in ("first", "second"):
        for name, values in hits[side].items():
            assert values.shape == (15,) and values.min() >= 0.0 and values.max() <= 1.0
            assert values.mean() == pytest.approx(expected[side][name])
        assert set(np.unique(hits[side]["R@1"])) <= {0.0, 1.0}


def test_parallel_retrieval_ties_count_against_the_query() -> None:
    same = np.ones((3, 2))
    expected = {side: {"R@1": 0.0, "cross_top1": 0.0, "translation_rank": 1.0} for side in ("first", "second")}
    assert parallel_retrieval(same, same) == expected


def test_control_sites_are_those_with_several_languages() -> None:
    def record(site: str, language: str) -> Record:
        return Record("d", Path("x.png"), "p", "s", "train", "report", language, site)

    records = [record("boston", "en"), record("miami", "en"), record("alicante", "es"), record("miami", "es")]
    assert control_sites(records) == ["miami"]
    assert control_sites(records[:3]) == []


def test_knn_vote_tie_goes_to_nearest_neighbour() -> None:
    # Points on the unit circle at 0, 10, -20 and 180 degrees; k = 2.
    # 0 (a): 1 (a), 2 (b) tie -> a, right. 1 (a): 0 (a), 2 (b) tie -> a, right.
    # 2 (b): 0 (a), 1 (a) -> a, wrong. 3 (b): 2 (b) nearest, 1 (a) tie -> b, right.
    angles = np.deg2rad([0.0, 10.0, -20.0, 180.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [3.0], [0.5]])
    assert knn_accuracy(x, np.array(["a", "a", "b", "b"]), k=2) == pytest.approx(0.75)


def test_run_on_tiny_world(tiny_encoder, task_context) -> None:
    metrics = TASKS.get("bias")(tiny_encoder, task_context)
    replicates = pop_replicates(metrics, "tiny/bias")
    json.dumps(metrics)
    assert set(metrics["samples"]) == {"en", "es"} and all(metrics["samples"].values())
    for modality, spaces in (("text", {"pooled", "projected"}), ("image", {"pooled", "projected"})):
        assert set(metrics[modality]) == spaces
        for space in spaces:
            block = metrics[modality][space]
            assert set(block) == {"language", "site"}
            assert 0.0 <= block["language"]["knn_accuracy"] <= 1.0
            assert -1.0 <= block["language"]["silhouette"] <= 1.0
    assert set(metrics["figures"]) == {"tsne_text", "tsne_image"}
    for name in metrics["figures"].values():
        assert (task_context.out_dir / name).stat().st_size > 0
    parallel = metrics["parallel"]
    n = parallel["pairs"]
    assert n > 0 and parallel["chance"] == {"R@1": pytest.approx(1 / (2 * n - 1)),
                                            "cross_top1": pytest.approx(n / (2 * n - 1)),
                                            "translation_rank": 0.5}
    for space in ("pooled", "projected"):
        for language in ("en", "es"):
            got = parallel[space][language]
            assert 0.0 <= got["R@1"] <= got["cross_top1"] <= 1.0  # one's own translation is cross-lingual
            assert 0.0 <= got["translation_rank"] <= 1.0
            for name in ("R@1", "cross_top1", "translation_rank"):  # intervals over resampled queries
                lo, hi = got["ci"][name]
                assert lo <= got[name] <= hi
                draws = replicates[f"tiny/bias/parallel/{space}/{language}/{name}"]
                assert draws.shape == (task_context.cfg.bootstrap_resamples,)
    control = metrics["control"]
    assert control["sites"] == ["miami"]
    for subset in ("seen", "unseen"):
        assert set(control["samples"][subset]) == {"en", "es"}
        for modality, spaces in (("text", {"pooled", "projected"}), ("image", {"pooled", "projected"})):
            assert set(control[subset][modality]) == spaces
            for block in control[subset][modality].values():
                if min(control["samples"][subset].values()) < 2:
                    assert block["probe_accuracy"] is None
                else:
                    assert 0.0 <= block["probe_accuracy"] <= 1.0
                assert block["distance_ratio"] > 0.0


def test_run_caps_samples_per_language(tiny_encoder, task_context) -> None:
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(samples_per_group=3, folds=2))
    metrics = TASKS.get("bias")(tiny_encoder, dataclasses.replace(task_context, cfg=cfg))
    assert metrics["samples"] == {"en": 3, "es": 3}


def test_one_language_is_a_clear_error(tiny_encoder, task_context) -> None:
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(datasets=("padchest",)))
    with pytest.raises(ValueError, match=r"have languages \['es'\]; at least two languages"):
        TASKS.get("bias")(tiny_encoder, dataclasses.replace(task_context, cfg=cfg))


class _LanguageInText:
    """Text features that say only the report's language; image features that say nothing (all
    the same)."""

    name = label = "language-in-text"

    def __init__(self, languages: dict[str, str]) -> None:
        self.languages = languages

    def text_spaces(self, texts, batch_size=64):
        spanish = torch.tensor([[float(self.languages[t] == "es")] for t in texts])
        features = torch.cat([spanish, 1 - spanish], dim=1)
        return {"pooled": features, "projected": features}

    def image_spaces(self, images, batch_size=64):
        return {"pooled": torch.ones(len(images), 8), "projected": torch.ones(len(images), 8)}

    def image_features(self, images, projected=True, batch_size=64):
        return torch.ones(len(images), 8)


def test_language_coded_in_text_is_found_there_and_not_in_the_images(task_context) -> None:
    records = [r for d in task_context.cfg.bias.datasets for r in task_context.data.records(d)]
    languages = {r.report: r.language for r in records if r.report}
    corpus = read_parallel(parallel_path(task_context))
    languages.update({**dict.fromkeys(corpus.en, "en"), **dict.fromkeys(corpus.es, "es")})
    encoder = _LanguageInText(languages)
    cfg = dataclasses.replace(task_context.cfg, bias=BiasConfig(knn_k=1))  # groups of a few test records
    metrics = TASKS.get("bias")(encoder, dataclasses.replace(task_context, cfg=cfg))
    assert min(metrics["samples"].values()) >= 4
    for space in ("pooled", "projected"):
        text = metrics["text"][space]["language"]
        assert text["probe_accuracy"] == text["knn_accuracy"] == 1.0 and text["silhouette"] == 1.0
    image = metrics["image"]["pooled"]["language"]
    assert image["silhouette"] == 0.0 and image["probe_accuracy"] <= image["chance"]
    for language in ("en", "es"):  # every report's nearest neighbour is in its own language
        parallel = metrics["parallel"]["pooled"][language]
        assert parallel["R@1"] == parallel["cross_top1"] == 0.0 and parallel["ci"]["R@1"] == [0.0, 0.0]
        assert parallel["translation_rank"] == 1.0  # tied with every other-language report, ranked last
