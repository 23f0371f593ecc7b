"""Segmentation task: Dice, masks in the "full" geometry, the U-Net head, the task end to end."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.data.records import BoxAnn, Record
from unimed.eval.data import fraction_indices, rgb
from unimed.eval.dense import dense_features, feature_layout, hybrid_trunk
from unimed.models import image as image_models
from unimed.eval.errors import EvalError
from unimed.eval.encoders import Encoder
from unimed.eval.config import SegmentationConfig
from unimed.eval import segmentation
from unimed.eval.segmentation import (
    MaskRule,
    UNetHead,
    box_mask,
    choose_rule,
    dataset_masks,
    dice_per_image,
    dice_score,
    epoch_batches,
    fit_decoder,
    predict_masks,
    record_mask,
    resize_mask,
    run,
)
from unimed.eval.tasks import TASKS, TaskContext
from unimed.models.image import create_image_encoder


def _record(**fields: object) -> Record:
    return Record(dataset="x", image_path=Path("none.png"), patient_id="p", study_id="s", split="train",
                  **fields)


def test_dice_is_per_image_with_the_empty_mask_convention() -> None:
    """GLoRIA / MGCA: Dice per image, then the mean; an empty mask scores 1 only for an empty
    prediction. Hand values for four 2 x 2 images."""
    probs = torch.tensor([
        [[0.9, 0.2], [0.6, 0.4]],  # P = {(0,0), (1,0)}, G = {(0,0), (1,1)}: 2 * 1 / (2 + 2)
        [[0.9, 0.9], [0.9, 0.9]],  # P = all 4, G = {(0,0)}: 2 * 1 / (4 + 1)
        [[0.1, 0.5], [0.0, 0.2]],  # P empty (0.5 is not above the threshold), G empty: 1
        [[0.1, 0.7], [0.0, 0.2]],  # P = {(0,1)}, G empty: 0
    ])[:, None]  # (4, 1, 2, 2)
    target = torch.tensor([
        [[1, 0], [0, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]],
    ])[:, None].float()
    expected = [0.5, 0.4, 1.0, 0.0]
    torch.testing.assert_close(dice_per_image(probs, target), torch.tensor(expected))
    assert dice_score(probs, target) == pytest.approx(sum(expected) / 4)
    # Not the global Dice over all pixels: |P| = 7, |G| = 3, |P & G| = 2 would give 0.4.
    assert dice_score(probs, target) != pytest.approx(2 * 2 / (7 + 3))


def test_min_area_empties_small_predictions() -> None:
    """Two 4 x 4 images: the first has a 2-pixel mask predicted exactly, the second is empty with
    one stray pixel predicted. A minimum area of 1/16 keeps both predictions; 2/16 keeps the
    2-pixel one and empties the stray pixel; 3/16 empties both."""
    probs = torch.zeros(2, 1, 4, 4)
    probs[0, 0, 0, :2] = 0.9
    probs[1, 0, 3, 3] = 0.9
    target = (probs[:1] > 0.5).float().repeat(2, 1, 1, 1)
    target[1] = 0.0
    expected = {1 / 16: [1.0, 0.0], 2 / 16: [1.0, 1.0], 3 / 16: [0.0, 1.0]}
    for min_area, values in expected.items():
        dice = dice_per_image(probs, target, MaskRule(0.5, min_area))
        torch.testing.assert_close(dice, torch.tensor(values))


def test_choose_rule_picks_the_best_validation_rule() -> None:
    """Image 0: a true 4-pixel region predicted at 0.65 plus a 0.45 halo of 4 pixels; image 1:
    empty with a 2-pixel false positive at 0.9; image 2: empty and predicted empty. Thresholds
    0.4 / 0.5 / 0.7: 0.4 takes the halo (Dice 2*4/(8+4)), 0.5 is exact on image 0, 0.7 misses
    it. The 2-pixel false positive costs image 1 unless the minimum area is above 2 pixels and
    at most 4 (3/64 and 4/64 of an 8 x 8 image both qualify; the smaller wins the tie)."""
    probs = torch.zeros(3, 1, 8, 8)
    probs[0, 0, 2:4, 2:4] = 0.65
    probs[0, 0, 4, 2:6] = 0.45
    probs[1, 0, 6, 6:8] = 0.9
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2:4, 2:4] = 1.0
    rule, dice = choose_rule(probs, target, thresholds=(0.4, 0.5, 0.7),
                             min_areas=(0.0, 1 / 64, 3 / 64, 4 / 64, 5 / 64))
    assert rule == MaskRule(0.5, 3 / 64) and dice == pytest.approx(1.0)
    assert dice_score(probs, target, rule) == pytest.approx(dice)
    # The papers' fixed rule on the same predictions: image 1 scores 0.
    assert dice_score(probs, target) == pytest.approx(2 / 3)
    # Every rule of a perfect prediction ties: the papers' rule is kept.
    assert choose_rule(target, target, (0.3, 0.5, 0.7), (0.0, 0.01)) == (MaskRule(0.5, 0.0), 1.0)


@pytest.mark.parametrize("key, value", [("thresholds", ()), ("thresholds", (1.0,)), ("min_areas", (-0.1,)),
                                        ("min_areas", ())])
def test_bad_rule_grid_is_a_clear_error(key: str, value: tuple) -> None:
    with pytest.raises(ValueError, match=f"eval.segmentation.{key}"):
        SegmentationConfig(**{key: value})


def test_all_background_scores_the_share_of_empty_masks() -> None:
    target = torch.zeros(4, 1, 3, 3)
    target[0, 0, 1, 1] = 1.0
    assert dice_score(torch.zeros(4, 1, 3, 3), target) == pytest.approx(3 / 4)


def test_epoch_batches_give_small_sets_enough_steps() -> None:
    batches = list(epoch_batches(5, 4, min_steps=3, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 4]
    seen = torch.cat(batches)
    assert sorted(seen[:5].tolist()) == [0, 1, 2, 3, 4]  # the first pass is a permutation
    assert [len(b) for b in epoch_batches(10, 4, 1, torch.Generator())] == [4, 4, 2]


def test_box_mask_fills_pixels_whose_centres_are_inside() -> None:
    mask = box_mask([BoxAnn(1.0, 0.0, 3.0, 2.0, "a"), BoxAnn(3.6, 2.6, 4.4, 3.4, "b")], (3, 4))
    expected = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_resize_mask_nearest_keeps_the_region() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert resize_mask(mask, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert resize_mask(mask, 8).sum() == 16 and resize_mask(mask, 8)[:4, :4].all()


def test_record_mask_from_rle_and_from_boxes() -> None:
    from_rle = record_mask(_record(mask_rle="2 2", image_size=(4, 2)), 4)  # column 0, rows 2-3
    assert from_rle[2:, :2].all() and from_rle.sum() == 4
    from_boxes = record_mask(_record(boxes=(BoxAnn(0, 0, 2, 2, "p"),), image_size=(4, 4)), 8)
    assert from_boxes[:4, :4].all() and from_boxes.sum() == 16


def test_siim_masks_line_up_with_images(task_context: TaskContext) -> None:
    masks = dataset_masks(task_context.data, "siim", "train")  # (N, 1, S, S)
    images = task_context.data.images("siim", "train", "full")
    assert masks.shape == images.shape
    positive = masks.flatten(1).sum(1) > 0
    masks, images = masks[positive], images[positive]
    # A pneumothorax is dark (air, no lung markings): darker than the mirrored place in the
    # other lung. A transposed or mirrored RLE decode would break this.
    mirrored = masks.flip(-1)
    inside = (images * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
    opposite = (images * mirrored).flatten(1).sum(1) / mirrored.flatten(1).sum(1)
    assert positive.sum() >= 5
    assert (inside < opposite).float().mean() >= 0.75


def test_masks_at_an_image_size_of_their_own_line_up_with_those_images(task_context: TaskContext) -> None:
    size = 2 * task_context.data.image_size
    masks = dataset_masks(task_context.data, "siim", "train", size)
    assert masks.shape[-2:] == (size, size)
    small = dataset_masks(task_context.data, "siim", "train")
    assert masks.flatten(1).any(1).tolist() == small.flatten(1).any(1).tolist()
    # nearest resizing of the same masks: the large one covers about four times the pixels
    ratio = masks.sum() / small.sum()
    assert 3.5 < float(ratio) < 4.5


def _bare_encoder(visual: torch.nn.Module) -> types.SimpleNamespace:
    """What dense_features reads of an Encoder, around a bare timm model on the CPU."""
    def intermediates(x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        return visual.forward_intermediates(x, indices=indices, intermediates_only=True)

    return types.SimpleNamespace(visual=visual, device=torch.device("cpu"),
                                 model=types.SimpleNamespace(forward_intermediates=intermediates))


def test_vit_maps_are_resampled_to_a_pyramid() -> None:
    visual = create_image_encoder("vit_tiny_patch8_64").eval()
    indices, strides = feature_layout(visual, min_stride=4)
    assert len(indices) == 4 and strides == (4, 8, 16, 32)
    maps = dense_features(_bare_encoder(visual), torch.rand(2, 1, 64, 64), batch_size=2, min_stride=4)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    head = UNetHead([m.shape[1] for m in maps], (16, 8, 8, 8), 64)
    assert head([m.float() for m in maps]).shape == (2, 1, 64, 64)


def test_a_hybrid_vit_gives_its_cnn_maps_then_its_last_block() -> None:
    """UniMedI's CPU preset tokenizes with EfficientNet-Lite0 up to stride 32: its finer levels are
    the CNN's own maps (TransUNet), not the 2 x 2 token map resampled."""
    visual = create_image_encoder("vit_tiny_lite0s32_96").eval()
    encoder = _bare_encoder(visual)
    images = torch.rand(3, 1, 64, 64)
    maps = dense_features(encoder, images, batch_size=2)
    assert [64 // m.shape[-1] for m in maps] == [2, 4, 8, 16, 32]
    trunk, x = hybrid_trunk(visual), rgb(images)
    with torch.no_grad():
        stride4 = trunk[:4](x)  # stem, its norm, the stride-2 and the stride-4 stage
        stride16 = trunk[:7](x)  # ... and both stride-16 stages
        top = encoder.model.forward_intermediates(x, [len(visual.blocks) - 1])[-1]
    torch.testing.assert_close(maps[1].float(), stride4, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(maps[3].float(), stride16, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(maps[4].float(), top, atol=2e-2, rtol=2e-3)
    coarse = dense_features(encoder, images, batch_size=3, min_stride=8)
    assert [64 // m.shape[-1] for m in coarse] == [8, 16, 32]
    with pytest.raises(EvalError, match="stride >= 64"):
        dense_features(encoder, images, batch_size=3, min_stride=64)
    assert hybrid_trunk(create_image_encoder("vit_tiny_patch8_64")) is None


def test_a_hybrid_vits_maps_are_the_same_when_its_cnn_runs_in_pieces(monkeypatch) -> None:
    """On the CPU a hybrid ViT's CNN takes a batch a few images at a time (its pixel budget); the
    maps caught from its modules are then every piece's, in order, not the last piece's."""
    visual = create_image_encoder("vit_tiny_lite0s32_96").eval()
    encoder = _bare_encoder(visual)
    images = torch.rand(5, 1, 64, 64)
    whole = dense_features(encoder, images, batch_size=5)
    monkeypatch.setattr(image_models, "CPU_PIXELS_PER_PASS", 2 * 64 * 64)
    pieces = dense_features(encoder, images, batch_size=5)
    assert [m.shape for m in pieces] == [m.shape for m in whole]
    for got, want in zip(pieces, whole):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)  # float16 maps


def test_too_few_decoder_channels_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="decoder_channels"):
        UNetHead([8, 16, 32], (8, 8), 64)


def test_decoder_learns_an_easy_target(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    """Target = the pixels above one brightness level: visible in the frozen maps, so a trained
    head must find it much better than an untrained one and than "background everywhere".
    Every other image is dimmed below the level: nothing to find, Dice 1 only for no prediction."""
    images = task_context.data.images("siim", "train", "full").clone()  # (N, 1, S, S)
    level = images.quantile(0.75)
    images[::2] *= 0.5
    masks = (images > level).float()
    maps = dense_features(tiny_encoder, images, batch_size=32, min_stride=4)
    train = ([m[:24] for m in maps], masks[:24])
    valid = ([m[24:] for m in maps], masks[24:])
    cfg = dataclasses.replace(task_context.cfg.segmentation, epochs=25, patience=25)
    model, rule, best = fit_decoder(train, valid, cfg, seed=0, device=torch.device("cpu"))
    untrained = UNetHead([m.shape[1] for m in maps], cfg.decoder_channels, images.shape[-1])
    untrained_probs = predict_masks(untrained, valid[0], 16, torch.device("cpu"))
    _, baseline = choose_rule(untrained_probs, valid[1], cfg.thresholds, cfg.min_areas)
    background = dice_score(torch.zeros_like(valid[1]), valid[1])
    assert best > 0.6 and best > baseline + 0.2 and best > background + 0.2
    probs = predict_masks(model, valid[0], 16, torch.device("cpu"))
    assert dice_score(probs, valid[1], rule) == best
    assert choose_rule(probs, valid[1], cfg.thresholds, cfg.min_areas) == (rule, best)


def test_decoder_keeps_the_rule_of_its_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation after each epoch chooses a rule; the fitted decoder carries the best epoch's rule
    and Dice, not those of the last epoch (patience 2: epochs 3 and 4 are worse, then it stops)."""
    chosen = iter([(MaskRule(0.3, 0.0), 0.5), (MaskRule(0.7, 0.02), 0.9), (MaskRule(0.5, 0.0), 0.4),
                   (MaskRule(0.4, 0.01), 0.3)])
    monkeypatch.setattr(segmentation, "choose_rule", lambda *args: next(chosen))
    torch.manual_seed(0)
    maps = [torch.rand(8, 4, 8, 8), torch.rand(8, 8, 4, 4)]
    masks = (torch.rand(8, 1, 32, 32) > 0.8).float()
    cfg = dataclasses.replace(SegmentationConfig(), epochs=6, patience=2, batch_size=4, min_epoch_steps=1)
    fitted = fit_decoder((maps, masks), (maps, masks), cfg, seed=0, device=torch.device("cpu"))
    assert (fitted.rule, fitted.dice) == (MaskRule(0.7, 0.02), 0.9)


def _context(task_context: TaskContext, **overrides: object) -> TaskContext:
    seg = dataclasses.replace(task_context.cfg.segmentation, epochs=2, patience=2, **overrides)
    cfg = dataclasses.replace(task_context.cfg, segmentation=seg, fractions=(0.1, 1.0))
    return dataclasses.replace(task_context, cfg=cfg)


def test_task_runs_end_to_end(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    ctx = _context(task_context)
    assert TASKS.get("segmentation") is run
    out = run(tiny_encoder, ctx)
    assert set(out) == {"siim", "rsna"}
    for dataset, row in out.items():
        assert row["metric"] == "dice" and set(row["fractions"]) == {"10%", "100%"}
        n_train = len(ctx.data.records(dataset, "train"))
        for fraction, label in ((0.1, "10%"), (1.0, "100%")):
            cell = row["fractions"][label]
            replicates = cell["replicates"]["value"]  # mean Dice of each shared resample of the test images
            assert replicates.shape == (ctx.cfg.bootstrap_resamples,)
            lo, hi = cell["ci"]
            assert lo <= cell["value"] <= hi and lo <= np.median(replicates) <= hi
            assert cell["train_images"] == len(fraction_indices(n_train, fraction, 8, ctx.cfg.seed))
            cfg = ctx.cfg.segmentation
            assert cell["rule"]["threshold"] in cfg.thresholds and cell["rule"]["min_area"] in cfg.min_areas
            assert 0.0 <= cell["predicted_empty"] <= 1.0
            if cell["predicted_empty"] == 1.0:  # nothing predicted: Dice = the share of empty masks
                test_masks = dataset_masks(ctx.data, dataset, "test")
                assert cell["value"] == pytest.approx(float((test_masks.flatten(1).sum(1) == 0).float().mean()))
    again = run(tiny_encoder, _context(task_context, datasets=("siim",)))["siim"]["fractions"]
    assert [(c["value"], c["ci"]) for c in again.values()] == [
        (c["value"], c["ci"]) for c in out["siim"]["fractions"].values()]


def test_dataset_without_masks_is_a_clear_error(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    with pytest.raises(ValueError, match="'chexpert'.*'train'"):
        run(tiny_encoder, _context(task_context, datasets=("chexpert",)))
