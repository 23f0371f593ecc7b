"""2D vs 3D embeddings (UniMedI Fig. 2): the modality gap against hand-computed values, its null on
one distribution, the cross-modal nearest-centroid accuracy, the task on hand-made records and
features (sampling, classes kept, the t-SNE figure), the config keys and the report table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.config import Config, ConfigError, load_config
from unimed.data.records import Record
from unimed.eval import modality, report
from unimed.eval.config import EvalConfig, ModalityGapConfig
from unimed.eval.encoders import Encoder
from unimed.eval.report import format_tables, table_notes
from unimed.eval.tasks import TaskContext


def _context(tmp_path: Path, data: object = None, **gap: object) -> TaskContext:
    cfg = EvalConfig(bootstrap_resamples=50, modality_gap=ModalityGapConfig(**gap))
    return TaskContext(data, cfg, tmp_path)


def test_the_gap_is_the_centroid_distance_over_the_mean_spread():
    """X-ray at (0.6, ±0.8, 0), CT at (-0.6, ±0.8, 0): centroids 1.2 apart, spreads 0.8 each."""
    xray = np.array([[0.6, 0.8, 0.0], [0.6, -0.8, 0.0]])
    ct = np.array([[-0.6, 0.8, 0.0], [-0.6, -0.8, 0.0]])
    one = np.zeros(2, dtype=int)
    assert modality.modality_gap(xray, one, ct, one) == pytest.approx(1.5)
    assert modality.modality_gap(3 * xray, one, 0.5 * ct, one) == pytest.approx(1.5)  # L2-normalised first
    # CT spread 0: the mean spread halves, the gap doubles.
    assert modality.modality_gap(xray, one, np.array([[-1.0, 0, 0], [-1.0, 0, 0]]), one) == pytest.approx(
        1.6 / 0.4)


def test_each_class_weighs_alike_so_the_class_mix_makes_no_gap():
    """The same two findings in both modalities, 4:2 in X-ray and 2:4 in CT: the class-balanced
    centroids coincide (gap 0), where plain centroids would lie apart."""
    a = [[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]]
    b = [[0.0, 0.1, 1.0], [0.0, -0.1, 1.0]]
    xray, y_xray = np.array(a + a + b), np.array([0, 0, 0, 0, 1, 1])
    ct, y_ct = np.array(a + b + b), np.array([0, 0, 1, 1, 1, 1])
    assert modality.modality_gap(xray, y_xray, ct, y_ct) == pytest.approx(0.0, abs=1e-12)
    unbalanced = modality.modality_gap(xray, np.zeros(6, dtype=int), ct, np.zeros(6, dtype=int))
    assert unbalanced > 0.5


def _clouds(shift: float, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two findings' clouds in 16-d for X-ray and CT; CT moved by `shift` along one axis."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(2, 16)) * 2
    y = np.tile(np.repeat([0, 1], n // 2), 2)
    m = np.repeat([0, 1], n)
    x = means[y] + rng.normal(size=(2 * n, 16))
    x[m == 1, 0] += shift
    return modality.unit_rows(x), y, m


def test_one_distribution_has_no_gap_beyond_chance_and_a_shift_has_one(tmp_path):
    ctx = _context(tmp_path)
    same = modality.measure(ctx, *_clouds(0.0), ["a", "b"])
    assert same["gap"] < 0.15 and same["gap"] == pytest.approx(same["chance_gap"], abs=0.05)
    assert same["ct_to_xray"] == same["xray_to_ct"] == 1.0 and same["chance_accuracy"] == 0.5
    shifted = modality.measure(ctx, *_clouds(8.0), ["a", "b"])
    assert shifted["gap"] > 1.0 and shifted["ci"]["gap"][0] > same["ci"]["gap"][1]
    assert shifted["chance_gap"] < 0.15
    assert set(shifted["per_finding"]) == {"a", "b"} and min(shifted["per_finding"].values()) > 1.0
    assert shifted["replicates"]["gap"].shape == (50,)
    again = modality.measure(ctx, *_clouds(8.0), ["a", "b"])  # the same resamples: paired across encoders
    np.testing.assert_array_equal(again["replicates"]["gap"], shifted["replicates"]["gap"])


def test_nearest_class_centroid_of_the_other_modality():
    gallery = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    labels = np.array([0, 0, 1, 1])
    queries = np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.9]])
    hits = modality.nearest_centre_hits(queries, np.array([0, 1, 1]), gallery, labels)
    np.testing.assert_array_equal(hits, [1.0, 0.0, 1.0])


def _record(dataset: str, i: int, labels: dict[str, float]) -> Record:
    return Record(dataset, Path(f"/{dataset}/{i}"), str(i), str(i), "test", labels=labels)


class HandMadeData:
    """Test records: X-ray (`padchest`) 5 pneumonia, 3 effusion (one spelt as CheXpert does), 3
    nodules, one record positive for two classes, one uncertain; CT 4 pneumonia, 2 effusion, no
    nodule. The features are the class one-hot, CT offset along one more axis."""

    def __init__(self) -> None:
        xray = ([{"pneumonia": 1.0}] * 5 + [{"pleural effusion": 1.0}] * 2 + [{"Pleural Effusion": 1.0}]
                + [{"nodule": 1.0}] * 3 + [{"pneumonia": 1.0, "nodule": 1.0}, {"pneumonia": -1.0}])
        ct = [{"pneumonia": 1.0, "COVID 19": 0.0}] * 4 + [{"pleural effusion": 1.0}] * 2 + [{"normal": 1.0}]
        self.splits = {"padchest": [_record("padchest", i, l) for i, l in enumerate(xray)],
                       "bimcv-covid19": [_record("bimcv-covid19", i, l) for i, l in enumerate(ct)]}

    def require(self, dataset: str, split: str) -> list[Record]:
        assert split == "test"
        return self.splits[dataset]

    def features(self, dataset: str, offset: float) -> torch.Tensor:
        classes = ("pneumonia", "pleural effusion", "nodule")
        rows = [[float(r.labels.get(c, r.labels.get(c.title(), 0.0)) == 1.0) for c in classes] + [offset]
                for r in self.splits[dataset]]
        noise = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(len(rows))) * 0.05
        return torch.tensor(rows) + noise


def test_the_task_samples_single_finding_records_keeps_shared_classes_and_draws_the_figure(
        tmp_path, monkeypatch):
    data = HandMadeData()
    monkeypatch.setattr(TaskContext, "image_features", lambda self, encoder, d, split, space: data.features(d, 0.0))
    monkeypatch.setattr(modality, "volume_features",
                        lambda encoder, context, d, split, space: data.features(d, 2.0))
    ctx = _context(tmp_path, data, xray_datasets=("padchest",), per_class=4, min_per_class=2,
                   classes=("pneumonia", "pleural effusion", "nodule"))
    encoder = Encoder("uni", "UniMedI", torch.nn.Identity(), None)
    out = modality.run(encoder, ctx)
    assert out["samples"] == {"xray": {"pneumonia": 4, "pleural effusion": 3, "nodule": 3},
                              "ct": {"pneumonia": 4, "pleural effusion": 2, "nodule": 0}}
    assert out["classes"] == ["pneumonia", "pleural effusion"] and set(out["per_finding"]) == set(out["classes"])
    assert out["ct_to_xray"] == out["xray_to_ct"] == 1.0  # the findings line up across the offset
    # Up to the noise: X-ray unit rows e1, e2 (centroid (.5, .5, 0, 0), spread √.5), CT rows
    # (e1 + 2 e4) / √5, (e2 + 2 e4) / √5 (spread √.1): centroids √(2 (.5 - 1/√20)² + .8) apart.
    centre_distance = math.sqrt(2 * (0.5 - 1 / math.sqrt(20)) ** 2 + 0.8)
    assert out["gap"] == pytest.approx(centre_distance / ((math.sqrt(0.5) + math.sqrt(0.1)) / 2), abs=0.05)
    assert out["chance_gap"] < out["gap"] / 2
    assert (tmp_path / out["figures"]["modality_tsne"]).is_file()
    assert modality.draw_samples(ctx, ["padchest"], ["pneumonia"], 4) == modality.draw_samples(
        ctx, ["padchest"], ["pneumonia"], 4)  # seeded: every encoder gets the same sample

    ctx = _context(tmp_path, data, xray_datasets=("padchest",), min_per_class=3,
                   classes=("pneumonia", "pleural effusion"))
    one = modality.run(encoder, ctx)
    assert one["classes"] == ["pneumonia"]  # 2 CT effusions: too few
    # One class: every nearest centroid is its own, so no accuracy (not a 100 % that says nothing);
    # the gap of that class still stands.
    assert one["ct_to_xray"] is one["xray_to_ct"] is one["chance_accuracy"] is None
    assert "needs two" in one["accuracy_note"] and set(one["ci"]) == {"gap"}
    assert one["gap"] == pytest.approx(one["per_finding"]["pneumonia"]) and one["gap"] > one["chance_gap"]
    ctx = _context(tmp_path, data, xray_datasets=("padchest",), classes=("nodule",))
    skipped = modality.run(encoder, ctx)
    assert "no class of ['nodule'] has 5 X-ray and 5 CT test samples" in skipped["skipped"]
    # "Exactly one of the classes": without pneumonia among them, the pneumonia + nodule X-ray counts.
    assert skipped["samples"] == {"xray": {"nodule": 4}, "ct": {"nodule": 0}}


def test_config_keys_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"eval\.modality_gap\.min_per_class must be >= 2, got 1"):
        load_config(None, ["eval.modality_gap.min_per_class=1"], cls=Config)
    with pytest.raises(ConfigError, match=r"eval\.modality_gap\.per_class must be >= min_per_class \(5\), got 4"):
        load_config(None, ["eval.modality_gap.per_class=4"], cls=Config)
    with pytest.raises(ConfigError, match=r"eval\.modality_gap\.classes must name at least one entry"):
        load_config(None, ["eval.modality_gap.classes=[]"], cls=Config)
    with pytest.raises(ConfigError, match=r"eval\.modality_gap\.classes repeats a class"):
        load_config(None, ["eval.modality_gap.classes=[nodule,Nodule]"], cls=Config)
    with pytest.raises(ConfigError, match=r"eval\.modality_gap\.per_clas'"):
        load_config(None, ["eval.modality_gap.per_clas=3"], cls=Config)


def _metrics() -> dict:
    def gap(value: float) -> dict:
        return {"classes": ["pneumonia"], "samples": {"xray": {"pneumonia": 40}, "ct": {"pneumonia": 9}},
                "gap": value, "chance_gap": 0.21, "ct_to_xray": 0.5, "xray_to_ct": 0.75,
                "chance_accuracy": 0.5, "per_finding": {"pneumonia": value},
                "ci": {"gap": [value - 0.1, value + 0.1], "ct_to_xray": [0.25, 0.75], "xray_to_ct": [0.5, 1.0]}}
    return {"encoders": {"unimedi": {"label": "UniMedI", "tasks": {"modality_gap": gap(0.4)}},
                         "one_model": {"label": "One model", "tasks": {"modality_gap": gap(1.234)}}}}


def test_the_report_gives_the_gap_beside_chance_for_every_encoder():
    tables = {title: (header, rows) for title, header, rows in format_tables(_metrics())}
    header, rows = tables[report.TITLE_MODALITY_GAP]
    assert header == ["Method", "Gap / X-ray vs CT", "Gap / chance", "Nearest class centroid (%) / CT → X-ray",
                      "Nearest class centroid (%) / X-ray → CT", "Nearest class centroid (%) / chance",
                      "Gap per finding / pneumonia"]
    assert rows == [["UniMedI", "0.40 (0.30–0.50)", "0.21", "50.0 (25.0–75.0)", "75.0 (50.0–100.0)", "50.0", "0.40"],
                    ["One model", "1.23 (1.13–1.33)", "0.21", "50.0 (25.0–75.0)", "75.0 (50.0–100.0)", "50.0",
                     "1.23"]]
    assert table_notes(_metrics())[report.TITLE_MODALITY_GAP].startswith(
        "Test samples (X-ray / CT): pneumonia 40 / 9. Gap: distance between")
