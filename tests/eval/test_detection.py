"""Detection task: box scaling, targets, mAP, FCOS on cached maps, the task end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from unimed.data.records import BoxAnn, Record
from unimed.eval.data import fraction_indices
from unimed.eval.detection import (
    build_detector,
    dataset_targets,
    detect,
    detection_loss,
    mean_average_precision,
    run,
    scale_boxes,
)
from unimed.eval.encoders import Encoder
from unimed.eval.segmentation import dense_features
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


def test_mean_average_precision_extremes() -> None:
    truth = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    perfect = [{**truth[0], "scores": torch.tensor([0.9])},
               {**truth[1], "scores": torch.zeros(0)}]
    shifted = [{"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([0])}, perfect[1]]  # IoU 1/7 with the truth
    assert mean_average_precision(perfect, truth, IOUS) == pytest.approx(1.0)
    assert mean_average_precision(shifted, truth, IOUS) == pytest.approx(0.0)


def _cached(tiny_encoder: Encoder, task_context: TaskContext, dataset: str) -> tuple[list, list]:
    data, size = task_context.data, task_context.data.image_size
    maps = dense_features(tiny_encoder, data.images(dataset, "train", "full"), 32,
                          task_context.cfg.detection.min_stride)
    return maps, dataset_targets(data.records(dataset, "train"), size)


def test_training_lowers_the_loss_and_detect_returns_boxes(
    tiny_encoder: Encoder, task_context: TaskContext
) -> None:
    maps, targets = _cached(tiny_encoder, task_context, "rsna")
    size, cfg = task_context.data.image_size, task_context.cfg.detection
    strides = [size // m.shape[-1] for m in maps]
    assert strides == [8, 16, 32]
    torch.manual_seed(0)
    model = build_detector([m.shape[1] for m in maps], strides, size, cfg)
    batch = [m[:8].float() for m in maps]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    losses = []
    for _ in range(30):
        loss = detection_loss(model, batch, targets[:8], size)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    found = detect(model, [m[:4] for m in maps], size, 2, torch.device("cpu"))
    assert len(found) == 4 and all(d["boxes"].shape[1:] == (4,) for d in found)
    assert all(len(d["boxes"]) <= cfg.max_detections for d in found)
    assert all(((d["boxes"] >= 0) & (d["boxes"] <= size)).all() for d in found)


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
            assert 0.0 <= cell["value"] <= 1.0
            assert cell["train_images"] == len(fraction_indices(n_train, fraction, 8, ctx.cfg.seed))


def test_dataset_without_boxes_is_a_clear_error(tiny_encoder: Encoder, task_context: TaskContext) -> None:
    with pytest.raises(ValueError, match="'chexpert'.*'train'"):
        run(tiny_encoder, _context(task_context, datasets=("chexpert",)))
