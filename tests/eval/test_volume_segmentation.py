"""3D multi-organ segmentation: MONAI Dice against hand-counted overlaps, the nested label
fractions, the UNETR head learning an easy case, the native-3D seam, clear errors, the report."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unimed.config import Config, ConfigError, load_config
from unimed.data.errors import DataError
from unimed.data.records import Record
from unimed.eval import report
from unimed.eval.config import VolumeSegmentationConfig
from unimed.eval.data import fraction_indices, read_labelled
from unimed.eval.dense import dense_features
from unimed.eval.encoders import Encoder
from unimed.eval.report import format_tables
from unimed.eval.volume_segmentation import (
    UNETRHead,
    batched_organ_mean,
    fit_decoder,
    organ_dice,
    predict,
)


def test_organ_dice_matches_hand_counted_overlaps():
    truth = torch.zeros(2, 2, 4, 4, dtype=torch.long)
    truth[0, 0, :2, :2] = 1          # organ 1: 4 voxels
    truth[0, 1, :, :1] = 2           # organ 2: 4 voxels
    truth[1, 0, :1, :] = 1           # volume 1 has organ 1 only
    prediction = torch.zeros_like(truth)
    prediction[0, 0, :2, :1] = 1     # 2 of organ 1's voxels, nothing else: Dice 2*2/(2+4)
    prediction[0, 1, :, :2] = 2      # organ 2's 4 voxels + 4 more: Dice 2*4/(8+4)
    prediction[1, 0, :1, :] = 1      # exact
    prediction[1, 1, 0, 0] = 2       # organ 2 absent from volume 1's truth: left out (NaN)
    dice = organ_dice(prediction, truth, classes=3)
    np.testing.assert_allclose(dice[0], [4 / 6, 8 / 12], rtol=1e-6)
    assert dice[1, 0] == pytest.approx(1.0) and np.isnan(dice[1, 1])
    # Per organ over the volumes that have it, then over organs: ((4/6 + 1) / 2 + 8/12) / 2.
    assert batched_organ_mean(dice[None])[0] == pytest.approx(((4 / 6 + 1) / 2 + 8 / 12) / 2)


def test_label_fractions_are_seeded_and_nested():
    subsets = [fraction_indices(21, f, 2, seed=0) for f in (0.2, 0.4, 1.0)]
    assert [len(s) for s in subsets] == [4, 8, 21]
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2])
    assert np.array_equal(subsets[0], fraction_indices(21, 0.2, 2, seed=0))
    assert not np.array_equal(subsets[1], fraction_indices(21, 0.4, 2, seed=1))


def _easy_split(n: int, seed: int):
    """Volumes (N, 1, 4, 16, 16) holding a bright box (organ 1) and a mid-grey box (organ 2) at
    random places; the maps are the volume pooled to strides 2 and 4 (what a perfect encoder gives)."""
    g = torch.Generator().manual_seed(seed)
    volumes = torch.zeros(n, 1, 4, 16, 16)
    labels = torch.zeros(n, 4, 16, 16, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, 8, (2,), generator=g).tolist()
        volumes[i, 0, :, r : r + 6, c : c + 6], labels[i, :, r : r + 6, c : c + 6] = 1.0, 1
        r, c = (r + 8) % 10, (c + 8) % 10
        volumes[i, 0, :, r : r + 5, c : c + 5], labels[i, :, r : r + 5, c : c + 5] = 0.5, 2
    maps = [torch.nn.functional.avg_pool3d(volumes, k).half() for k in ((2, 2, 2), (4, 4, 4))]
    return volumes, maps, labels


def test_the_unetr_head_learns_an_easy_case():
    cfg = VolumeSegmentationConfig(feature_size=4, lr=1e-2, epochs=6, patience=6, min_epoch_steps=8,
                                   batch_size=2)
    train, valid, test = _easy_split(8, 0), _easy_split(2, 1), _easy_split(4, 2)
    model, best = fit_decoder(train, valid, 3, cfg, seed=0, device=torch.device("cpu"))
    dice = organ_dice(predict(model, test, 2, torch.device("cpu")), test[2], 3)
    assert best > 0.8 and batched_organ_mean(dice[None])[0] > 0.8


def test_a_native_3d_encoder_gives_its_own_maps_and_the_head_upsamples_them():
    """A model with `volume_intermediates` (a 3D ViT's equal-shape token maps) bypasses the
    slice-wise adapter; the decoder brings each map up to its pyramid level."""
    class Native(torch.nn.Module):
        def volume_intermediates(self, volumes):  # (B, D, 1, S, S) -> two (B, 6, D/4, S/8, S/8) maps
            x = torch.nn.functional.avg_pool3d(volumes.transpose(1, 2), (4, 8, 8))
            return [x.expand(-1, 6, -1, -1, -1)] * 2

    encoder = Encoder("native", "Native", Native(), tokenizer=None)
    maps = encoder.volume_maps(torch.rand(3, 8, 1, 32, 32), batch_size=2)
    assert [tuple(m.shape) for m in maps] == [(3, 6, 2, 4, 4)] * 2 and maps[0].dtype == torch.float16
    head = UNETRHead([6, 6], [(2, 4, 4)] * 2, (8, 32, 32), classes=3, feature_size=4)
    logits = head(torch.rand(3, 1, 8, 32, 32), [m.float() for m in maps])
    assert logits.shape == (3, 3, 8, 32, 32)


def test_slice_wise_maps_stack_slices_along_depth_and_pool_by_stride(tiny_encoder):
    maps = tiny_encoder.volume_maps(torch.rand(2, 8, 1, 64, 64), batch_size=16, min_stride=2)
    strides = [64 // m.shape[-1] for m in maps]
    assert strides == sorted(strides) and strides[0] >= 2
    assert [m.shape[2] for m in maps] == [max(8 // s, 1) for s in strides]


def test_slice_wise_maps_in_groups_of_volumes_equal_every_slice_encoded_at_once(tiny_encoder):
    """Volumes go through in groups whose slices fill whole batches (here 3 volumes of 6 slices per
    group of 18 = 2 batches of 9), so each batch is the one a single pass over every slice runs."""
    volumes = torch.rand(7, 6, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = tiny_encoder.volume_maps(volumes, batch_size=9, min_stride=2)
    flat = dense_features(tiny_encoder, volumes.flatten(0, 1), 9, 2)
    for level, whole in zip(maps, flat):
        stacked = whole.view(7, 6, *whole.shape[1:]).transpose(1, 2).float()
        pooled = torch.nn.functional.adaptive_avg_pool3d(stacked, level.shape[2:]).half()
        torch.testing.assert_close(level, pooled, rtol=0, atol=0)


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 4.0, 1.0])), str(path))
    return path


def test_a_label_map_of_another_shape_is_one_error_naming_the_file(tmp_path: Path):
    image = _nifti(tmp_path / "img" / "img0001.nii.gz", np.full((8, 8, 4), -1000.0, np.float32))
    label = _nifti(tmp_path / "label" / "label0001.nii.gz", np.zeros((8, 8, 5), np.uint8))
    record = Record("bcv", image, "0001", "0001", "train", mask_path=label, ndim=3)
    with pytest.raises(DataError) as err:
        read_labelled(record, size=8, depth=4, window=(-160.0, 240.0))
    message = str(err.value)
    assert "label0001.nii.gz" in message and "(8, 8, 5)" in message and "\n" not in message
    missing = Record("bcv", image, "0001", "0001", "train", mask_path=tmp_path / "label" / "x.nii.gz", ndim=3)
    with pytest.raises(DataError, match="x.nii.gz"):
        read_labelled(missing, size=8, depth=4, window=(-160.0, 240.0))


def test_a_bad_config_key_is_one_clear_error_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.volume_segmentation.feature_sise=8"], cls=Config)
    assert "feature_sise" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="fractions"):
        load_config(None, ["eval.volume_segmentation.fractions=[0.2,1.5]"], cls=Config)


def _metrics() -> dict:
    def task(values: tuple[float, float, float]) -> dict:
        return {"volume_segmentation": {"bcv": {"metric": "dice", "organs": ["spleen", "liver"], "fractions": {
            fraction: {"value": v, "ci": [v - 0.05, v + 0.05], "train_images": n,
                       "per_organ": {"spleen": v - 0.1, "liver": v + 0.1},
                       "per_organ_ci": {"spleen": None, "liver": [v, v + 0.2]}}
            for (fraction, n), v in zip((("20%", 4), ("40%", 8), ("100%", 21)), values)}}}}

    return {"encoders": {"medunic": {"label": "Med-UniC", "tasks": task((0.5, 0.6, 0.7))},
                         "random": {"label": "Random init", "tasks": task((0.3, 0.4, 0.5))}}}


def test_the_report_lays_out_table_6_and_the_organs_and_no_longer_lists_it_as_not_run():
    tables = {title: (header, rows) for title, header, rows in format_tables(_metrics())}
    header, rows = tables[report.TITLE_VOLUME_SEGMENTATION]
    assert header == ["Method", "BCV (Dice) / 20%", "BCV (Dice) / 40%", "BCV (Dice) / 100%"]
    assert rows[0] == ["Med-UniC", "50.0 (45.0–55.0)", "60.0 (55.0–65.0)", "70.0 (65.0–75.0)"]
    header, rows = tables[report.TITLE_VOLUME_ORGANS]
    assert header == ["Method", "Set", "Labels", "spleen", "liver"]
    assert rows[2] == ["Med-UniC", "BCV", "100%", "60.0", "80.0 (70.0–90.0)"]
    assert [row[0] for row in tables[report.TITLE_VOLUME_NOT_RUN][1]] == ["Table 3", "Fig. 2", "Fig. 5"]
    assert report.table_notes(_metrics())[report.TITLE_VOLUME_SEGMENTATION] == (
        "Training volumes: BCV: 20% 4, 40% 8, 100% 21")


def test_the_head_takes_a_vit_grid_that_does_not_divide_the_input_by_a_power_of_two():
    """UniMedI's CPU ViT: 12-px patches under a 96-px input give an 8 x 8 grid, whose levels of
    UNETR's pyramid (48, 24, 12, 6) are reached by transposed convolution and a resample."""
    maps = [torch.rand(2, 6, 4, 8, 8) for _ in range(4)]
    head = UNETRHead([6] * 4, [(4, 8, 8)] * 4, (8, 96, 96), classes=3, feature_size=4)
    assert head.targets == [(4, 48, 48), (2, 24, 24), (1, 12, 12), (1, 6, 6)]
    logits = head(torch.rand(2, 1, 8, 96, 96), maps)
    assert logits.shape == (2, 3, 8, 96, 96)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
