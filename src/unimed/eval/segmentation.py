"""Semantic segmentation on the frozen image encoder: a U-Net decoder, Dice (SIIM and RSNA).

Images use the "full" geometry (whole image resized to S x S); masks are built at the original
image size -- SIIM from its RLE, RSNA from its pneumonia boxes filled as rectangles -- and resized
the same way (nearest). The encoder's dense maps come from the context's feature cache
(:mod:`unimed.eval.dense`, shared with detection); only a segmentation_models_pytorch
``UnetDecoder`` + ``SegmentationHead`` train on them, per label fraction, and the test Dice of the
best-validation state is reported.

Dice is per image and averaged, as GLoRIA and MGCA compute it (``get_dice`` in their code): an
image with an empty mask scores 1 when nothing is predicted on it and 0 otherwise, so a decoder
that predicts background everywhere scores the share of empty test images, not 0. Which pixels
count as predicted (a probability threshold and a minimum predicted area under which an image is
called empty) is chosen on the validation split for each decoder (:func:`choose_rule`) and recorded
beside its row as "rule", with the share of test images it calls empty ("predicted_empty"). The
interval is a bootstrap of the per-image values (resamples shared by every encoder, so differences
are paired). The loss is theirs too: 10 x focal - log(soft Dice) (GLoRIA's ``MixedLoss``), from
smp's ``FocalLoss`` and ``DiceLoss(log_loss=True)``; see :class:`SegmentationConfig` for the rest.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn
from tqdm.auto import tqdm

from unimed.data.images import dicom_header, is_dicom
from unimed.data.records import BoxAnn, Record
from unimed.data.rle import rle_decode
from unimed.eval.config import SegmentationConfig
from unimed.eval.data import EvalData
from unimed.eval.dense import Maps
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.metrics import Estimate, batched_mean, bootstrap
from unimed.eval.tasks import TASKS, TaskContext, sweep_fractions, training_rows
from unimed.models.image import to_channels_last

log = logging.getLogger(__name__)

def original_size(record: Record) -> tuple[int, int]:
    """(H, W) of the record's image on disk: `image_size` when known, else the DICOM header or PIL."""
    if record.image_size is not None:
        return record.image_size
    if is_dicom(record.image_path):
        header = dicom_header(record.image_path)
        return int(header.Rows), int(header.Columns)
    with Image.open(record.image_path) as image:
        width, height = image.size
    return height, width


def box_mask(boxes: Sequence[BoxAnn], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) boolean mask with every box filled: pixel (r, c) is in when its centre is inside."""
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        rows = slice(max(math.ceil(box.y0 - 0.5), 0), max(math.ceil(box.y1 - 0.5), 0))
        cols = slice(max(math.ceil(box.x0 - 0.5), 0), max(math.ceil(box.x1 - 0.5), 0))
        mask[rows, cols] = True
    return mask


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) boolean mask -> (size, size) float mask, nearest (pixel centres), like the images."""
    tensor = torch.from_numpy(mask).float()[None, None]  # (1, 1, H, W)
    return F.interpolate(tensor, size=(size, size), mode="nearest-exact")[0, 0]


def record_mask(record: Record, size: int) -> torch.Tensor:
    """(size, size) float mask of a record: its RLE mask when it has one, else its boxes filled."""
    if record.mask_rle is not None:
        if record.image_size is None:
            raise EvalError(f"{record.dataset} record {record.study_id} has an RLE mask but no image_size")
        return resize_mask(rle_decode(record.mask_rle, record.image_size), size)
    return resize_mask(box_mask(record.boxes, original_size(record)), size)


def dataset_masks(data: EvalData, dataset: str, split: str, size: int | None = None) -> torch.Tensor:
    """(N, 1, S, S) masks of one split, aligned with ``data.images(dataset, split, "full", size)``
    (S = `size`, default ``data.image_size``)."""
    records = data.require(dataset, split)
    masks = torch.stack([record_mask(r, size or data.image_size) for r in records])  # (N, S, S)
    return masks[:, None]


def require_positives(dataset: str, split: str, count: int, what: str) -> None:
    """Raise a ValueError naming the dataset when its `split` holds no annotation (`count` == 0)."""
    if count == 0:
        raise EvalError(
            f"dataset '{dataset}' has no {what} in its '{split}' split; it cannot be used for this task"
        )


class MaskRule(NamedTuple):
    """Probabilities -> mask: the pixels above `threshold`, or none when they cover less than
    `min_area` (a share) of the image. (0.5, 0) is the papers' rule."""

    threshold: float = 0.5
    min_area: float = 0.0


def _dice(pred_area: torch.Tensor, overlap: torch.Tensor, truth_area: torch.Tensor) -> torch.Tensor:
    total = (pred_area + truth_area).float()
    return torch.where(total > 0, 2.0 * overlap.float() / total.clamp(min=1.0), torch.ones_like(total))


def predicted_masks(probs: torch.Tensor, rule: MaskRule = MaskRule()) -> torch.Tensor:
    """(N, P) boolean masks, flattened, that `rule` makes of (N, 1, S, S) probabilities."""
    pred = (probs > rule.threshold).flatten(1)
    return pred & (pred.sum(1, keepdim=True) >= rule.min_area * pred.shape[1])


def dice_per_image(probs: torch.Tensor, target: torch.Tensor, rule: MaskRule = MaskRule()) -> torch.Tensor:
    """(N,) Dice 2|P & G| / (|P| + |G|) of each image, P the mask of `rule`, G = target > 0.5; an
    image with an empty G scores 1 when P is empty too, else 0 (GLoRIA / MGCA)."""
    pred = predicted_masks(probs, rule)
    truth = (target > 0.5).flatten(1)
    return _dice(pred.sum(1), (pred & truth).sum(1), truth.sum(1))


def dice_score(probs: torch.Tensor, target: torch.Tensor, rule: MaskRule = MaskRule()) -> float:
    """Mean per-image Dice of (N, 1, S, S) probabilities against masks (:func:`dice_per_image`)."""
    return float(dice_per_image(probs, target, rule).mean())


def choose_rule(probs: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float],
                min_areas: Sequence[float]) -> tuple[MaskRule, float]:
    """The rule of `thresholds` x `min_areas` with the highest mean Dice of `probs` against
    `target` (validation), and that Dice; ties go to the rule nearest (0.5, 0)."""
    truth = (target > 0.5).flatten(1)
    truth_area, pixels = truth.sum(1), truth.shape[1]
    counts = {}  # threshold -> ((N,) predicted area, (N,) overlap)
    for threshold in set(thresholds):
        pred = (probs > threshold).flatten(1)
        counts[threshold] = (pred.sum(1), (pred & truth).sum(1))
    rules = sorted({MaskRule(t, a) for t in thresholds for a in min_areas},
                   key=lambda r: (abs(r.threshold - 0.5), r.min_area, r.threshold))
    best_rule, best = rules[0], -math.inf
    for rule in rules:
        area, overlap = counts[rule.threshold]
        kept = area >= rule.min_area * pixels
        dice = float(_dice(area * kept, overlap * kept, truth_area).mean())
        if dice > best:
            best_rule, best = rule, dice
    return best_rule, best


class UNetHead(nn.Module):
    """smp U-Net decoder + segmentation head: encoder maps -> (B, 1, S, S) logits.

    One decoder block per map: the deepest map is the U-Net's bottom, the others its skips, and
    the last block (no skip) doubles the resolution of the shallowest map; the head's logits are
    then resized (bilinear) to S x S.
    """

    def __init__(self, channels: Sequence[int], decoder_channels: Sequence[int], image_size: int) -> None:
        super().__init__()
        if len(decoder_channels) < len(channels):
            raise EvalError(
                f"segmentation.decoder_channels has {len(decoder_channels)} entries; the encoder "
                f"gives {len(channels)} maps, one decoder block each"
            )
        blocks = tuple(decoder_channels[: len(channels)])
        self.image_size = image_size
        # smp reads its first feature (the input image in smp encoders) only for the last block's
        # output size, so a 0-channel placeholder at twice the shallowest map's size stands in.
        self.decoder = UnetDecoder(
            encoder_channels=[0, *channels], decoder_channels=blocks, n_blocks=len(blocks)
        )
        self.head = SegmentationHead(blocks[-1], 1, kernel_size=3)

    def forward(self, maps: Maps) -> torch.Tensor:
        """List of (B, C_i, H_i, W_i) -> (B, 1, S, S) logits."""
        batch, (height, width) = maps[0].shape[0], maps[0].shape[-2:]
        placeholder = maps[0].new_empty(batch, 0, 2 * height, 2 * width)
        logits = self.head(self.decoder([placeholder, *maps]))  # (B, 1, 2 H_0, 2 W_0)
        return F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear")


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed` (batch order)."""
    return torch.Generator().manual_seed(seed)


def epoch_batches(
    n: int, batch_size: int, min_steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: one shuffled pass over `n` items, or, when that is fewer than
    `min_steps` batches, `min_steps` full batches from successive shuffled passes -- so a 16-image
    1% subset gets as many optimiser steps per epoch as a larger set."""
    items = n if math.ceil(n / batch_size) >= min_steps else min_steps * batch_size
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(items / n))])
    for start in range(0, items, batch_size):
        yield order[start : start + batch_size]


def fit_early_stopping(
    model: nn.Module, train_epoch: Callable[[], None], score: Callable[[], float], *,
    epochs: int, patience: int, desc: str, progress: bool,
) -> float:
    """Run `train_epoch` up to `epochs` times, scoring (validation, higher is better) after each;
    stop after `patience` epochs without improvement, load the best state and return its score."""
    best, best_state, stale = -math.inf, copy.deepcopy(model.state_dict()), 0
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=not progress)
    for epoch in bar:
        train_epoch()
        value = score()
        bar.set_postfix(val=f"{value:.3f}")
        if value > best:
            best, best_state, stale = value, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if stale >= patience:
            log.debug("%s: early stop after epoch %d (best %.4f)", desc, epoch + 1, best)
            break
    model.load_state_dict(best_state)
    return best


def _batch(maps: Maps, index: torch.Tensor, device: torch.device) -> Maps:
    return [m[index].to(device).float().contiguous(memory_format=torch.channels_last) for m in maps]


@torch.no_grad()
def predict_masks(model: UNetHead, maps: Maps, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, 1, S, S) foreground probabilities on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(maps[0]), batch_size):
        index = torch.arange(start, min(start + batch_size, len(maps[0])))
        out.append(torch.sigmoid(model(_batch(maps, index, device))).cpu())
    return torch.cat(out)


class FittedDecoder(NamedTuple):
    """A trained U-Net head, the mask rule chosen for it on validation and its validation Dice."""

    model: UNetHead
    rule: MaskRule
    dice: float


def fit_decoder(
    train: tuple[Maps, torch.Tensor], valid: tuple[Maps, torch.Tensor], cfg: SegmentationConfig, *,
    seed: int, device: torch.device, desc: str = "segmentation", progress: bool = False,
) -> FittedDecoder:
    """Train a U-Net head on (maps, (N, 1, S, S) masks), scoring each epoch on validation with the
    best rule of ``cfg.thresholds`` x ``cfg.min_areas`` (:func:`choose_rule`); returns the
    best-validation head with its rule and Dice."""
    maps, masks = train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNetHead([m.shape[1] for m in maps], cfg.decoder_channels, masks.shape[-1]).to(device)
    to_channels_last(model)  # with channels-last maps: oneDNN trains the head about 15 % faster
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    focal = smp.losses.FocalLoss("binary")
    log_dice = smp.losses.DiceLoss("binary", from_logits=True, log_loss=True)
    generator = seeded_generator(seed)

    def train_epoch() -> None:
        model.train()
        for index in epoch_batches(len(masks), cfg.batch_size, cfg.min_epoch_steps, generator):
            logits = model(_batch(maps, index, device))  # (B, 1, S, S)
            target = masks[index].to(device)
            loss = cfg.focal_weight * focal(logits, target) + log_dice(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    rules: dict[float, MaskRule] = {}  # validation Dice -> the first epoch's rule that reached it

    def validate() -> float:
        probs = predict_masks(model, valid[0], cfg.batch_size, device)
        rule, dice = choose_rule(probs, valid[1], cfg.thresholds, cfg.min_areas)
        rules.setdefault(dice, rule)
        return dice

    best = fit_early_stopping(model, train_epoch, validate, epochs=cfg.epochs,
                              patience=cfg.patience, desc=desc, progress=progress)
    return FittedDecoder(model, rules[best], best)


def split_maps(encoder: Encoder, ctx: TaskContext, dataset: str, split: str) -> tuple[Maps, torch.Tensor]:
    """Cached maps of stride >= min_stride and the masks of one split, at ``segmentation.image_size``."""
    cfg = ctx.cfg.segmentation
    maps = ctx.dense_maps(encoder, dataset, split, cfg)
    return maps, dataset_masks(ctx.data, dataset, split, ctx.dense_size(cfg))


def segment_dataset(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """One dataset's row: mean test Dice of the best-validation decoder per label fraction, with
    its bootstrap interval over the test images."""
    cfg = ctx.cfg.segmentation
    train_maps, train_masks = split_maps(encoder, ctx, dataset, "train")
    require_positives(dataset, "train", int(train_masks.sum()), "mask or box")
    valid = split_maps(encoder, ctx, dataset, "valid")
    test_maps, test_masks = split_maps(encoder, ctx, dataset, "test")

    decisions: dict[str, dict[str, Any]] = {}  # label fraction -> the rule and what it predicted

    def score(index: np.ndarray, label: str) -> Estimate:
        train = ([training_rows(m, index) for m in train_maps], training_rows(train_masks, index))
        fitted = fit_decoder(train, valid, cfg, seed=ctx.cfg.seed, device=encoder.device,
                             desc=f"{dataset} {label}", progress=ctx.progress)
        probs = predict_masks(fitted.model, test_maps, cfg.batch_size, encoder.device)
        per_image = dice_per_image(probs, test_masks, fitted.rule)
        blank = ~predicted_masks(probs, fitted.rule).any(1)
        decisions[label] = {"rule": fitted.rule._asdict(), "predicted_empty": float(blank.float().mean())}
        log.info("segmentation %s %s %s: val Dice %.4f, test Dice %.4f (%d images; threshold %g, "
                 "min area %g)", encoder.name, dataset, label, fitted.dice, float(per_image.mean()),
                 len(index), *fitted.rule)
        values = per_image.numpy().astype(np.float64)
        return bootstrap(batched_mean, [values], ctx.resamples(dataset, "test", len(values)))

    rows = sweep_fractions(ctx, len(train_masks), score, f"segmentation {dataset}")
    for label, row in rows.items():
        row.update(decisions[label])
    return {"metric": "dice", "fractions": rows}


@TASKS.register("segmentation")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """Test Dice per dataset of ``segmentation.datasets`` and label fraction (see module doc)."""
    datasets = ctx.cfg.segmentation.datasets
    return {
        dataset: segment_dataset(encoder, ctx, dataset)
        for dataset in tqdm(datasets, desc="segmentation", disable=not ctx.progress)
    }
