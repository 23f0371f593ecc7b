"""benchmarks/phantom3d_learnability.py: targets match the generator's truth, the metrics give known
values on hand-made inputs, and a tiny run yields one finite row per task."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from benchmark_scripts import benchmark_script

from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("phantom3d_learnability") as module:
        yield module


def test_sample_targets_are_the_generator_truth_in_the_same_voxel_order(bench) -> None:
    cfg = CTConfig(shape=(16, 32, 32))
    enrich = {"covid": 1.0, "nodule": 1.0}
    sample = bench.make_sample(bench.Job(cfg, 0, "t", 1, "guangzhou", enrich, (16, 32, 32), bench.LUNG_WINDOW))
    study = generate_ct_study(cfg, 0, "t", 1, site="guangzhou", enrich=enrich)
    assert sample.image.shape == (1, 16, 32, 32)
    np.testing.assert_allclose(sample.image[0], np.clip((study.hu + 1000.0) / 1400.0, 0.0, 1.0), atol=1e-6)
    np.testing.assert_array_equal(bench.ORGAN_LABELS[sample.organs], study.organs)
    assert (sample.ccii, sample.nodule) == (bench.CCII_CLASSES.index("NCP"), 1)
    hit = sorted({k for lesion in study.lesions for k in lesion.slices})
    assert 0 < len(hit) < 16
    np.testing.assert_array_equal(np.flatnonzero(sample.slices), hit)


def test_slice_targets_are_max_pooled_when_the_input_has_fewer_slices(bench) -> None:
    cfg = CTConfig(shape=(32, 32, 32))
    sample = bench.make_sample(bench.Job(cfg, 0, "t", 0, "lidc_a", {"nodule": 1.0}, (16, 32, 32), bench.LUNG_WINDOW))
    study = generate_ct_study(cfg, 0, "t", 0, site="lidc_a", enrich={"nodule": 1.0})
    hit = {k for lesion in study.lesions for k in lesion.slices}
    expected = sorted({k // 2 for k in hit})
    assert any(k ^ 1 not in hit for k in hit)  # an input slice whose pair of slices is only half hit
    np.testing.assert_array_equal(np.flatnonzero(sample.slices), expected)
    assert set(np.unique(sample.slices)) == {0.0, 1.0}  # hard targets, not the share of slices hit


def test_nodule_centres_follow_the_resize_to_the_input(bench) -> None:
    cfg = CTConfig(shape=(32, 64, 64))
    enrich = {"nodule": 1.0}
    study = generate_ct_study(cfg, 0, "t", 0, site="lidc_a", enrich=enrich)
    centres = np.array([lesion.centre_voxel for lesion in study.lesions if lesion.name == "nodule"])
    same = bench.make_sample(bench.Job(cfg, 0, "t", 0, "lidc_a", enrich, (32, 64, 64), bench.LUNG_WINDOW))
    half = bench.make_sample(bench.Job(cfg, 0, "t", 0, "lidc_a", enrich, (16, 32, 32), bench.LUNG_WINDOW))
    assert len(centres) >= 1
    np.testing.assert_allclose(same.nodules, centres, atol=1e-5)
    np.testing.assert_allclose(half.nodules, (centres + 0.5) / 2 - 0.5, atol=1e-5)
    for centre in same.nodules:  # a nodule is denser than the lung around it
        core = same.image[0][tuple(np.round(centre).astype(int))]
        assert core > np.median(bench.crop(same.image, centre))


def test_nodule_patches_hold_jittered_nodules_and_negatives_clear_of_them(bench) -> None:
    image = np.zeros((1, 16, 32, 32), np.float32)
    image[0, 8, 10, 20] = 1.0  # the nodule's centre voxel
    with_nodule = bench.Sample(image, np.zeros((16, 32, 32), np.uint8), 0, 1, np.zeros(16, np.float32),
                               np.array([[8.0, 10.0, 20.0]], np.float32), np.zeros((0, 1, *bench.CUBE_INPUT)),
                               np.zeros(0, np.float32))
    without = dataclasses.replace(with_nodule, nodule=0, nodules=np.zeros((0, 3), np.float32))
    x, y = bench.nodule_patches([with_nodule, without], seed=0)
    assert x.shape[1:] == (1, *bench.NODULE_PATCH)
    assert int(y.sum()) == bench.NODULE_CROPS
    assert (x[y == 1].amax((1, 2, 3, 4)) == 1.0).all()  # every jittered crop holds the centre
    assert bench.NODULE_NEGATIVES < (y == 0).sum() <= 2 * bench.NODULE_NEGATIVES


def test_candidate_cubes_are_the_nodules_then_the_detector_candidates(bench) -> None:
    cfg = CTConfig()
    enrich = {"nodule": 1.0}
    sample = bench.make_sample(bench.Job(cfg, 0, "t", 0, "lidc_a", enrich, (16, 64, 64), bench.LUNG_WINDOW))
    study = generate_ct_study(cfg, 0, "t", 0, site="lidc_a", enrich=enrich)
    nodules = sum(lesion.name == "nodule" for lesion in study.lesions)
    assert nodules >= 1 and sample.cubes.shape == (nodules + bench.FALSE_CANDIDATES, 1, *bench.CUBE_INPUT)
    np.testing.assert_array_equal(sample.cube_labels, [1.0] * nodules + [0.0] * bench.FALSE_CANDIDATES)
    d, h, w = (n // 2 for n in bench.CUBE_INPUT)
    for cube in sample.cubes:  # a structure at the centre, denser than the cube around it
        assert cube[0, d - 1:d + 1, h - 1:h + 1, w - 1:w + 1].max() > np.median(cube)


def test_windows_tile_the_volume_at_the_stride(bench) -> None:
    image = np.random.default_rng(0).random((1, 8, 20, 24), np.float32)
    out = bench.windows(image)
    counts = [(n - p) // s + 1 for n, p, s in zip(image.shape[1:], bench.NODULE_PATCH, bench.WINDOW_STRIDE)]
    assert out.shape == (int(np.prod(counts)), 1, *bench.NODULE_PATCH)
    d, h, w = 1, 3, 2  # window index along each axis
    corner = np.array((d, h, w)) * bench.WINDOW_STRIDE
    expected = bench.crop(image, corner + bench.NODULE_PATCH / 2)
    np.testing.assert_array_equal(out[(d * counts[1] + h) * counts[2] + w].numpy(), expected)


def test_dice_of_identical_masks_is_one_and_of_disjoint_masks_zero(bench) -> None:
    truth = np.zeros((2, 4, 4, 4), np.uint8)
    truth[:, :2] = 1
    truth[0, 2:, :2] = 2
    assert bench.mean_dice(truth, truth, 3) == pytest.approx(1.0)
    disjoint = np.zeros_like(truth)
    disjoint[:, 2:] = 1  # class 1 where the truth has none; class 2 never predicted
    np.testing.assert_allclose(bench.organ_dice(disjoint, truth, 3), [0.0, 0.0])
    half = truth.copy()
    half[:, :1] = 0  # class 1 predicted on half its voxels: Dice 2 * 0.5 / 1.5
    assert bench.organ_dice(half, truth, 3)[0] == pytest.approx(2 / 3)


def test_dice_ignores_volumes_without_the_class(bench) -> None:
    truth = np.zeros((2, 4, 4, 4), np.uint8)
    truth[0, :2] = 1  # class 1 only in volume 0; class 2 nowhere
    dice = bench.organ_dice(truth, truth, 3)
    assert dice[0] == pytest.approx(1.0) and math.isnan(dice[1])
    assert bench.mean_dice(truth, truth, 3) == pytest.approx(1.0)


def test_constant_predictor_scores_the_majority_rate(bench) -> None:
    assert bench.majority_accuracy(np.array([2, 2, 2, 0, 1]), np.array([2, 2, 2, 0, 1])) == pytest.approx(0.6)
    assert bench.majority_accuracy(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == pytest.approx(0.25)


def test_position_prior_scores_slices_by_their_training_rate(bench) -> None:
    s_train = np.array([[0, 1, 0], [0, 1, 1]], np.float32)  # rates 0, 1, 0.5
    assert bench.position_prior_auc(s_train, np.array([[0, 1, 0]])) == pytest.approx(1.0)
    assert bench.position_prior_auc(s_train, np.array([[1, 0, 0]])) == pytest.approx(0.0)


def test_verdict_needs_a_margin_over_random_and_trivial_and_a_score_below_the_ceiling(bench) -> None:
    def row(trivial: float, random: float, supervised: float):
        return bench.Row("t", "AUC", trivial, random, supervised, "1/1 vol", 0.0)

    assert row(0.5, 0.6, 0.9).learnable and row(0.5, 0.6, 0.9).nontrivial
    assert not row(0.5, 0.88, 0.9).learnable  # random features nearly as good
    assert not row(0.87, 0.6, 0.9).learnable  # the trivial level nearly as good
    assert not row(0.5, 0.6, 0.995).nontrivial
    assert "NOT learnable" in row(0.5, 0.88, 0.9).verdict() and "TRIVIAL" in row(0.5, 0.6, 0.995).verdict()


def test_tiny_run_gives_one_finite_row_per_task(bench) -> None:
    args = bench.parse_args(["--train", "8", "--test", "8", "--seg-train", "3", "--seg-test", "2",
                             "--shape", "16", "32", "32", "--input", "16", "32", "32",
                             "--epochs", "1", "--seg-epochs", "1", "--workers", "1"])
    header, rows, per_organ = bench.run(args)
    assert [r.task for r in rows] == ["CC-CCII NCP/CP/Normal", "LUNA nodule yes/no", "LUNA nodule yes/no, patches",
                                      "LUNA candidates nodule/not, cubes", "slice cuts a finding",
                                      "BCV organ segmentation"]
    for r in rows:
        assert all(math.isfinite(v) for v in (r.trivial, r.random, r.supervised, r.seconds)), r
        assert 0.0 <= min(r.trivial, r.random, r.supervised) and max(r.trivial, r.random, r.supervised) <= 1.0
    assert rows[0].counts == "8/8 vol" and rows[4].counts == "128/128 slices" and rows[5].counts == "3/2 vol"
    assert rows[2].counts.endswith(" patches/8 vol") and " cubes (" in rows[3].counts
    assert per_organ.shape == (len(bench.ORGAN_NAMES),)
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and all(r.task in text for r, text in zip(rows, lines[2:]))
    assert "16x32x32" in header


def test_input_must_suit_the_unet(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--input", "8", "32", "32"])
