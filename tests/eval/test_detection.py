"""Detection task: box scaling, targets, mAP, FCOS on cached maps, the task end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from box_sets import random_set
from torchmetrics.detection import MeanAveragePrecision

from unimed.data.records import BoxAnn, Record
from unimed.eval.config import DetectionConfig, EvalConfig
from unimed.eval.data import fraction_indices
from unimed.eval.dense import dense_features
from unimed.eval.detection import (
    build_detector,
    dataset_targets,
    detect,
    fit_detector,
    head_outputs,
    image_detections,
    mean_average_precision,
    run,
    scale_boxes,
    split_maps,
)
from unimed.eval.encoders import Encoder
from unimed.eval.tasks import TASKS, TaskContext

IOUS = (0.4, 0.5, 0.75)


def _record(*boxes: BoxAnn, size: tuple[int, int] = (200, 100)) -> Record:
    return Record(dataset="x", image_path=Path("none.png"), patient_id="p", study_id="s", split="train",
                  boxes=boxes, image_size=size)


def test_scale_boxes_maps_original_pixels_to_the_square_geometry() -> None:
    record = _record(
        BoxAnn(10, 20, 50, 100, "a"), BoxAnn(90, 150, 130, 260, "b"), BoxAnn(120, 0, 140, 9, "c")
    )
    boxes = scale_boxes(record, 64)  # H 200 -> 64 (x0.32), W 100 -> 64 (x0.64)
    expected = torch.tensor([[6.4, 6.4, 32.0, 32.0], [57.6, 48.0, 64.0, 64.0]])  # clipped; "c" lies outside
    torch.testing.assert_close(boxes, expected)
    assert scale_boxes(_record(), 64).shape == (0, 4)


def test_targets_are_one_class() -> None:
    targets = dataset_targets([_record(BoxAnn(0, 0, 10, 10, "a")), _record()], 64)
    assert targets[0]["labels"].tolist() == [0] and targets[0]["labels"].dtype == torch.int64
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].shape == (0,)


@pytest.mark.parametrize(("bias", "max_detections"), [(0.0, 20), (0.0, 400), (-3.0, 20), (-9.0, 20)])
def test_image_detections_equal_fcos_postprocessing_of_every_location(
    bias: float, max_detections: int
) -> None:
    """An untrained head scores all 320 locations above the threshold (bias 0), fewer (-3) or
    none (-9); NMS on the best ones first must give FCOS's own detections, also when fewer than
    ``max_detections`` boxes survive (400) and the candidates double until every one is in."""
    cfg = DetectionConfig(max_detections=max_detections)
    torch.manual_seed(0)
    model = build_detector([8, 16], [4, 8], 64, cfg).eval()
    torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, bias)
    maps = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 8, 8)]
    with torch.no_grad():
        outputs, anchors, per_level, images = head_outputs(model, maps, 64)
        expected = model.postprocess_detections(
            {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()},
            [list(a.split(per_level)) for a in anchors], images.image_sizes,
        )
        for i, truth in enumerate(expected):
            found = image_detections(model, {k: v[i] for k, v in outputs.items()}, anchors[i],
                                     per_level, 64)
            assert torch.equal(found["boxes"], truth["boxes"])
            assert torch.equal(found["labels"], truth["labels"])
            torch.testing.assert_close(found["scores"], truth["scores"])  # sigmoid of fewer values: last bit
    counts = [len(d["boxes"]) for d in expected]
    assert max(counts) == 0 if bias == -9.0 else min(counts) > 0


def test_mean_average_precision_extremes() -> None:
    truth = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    perfect = [{**truth[0], "scores": torch.tensor([0.9])},
               {**truth[1], "scores": torch.zeros(0)}]
    shifted = [{"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([0])}, perfect[1]]  # IoU 1/7 with the truth
    assert mean_average_precision(perfect, truth, IOUS) == pytest.approx(1.0)
    assert mean_average_precision(shifted, truth, IOUS) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_map_is_what_torchmetrics_reports(seed: int) -> None:
    """Early stopping reads mean_average_precision: the torchmetrics (pycocotools) value."""
    ious = DetectionConfig().iou_thresholds
    preds, targets = random_set(40, seed)
    reference = MeanAveragePrecision(iou_thresholds=list(ious))
    reference.update(preds, targets)
    expected = float(reference.compute()["map"])
    assert 0.05 < expected < 0.95
    assert mean_average_precision(preds, targets, ious) == pytest.approx(expected, abs=1e-6)
    no_boxes = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 40
    reference = MeanAveragePrecision(iou_thresholds=list(ious))
    reference.update(preds, no_boxes)
    assert mean_average_precision(preds, no_boxes, ious) == float(reference.compute()["map"]) == -1.0


def test_images_without_boxes_count_as_false_positives() -> None:
    box = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    hit = {**box, "scores": torch.tensor([0.5])}
    false_alarm = {**box, "scores": torch.tensor([0.9])}  # on an image without boxes, ranked first
    nothing = {**empty, "scores": torch.zeros(0)}
    assert mean_average_precision([hit, nothing], [box, empty], IOUS) == pytest.approx(1.0)
    # Precision at the only recall level drops to 1/2 (101-point interpolated COCO AP).
    assert mean_average_precision([hit, false_alarm], [box, empty], IOUS) == pytest.approx(0.5)


def _bright_squares(images: torch.Tensor, side: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Paste one bright side x side square per image at a seeded place; its box is the target."""
    generator = torch.Generator().manual_seed(seed)
    images, size, targets = images.clone(), images.shape[-1], []
    for image in images:
        x, y = torch.randint(2, size - side - 2, (2,), generator=generator).tolist()
        image[:, y : y + side, x : x + side] = 1.0
        targets.append({"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float32),
                        "labels": torch.tensor([0])})
    return images, targets


def test_detector_finds_an_easy_box_and_not_a_shuffled_one(
    tiny_encoder: Encoder, task_context: TaskContext
) -> None:
    """A bright square is visible in any encoder's maps: the head must find it on held-out images;
    trained on boxes shuffled across images (no relation to the pixels) it must not."""
    data = task_context.data
    images = torch.cat([data.images("siim", split, "full") for split in ("train", "valid")])
    images, targets = _bright_squares(images, 8, 0)
    size, n_train = images.shape[-1], 3 * len(images) // 4
    cfg = dataclasses.replace(task_context.cfg.detection, epochs=12, patience=12)
    maps = dense_features(tiny_encoder, images, batch_size=64, min_stride=cfg.min_stride)
    strides = [size // m.shape[-1] for m in maps]
    valid = ([m[n_train:] for m in maps], targets[n_train:])

    def fit(train_targets: list[dict]) -> float:
        model, best = fit_detector(([m[:n_train] for m in maps], train_targets), valid, cfg,
                                   strides=strides, image_size=size, seed=0, device=torch.device("cpu"))
        found = detect(model, valid[0], size, 16, torch.device("cpu"))
        assert mean_average_precision(found, valid[1], cfg.iou_thresholds) == pytest.approx(best)
        return best

    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))
    assert fit(targets[:n_train]) > 0.6
    assert fit([targets[i] for i in order]) < 0.2


def _context(task_context: TaskContext, **overrides: object) -> TaskContext:
    det = dataclasses.replace(task_context.cfg.detection, epochs=2, patience=2, **overrides)
    cfg = dataclasses.replace(task_context.cfg, detection=det, fractions=(0.1, 1.0))
    return dataclasses.replace(task_context, cfg=cfg)


def test_task_runs_end_to_end(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    ctx = _context(task_context)
    assert TASKS.get("detection") is run
    out = run(tiny_encoder, ctx)
    assert set(out) == {"rsna", "object-cxr"}
    for dataset, row in out.items():
        assert row["metric"] == "map" and set(row["fractions"]) == {"10%", "100%"}
        n_train = len(ctx.data.records(dataset, "train"))
        for fraction, label in ((0.1, "10%"), (1.0, "100%")):
            cell = row["fractions"][label]
            assert cell["train_images"] == len(fraction_indices(n_train, fraction, 8, ctx.cfg.seed))


def test_dataset_without_boxes_is_a_clear_error(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    with pytest.raises(ValueError, match="'chexpert'.*'train'"):
        run(tiny_encoder, _context(task_context, datasets=("chexpert",)))


def test_an_image_size_of_its_own_scales_maps_and_boxes_together(
    tiny_encoder: Encoder, task_context: TaskContext
) -> None:
    """`detection.image_size` twice the data's: every map twice as wide at the same strides, every
    box at twice the coordinates; each size is its own pass of the encoder."""
    base_maps, base_targets = split_maps(tiny_encoder, _context(task_context), "object-cxr", "valid")
    ctx = _context(task_context, image_size=2 * task_context.data.image_size)
    maps, targets = split_maps(tiny_encoder, ctx, "object-cxr", "valid")
    assert [m.shape[-1] for m in maps] == [2 * m.shape[-1] for m in base_maps]
    assert [m.shape[:2] for m in maps] == [m.shape[:2] for m in base_maps]
    assert sum(len(t["boxes"]) for t in targets) > 0
    for big, small in zip(targets, base_targets):
        torch.testing.assert_close(big["boxes"], 2 * small["boxes"])
    assert len(ctx.features._maps) == 2  # one encoder pass per image size


def test_min_epoch_steps_below_one_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="eval.detection.min_epoch_steps must be >= 1, got 0"):
        EvalConfig(detection=DetectionConfig(min_epoch_steps=0))


@pytest.mark.parametrize("size", [0, 16, 100])
def test_an_image_size_off_the_stride_grid_is_a_clear_error(size: int) -> None:
    with pytest.raises(ValueError, match=f"eval.detection.image_size must be a multiple of 32 .*got {size}"):
        DetectionConfig(image_size=size)
