"""Object detection on the frozen image encoder: torchvision FCOS heads, mAP (RSNA, Object-CXR).

Images use the "full" geometry; boxes are scaled from original pixel coordinates to S x S. The
frozen encoder's maps of stride >= ``detection.min_stride`` come from the context's feature cache
(:mod:`unimed.eval.dense`, shared with segmentation); a torchvision ``FeaturePyramidNetwork`` and
the FCOS head train on them, per label fraction, with AdamW and early stopping on validation mAP;
the test mAP of the best-validation state is reported.

AP convention (Med-UniC / MGCA: "mAP with IoU thresholds 0.4~0.75"): ``torchmetrics``
MeanAveragePrecision (pycocotools backend), one class, COCO 101-point interpolated AP at each IoU
of ``detection.iou_thresholds`` (0.40, 0.45, ..., 0.75), averaged; all box areas; at most
``detection.max_detections`` boxes per image (after NMS at ``detection.nms_thresh``, below
torchmetrics' own cap of 100). Every test image counts: an image without boxes adds no positive,
and each box predicted on it is a false positive that lowers precision. A detector that finds
nothing scores 0. The test mAP carries a bootstrap interval over the test images
(:mod:`unimed.eval.box_ap`, the same COCO AP re-weighted per resample); validation mAP for early
stopping is the same computation on the validation images (what torchmetrics reports, without
its pycocotools set-up on every epoch).

FCOS rather than YOLOv3 (the papers' head), Faster R-CNN or RetinaNet: it is one-stage and
anchor-free (no RoI sampling or anchor grid to tune for small images), and its head depth is a
constructor argument, so a small head trains in seconds on two CPU cores. FCOS trains only on
feature locations inside a box, which is why the pyramid must start at a stride finer than the
smallest boxes (see :class:`~unimed.eval.config.DetectionConfig`). Because the trunk runs once per
split, FCOS's ``backbone`` slot holds only the trainable FPN and :func:`head_outputs` replays
``FCOS.forward`` from the backbone on; FCOS's image transform is never used.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from tqdm.auto import tqdm

from unimed.data.records import Record
from unimed.eval.box_ap import bootstrap_map
from unimed.eval.config import DetectionConfig
from unimed.eval.dense import Maps
from unimed.eval.encoders import Encoder
from unimed.eval.metrics import Estimate
from unimed.eval.segmentation import (
    epoch_batches,
    fit_early_stopping,
    original_size,
    require_positives,
    seeded_generator,
)
from unimed.eval.tasks import TASKS, TaskContext, sweep_fractions, training_rows

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]  # "boxes" (K, 4) xyxy in S x S pixels, "labels" (K,) int64


def scale_boxes(record: Record, size: int) -> torch.Tensor:
    """(K, 4) xyxy boxes of `record` scaled to the size x size image, clipped, empty ones dropped."""
    if not record.boxes:
        return torch.zeros(0, 4)
    height, width = original_size(record)
    boxes = torch.tensor([[b.x0, b.y0, b.x1, b.y1] for b in record.boxes], dtype=torch.float32)
    boxes = boxes * torch.tensor([size / width, size / height] * 2)
    boxes = boxes.clamp(0.0, float(size))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep]


def dataset_targets(records: list[Record], size: int) -> list[Target]:
    """One-class detection targets (label 0) of `records` in the size x size geometry."""
    targets = []
    for record in records:
        boxes = scale_boxes(record, size)
        targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)})
    return targets


class PyramidNeck(nn.Module):
    """torchvision FPN over the frozen encoder maps: list of (B, C_i, H_i, W_i) -> OrderedDict."""

    def __init__(self, channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels  # FCOS reads this to size its head
        self.fpn = FeaturePyramidNetwork(channels, out_channels)

    def forward(self, maps: Maps) -> OrderedDict[str, torch.Tensor]:
        """Each output is (B, out_channels, H_i, W_i)."""
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_detector(channels: list[int], strides: list[int], image_size: int, cfg: DetectionConfig) -> FCOS:
    """One-class FCOS over maps of the given channels and strides (one anchor point per location)."""
    neck = PyramidNeck(channels, cfg.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(cfg.fpn_channels, num_anchors=1, num_classes=1, num_convs=cfg.head_convs)
    return FCOS(
        neck, num_classes=1, min_size=image_size, max_size=image_size, image_mean=[0.0] * 3,
        image_std=[1.0] * 3, anchor_generator=anchors, head=head, score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh, detections_per_img=cfg.max_detections,
    )


def head_outputs(
    model: FCOS, maps: Maps, image_size: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[int], ImageList]:
    """FCOS.forward from the backbone on: head outputs, anchors, anchors per level, image list."""
    features = list(model.backbone(maps).values())
    # The anchor generator reads only the batch's image size, so a 0-channel tensor stands in.
    images = ImageList(maps[0].new_empty(len(maps[0]), 0, image_size, image_size),
                       [(image_size, image_size)] * len(maps[0]))
    anchors = model.anchor_generator(images, features)
    per_level = [f.shape[2] * f.shape[3] for f in features]
    return model.head(features), anchors, per_level, images


def detection_loss(model: FCOS, maps: Maps, targets: list[Target], image_size: int) -> torch.Tensor:
    """Sum of FCOS's classification, box regression and centre-ness losses."""
    outputs, anchors, per_level, _ = head_outputs(model, maps, image_size)
    return sum(model.compute_loss(targets, outputs, anchors, per_level).values())


# Locations per image handed to FCOS's post-processing first (see :func:`image_detections`).
FIRST_CANDIDATES = 64


def image_detections(
    model: FCOS, outputs: dict[str, torch.Tensor], anchors: torch.Tensor, per_level: list[int],
    image_size: int,
) -> Target:
    """FCOS's detections of one image -- exactly ``model.postprocess_detections`` on all its
    locations -- from its highest-scoring locations only.

    Greedy NMS keeps a box by looking only at higher-scoring boxes, so NMS over the K best
    candidates keeps the first boxes of NMS over all of them; once that gives
    ``detections_per_img`` boxes (FCOS keeps no more), the rest cannot change the result. K starts
    at `FIRST_CANDIDATES` and doubles until then, or until every location above ``score_thresh``
    is in. The K best locations, restricted to one level, are that level's best ones, so FCOS's
    per-level ``topk_candidates`` cut leaves a score prefix of its own candidates. An early-training
    head scores thousands of locations above the threshold, and NMS over all of them took most of
    the detection task's time.

    `outputs` are the one-class head's outputs of this image (A, .), `anchors` (A, 4), levels
    concatenated with `per_level` locations each.
    """
    logits, ctrness = outputs["cls_logits"][:, 0], outputs["bbox_ctrness"][:, 0]
    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness))  # (A,), FCOS's score
    above = int((scores > model.score_thresh).sum())
    order = scores.argsort(descending=True)
    levels = torch.repeat_interleave(torch.arange(len(per_level), device=scores.device),
                                     torch.tensor(per_level, device=scores.device))  # (A,)
    count = min(above, FIRST_CANDIDATES)
    while True:
        chosen = order[:count].sort().values  # level order, as FCOS expects
        counts = torch.bincount(levels[chosen], minlength=len(per_level)).tolist()
        subset = {k: list(v[chosen][None].split(counts, dim=1)) for k, v in outputs.items()}
        found = model.postprocess_detections(
            subset, [list(anchors[chosen].split(counts))], [(image_size, image_size)]
        )[0]
        if len(found["boxes"]) >= model.detections_per_img or count >= above:
            return found
        count = min(2 * count, above)


@torch.no_grad()
def detect(model: FCOS, maps: Maps, image_size: int, batch_size: int, device: torch.device) -> list[Target]:
    """Detections ("boxes", "scores", "labels") per image, on the CPU."""
    model.eval()
    out: list[Target] = []
    for start in range(0, len(maps[0]), batch_size):
        batch = [m[start : start + batch_size].to(device).float() for m in maps]
        outputs, anchors, per_level, _ = head_outputs(model, batch, image_size)
        for i, image_anchors in enumerate(anchors):
            found = image_detections(model, {k: v[i] for k, v in outputs.items()}, image_anchors,
                                     per_level, image_size)
            out.append({k: v.cpu() for k, v in found.items()})
    return out


def mean_average_precision(
    preds: list[Target], targets: list[Target], iou_thresholds: tuple[float, ...]
) -> float:
    """COCO-style mAP averaged over `iou_thresholds`: the value torchmetrics'
    MeanAveragePrecision reports (-1 when no image holds a box), computed by
    :mod:`unimed.eval.box_ap` without building pycocotools objects for every validation pass."""
    value = bootstrap_map(preds, targets, iou_thresholds, np.zeros((0, len(targets)), dtype=int)).value
    return -1.0 if value is None else value


def fit_detector(
    train: tuple[Maps, list[Target]], valid: tuple[Maps, list[Target]], cfg: DetectionConfig, *,
    strides: list[int], image_size: int, seed: int, device: torch.device, desc: str = "detection",
    progress: bool = False,
) -> tuple[FCOS, float]:
    """Train FPN + FCOS head on cached maps; returns the best-validation detector and its mAP."""
    maps, targets = train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_detector([m.shape[1] for m in maps], strides, image_size, cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = seeded_generator(seed)

    def train_epoch() -> None:
        model.train()
        for index in epoch_batches(len(targets), cfg.batch_size, cfg.min_epoch_steps, generator):
            batch = [m[index].to(device).float() for m in maps]
            batch_targets = [{k: v.to(device) for k, v in targets[i].items()} for i in index.tolist()]
            loss = detection_loss(model, batch, batch_targets, image_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def score() -> float:
        preds = detect(model, valid[0], image_size, cfg.batch_size, device)
        return mean_average_precision(preds, valid[1], cfg.iou_thresholds)

    best = fit_early_stopping(model, train_epoch, score, epochs=cfg.epochs, patience=cfg.patience,
                              desc=desc, progress=progress)
    return model, best


def split_maps(encoder: Encoder, ctx: TaskContext, dataset: str, split: str) -> tuple[Maps, list[Target]]:
    """Cached maps of stride >= min_stride and targets of one split, at ``detection.image_size``."""
    targets = dataset_targets(ctx.data.require(dataset, split), ctx.dense_size(ctx.cfg.detection))
    return ctx.dense_maps(encoder, dataset, split, ctx.cfg.detection), targets


def detect_dataset(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """One dataset's row: test mAP of the best-validation detector per label fraction."""
    cfg = ctx.cfg.detection
    size = ctx.dense_size(cfg)
    train_maps, train_targets = split_maps(encoder, ctx, dataset, "train")
    require_positives(dataset, "train", sum(len(t["boxes"]) for t in train_targets), "box")
    valid = split_maps(encoder, ctx, dataset, "valid")
    test_maps, test_targets = split_maps(encoder, ctx, dataset, "test")
    require_positives(dataset, "test", sum(len(t["boxes"]) for t in test_targets), "box")
    strides = [size // m.shape[-1] for m in train_maps]

    def score(index: np.ndarray, label: str) -> Estimate:
        model, best = fit_detector(
            ([training_rows(m, index) for m in train_maps], [train_targets[i] for i in index]), valid, cfg,
            strides=strides, image_size=size, seed=ctx.cfg.seed, device=encoder.device,
            desc=f"{dataset} {label}", progress=ctx.progress,
        )
        preds = detect(model, test_maps, size, cfg.batch_size, encoder.device)
        estimate = bootstrap_map(preds, test_targets, cfg.iou_thresholds,
                                 ctx.resamples(dataset, "test", len(test_targets)))
        log.info("detection %s %s %s: val mAP %.4f, test mAP %.4f (%d images)",
                 encoder.name, dataset, label, best, estimate.value or 0.0, len(index))
        return estimate

    rows = sweep_fractions(ctx, len(train_targets), score, f"detection {dataset}")
    return {"metric": "map", "fractions": rows}


@TASKS.register("detection")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Test mAP per dataset of ``detection.datasets`` and label fraction (see module doc)."""
    datasets = ctx.cfg.detection.datasets
    return {
        dataset: detect_dataset(encoder, ctx, dataset)
        for dataset in tqdm(datasets, desc="detection", disable=not ctx.progress)
    }
