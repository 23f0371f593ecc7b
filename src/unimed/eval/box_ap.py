"""COCO average precision with a bootstrap over test images (one class, all box areas).

Recomputing ``torchmetrics``' COCO mAP for each of a thousand resamples of the test images would
take minutes per detector. Instead, each image's detections are matched to its boxes once per IoU
threshold, exactly as COCO does (detections in descending score order, each taking the unmatched
box of highest IoU at or above the threshold); a resample then only re-weights the images: an image
drawn k times counts each of its detections and boxes k times. From the weighted cumulative true and
false positives in COCO's global score order follow recall and precision, precision is made
non-increasing from the right, and AP is its mean at the 101 recall points 0, 0.01, ..., 1 (0 where
a recall is never reached). mAP is the mean over the IoU thresholds. On the whole test set this is
the value ``torchmetrics.detection.MeanAveragePrecision`` reports (a test checks it, and checks
resamples against the metric on physically duplicated images).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from unimed.eval.metrics import CHUNK, Estimate, percentile_interval

RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def match_detections(
    preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
    iou_thresholds: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """COCO greedy matching of every image's detections.

    Returns, for the D detections of all images in COCO's global order (descending score; ties in
    image order): their image index (D,) and true-positive flags (T, D) per IoU threshold; and the
    number of boxes per image (N,). Also the scores (D,), for reference.
    """
    images, scores, hits = [], [], []
    for i, (pred, target) in enumerate(zip(preds, targets)):
        order = torch.argsort(pred["scores"], descending=True, stable=True)
        boxes, gt = pred["boxes"][order].double(), target["boxes"].double()
        iou = box_iou(boxes, gt).numpy() if len(gt) and len(boxes) else np.zeros((len(boxes), len(gt)))
        per_threshold = np.zeros((len(iou_thresholds), len(boxes)), dtype=bool)
        for t, threshold in enumerate(iou_thresholds):
            free = np.ones(len(gt), dtype=bool)
            overlaps = iou >= min(threshold, 1 - 1e-10)  # (D, G)
            for d in np.flatnonzero(overlaps.any(axis=1)):  # the others match nothing
                candidates = np.flatnonzero(free & overlaps[d])
                if len(candidates):
                    best = candidates[np.argmax(iou[d, candidates])]
                    per_threshold[t, d], free[best] = True, False
        images.append(np.full(len(boxes), i))
        scores.append(pred["scores"][order].numpy())
        hits.append(per_threshold)
    image_index = np.concatenate(images) if images else np.empty(0, dtype=int)
    score = np.concatenate(scores) if scores else np.empty(0)
    tp = np.concatenate(hits, axis=1) if hits else np.zeros((len(iou_thresholds), 0), dtype=bool)
    order = np.argsort(-score, kind="mergesort")
    n_boxes = np.array([len(t["boxes"]) for t in targets])
    return image_index[order], tp[:, order], n_boxes, score[order]


def weighted_map(image_index: np.ndarray, tp: np.ndarray, n_boxes: np.ndarray,
                 weights: np.ndarray) -> np.ndarray:
    """(B,) mAP for (B, N) image multiplicities `weights` (NaN where the images hold no box)."""
    weights = np.asarray(weights, dtype=np.float64)
    positives = weights @ n_boxes  # (B,)
    if tp.shape[1] == 0:  # no detections: every recall point unreached
        return np.where(positives > 0, 0.0, np.nan)
    det_w = weights[:, image_index]  # (B, D)
    aps = []
    for hit in tp.astype(np.float64):  # (D,) per IoU threshold
        tps = np.cumsum(det_w * hit, axis=1)  # (B, D)
        fps = np.cumsum(det_w * (1.0 - hit), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tps / positives[:, None]
        precision = tps / (tps + fps + np.spacing(1))
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        first = _first_reaching(np.nan_to_num(recall, nan=0.0, posinf=0.0))  # (B, 101)
        picked = np.take_along_axis(precision, np.minimum(first, tp.shape[1] - 1), axis=1)
        aps.append(np.where(first < tp.shape[1], picked, 0.0).mean(1))
    return np.where(positives > 0, np.mean(aps, axis=0), np.nan)


def _first_reaching(recall: np.ndarray) -> np.ndarray:
    """(B, 101) index of the first column of each row of the non-decreasing (B, D) `recall` that
    reaches each of RECALL_POINTS (D when none does): one searchsorted over all rows, each row
    shifted by 2 x its number so that the rows stay apart in one sorted array."""
    rows, length = recall.shape
    shift = 2.0 * np.arange(rows)[:, None]
    flat = np.searchsorted((recall + shift).ravel(), (RECALL_POINTS[None, :] + shift).ravel(), side="left")
    return flat.reshape(rows, -1) - length * np.arange(rows)[:, None]


def bootstrap_map(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
                  iou_thresholds: tuple[float, ...], resamples: np.ndarray) -> Estimate:
    """mAP of the test images and its percentile bootstrap interval over `resamples` (R, N); none
    for a single test image (nothing to resample)."""
    image_index, tp, n_boxes, _ = match_detections(preds, targets, iou_thresholds)
    n = len(targets)
    value = float(weighted_map(image_index, tp, n_boxes, np.ones((1, n)))[0])
    parts = []
    for start in range(0, len(resamples), CHUNK):
        chunk = resamples[start : start + CHUNK]
        counts = np.zeros((len(chunk), n))
        np.add.at(counts, (np.arange(len(chunk))[:, None], chunk), 1.0)
        parts.append(weighted_map(image_index, tp, n_boxes, counts))
    replicates = np.concatenate(parts) if parts and n > 1 else np.full(len(resamples), np.nan)
    return Estimate(value if np.isfinite(value) else None, percentile_interval(replicates), replicates)
