"""3D multi-organ segmentation (BCV-like, UniMedI Table 6): a UNETR decoder on the frozen encoder.

Each volume of a dataset in `eval.volume_segmentation.datasets` (BCV: ``img/imgNNNN.nii.gz`` with
``label/labelNNNN.nii.gz``) is resized to `depth` axial slices of ``data.image_size`` squared
pixels, HU-windowed to [0, 1]; its label map goes through the same resize (nearest). The encoder's
3D maps come from :meth:`unimed.eval.encoders.Encoder.volume_maps`: a 2D encoder's through the
slice-wise adapter (every slice encoded, its 2D maps stacked along depth and pooled there by their
stride), a native 3D encoder's (``volume_intermediates``) as it gives them. They are computed once
per split and cached; only the decoder trains.

The decoder is UNETR's (MONAI blocks): ``UnetrBasicBlock`` on the volume itself (UNETR's
``encoder1``), one block per encoder map bringing it to its level of UNETR's pyramid, the input
halved once per map (``UnetrBasicBlock`` when the map is already there, as the slice-wise maps of a
CNN are; ``UnetrPrUpBlock`` with a transposed convolution of the missing factor when it is coarser,
as a ViT's token maps are; a trilinear resample after it when the factor is not a whole number, as
for 12-px patches under a 96-px input), ``UnetrUpBlock`` from each level to the next with its skip, and
``UnetOutBlock`` to one channel per organ plus background. Loss: MONAI ``DiceCELoss`` (Dice + CE,
the paper's). Per label fraction (seeded, nested subsets) the state of best validation mean Dice
is kept and scored on the test split: MONAI ``DiceMetric`` per test volume and organ (background
excluded; an organ absent from a volume's ground truth is left out of that volume's average), per
organ the mean over the volumes that have it, and the mean over organs; bootstrap 95 % intervals
over the test volumes on the context's shared resamples.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unimed.data.adapters.bcv import BCV_ORGANS
from unimed.eval.config import VolumeSegmentationConfig
from unimed.eval.dense import Allocate, Maps, in_memory
from unimed.eval.encoders import Encoder
from unimed.eval.errors import EvalError
from unimed.eval.metrics import Estimate, bootstrap
from unimed.eval.segmentation import epoch_batches, fit_early_stopping, seeded_generator
from unimed.eval.tasks import TASKS, TaskContext, sweep_fractions, training_rows
from unimed.eval.volumes import SPLITS

log = logging.getLogger(__name__)

Split = tuple[torch.Tensor, Maps, torch.Tensor]  # (N, 1, D, S, S) volumes, 3D maps, (N, D, S, S) labels


def organ_name(dataset: str, value: int) -> str:
    """"spleen" for BCV label 1; "label 7" for a label of another dataset."""
    return BCV_ORGANS[value] if dataset == "bcv" and value in BCV_ORGANS else f"label {value}"


class UNETRHead(nn.Module):
    """UNETR's decoder (MONAI blocks) on a list of 3D encoder maps (see the module docstring)."""

    def __init__(self, channels: Sequence[int], shapes: Sequence[Sequence[int]], input_shape: Sequence[int],
                 classes: int, feature_size: int) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        # UNETR's levels: the input halved once per encoder map (the last at 1/2^n of the input).
        targets = [tuple(max(1, s // 2 ** (i + 1)) for s in input_shape) for i in range(len(shapes))]
        widths = [feature_size * 2 ** (i + 1) for i in range(len(shapes))]
        self.stem = UnetrBasicBlock(3, 1, feature_size, 3, 1, "instance", res_block=True)
        self.skips = nn.ModuleList()
        self.targets = targets
        for c, shape, target, width in zip(channels, shapes, targets, widths):
            factor = [max(1, t // s) for t, s in zip(target, shape)]
            self.skips.append(UnetrBasicBlock(3, c, width, 3, 1, "instance", res_block=True)
                              if factor == [1, 1, 1] else
                              UnetrPrUpBlock(3, c, width, 0, 3, 1, factor, "instance", res_block=True))
        levels = [tuple(input_shape), *targets]
        ups = [feature_size, *widths]
        self.ups = nn.ModuleList(
            UnetrUpBlock(3, ups[i + 1], ups[i], 3, [a // b for a, b in zip(levels[i], levels[i + 1])],
                         "instance", res_block=True)
            for i in range(len(widths)))
        self.out = UnetOutBlock(3, feature_size, classes)

    def forward(self, volume: torch.Tensor, maps: Maps) -> torch.Tensor:
        """(B, 1, D, S, S) volume and its 3D maps -> (B, classes, D, S, S) logits."""
        skips = [self.stem(volume), *(_resized(block(m), target)
                                      for block, m, target in zip(self.skips, maps, self.targets))]
        x = skips[-1]
        for i in reversed(range(len(self.ups))):
            x = self.ups[i](x, skips[i])
        return self.out(x)


def _resized(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`x` (B, C, d, h, w) trilinearly resampled to `shape` when its level is not an integer
    multiple of the map (a ViT's 8 x 8 token grid of 12-px patches under a 96-px input)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)


# The decoder runs channels-last (NDHWC): oneDNN's 3D convolutions, the weight gradients of the
# full-resolution ones above all, are faster so on the CPU (the task 13 % faster on 2 cores; see
# docs/EVALUATION.md, "The 3D tasks, measured").
LAYOUT = torch.channels_last_3d


def _batch(split: Split, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Maps]:
    volumes = split[0][index].to(device).contiguous(memory_format=LAYOUT)
    return volumes, [m[index].to(device).float().contiguous(memory_format=LAYOUT) for m in split[1]]


@torch.no_grad()
def predict(model: UNETRHead, split: Split, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, D, S, S) arg-max class per voxel, on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(split[0]), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split[0])))
        out.append(model(*_batch(split, index, device)).argmax(1).cpu())
    return torch.cat(out)


def organ_dice(prediction: torch.Tensor, truth: torch.Tensor, classes: int) -> np.ndarray:
    """(N, classes - 1) MONAI Dice of each volume and organ from (N, D, S, S) class indices,
    background excluded; NaN where the organ is absent from the volume's ground truth."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=classes)
    return metric(prediction[:, None], truth[:, None]).numpy().astype(np.float64)


def batched_organ_mean(values: np.ndarray) -> np.ndarray:
    """(B,) mean Dice over organs of (B, N, C) per-volume, per-organ Dice: per organ the mean over
    the volumes that have it, then the mean over the organs that some volume has (NaN if none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an organ no resampled volume has
        return np.nanmean(np.nanmean(values, axis=1), axis=-1)


def fit_decoder(train: Split, valid: Split, classes: int, cfg: VolumeSegmentationConfig, *, seed: int,
                device: torch.device, desc: str = "volume segmentation", progress: bool = False
                ) -> tuple[UNETRHead, float]:
    """Train a UNETR head on `train`; returns the state of best `valid` mean Dice and that Dice."""
    from monai.losses import DiceCELoss

    volumes, maps, labels = train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNETRHead([m.shape[1] for m in maps], [m.shape[2:] for m in maps], volumes.shape[2:],
                          classes, cfg.feature_size).to(device, memory_format=LAYOUT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = seeded_generator(seed)

    def train_epoch() -> None:
        model.train()
        for index in epoch_batches(len(labels), cfg.batch_size, cfg.min_epoch_steps, generator):
            loss = loss_fn(model(*_batch(train, index, device)), labels[index][:, None].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def score() -> float:
        dice = organ_dice(predict(model, valid, cfg.batch_size, device), valid[2], classes)
        return float(np.nan_to_num(batched_organ_mean(dice[None])[0], nan=0.0))

    best = fit_early_stopping(model, train_epoch, score, epochs=cfg.epochs, patience=cfg.patience,
                              desc=desc, progress=progress)
    return model, best


def load_split(encoder: Encoder, ctx: TaskContext, dataset: str, split: str) -> Split:
    """Volumes, their cached 3D maps and label maps of one split."""
    cfg = ctx.cfg.volume_segmentation
    volumes, labels = ctx.data.labelled_volumes(dataset, split, cfg.depth, cfg.window)
    maps = ctx.features.volume_maps(encoder, ctx.data, dataset, split, depth=cfg.depth, window=cfg.window,
                                    min_stride=cfg.min_stride, batch_size=ctx.cfg.batch_size)
    return volumes[:, None], maps, labels


def relabel(labels: torch.Tensor, organs: Sequence[int], allocate: Allocate = in_memory) -> torch.Tensor:
    """Label values -> class indices (organ k of `organs` -> k + 1; any other value -> 0), volume by
    volume into a tensor from `allocate` (in memory by default)."""
    top = max(max(int(volume.max()) for volume in labels) if len(labels) else 0, max(organs))
    table = torch.zeros(top + 1, dtype=torch.long)
    table[torch.tensor(list(organs))] = torch.arange(1, len(organs) + 1)
    out = allocate(tuple(labels.shape), torch.long)
    for i, volume in enumerate(labels):
        out[i] = table[volume]
    return out


def segment_dataset(encoder: Encoder, ctx: TaskContext, dataset: str) -> dict[str, Any]:
    """One dataset's rows: mean and per-organ test Dice per label fraction, with intervals."""
    cfg = ctx.cfg.volume_segmentation
    splits = {s: load_split(encoder, ctx, dataset, s) for s in SPLITS}
    organs = sorted({int(v) for labels in splits["train"][2] for v in labels.unique() if v > 0})
    if not organs:
        raise EvalError(f"dataset '{dataset}' has no labelled organ in its 'train' split")
    splits = {s: (v, m, relabel(y, organs, ctx.data.allocator(dataset, s, "classes",
                                                              what=f"{dataset}/{s}: class maps")))
              for s, (v, m, y) in splits.items()}
    names = [organ_name(dataset, v) for v in organs]
    resamples = ctx.resamples(dataset, "test", len(splits["test"][2]))
    per_organ: dict[str, dict[str, Any]] = {}

    def score(index: np.ndarray, label: str) -> Estimate:
        volumes, maps, labels = splits["train"]
        train = (training_rows(volumes, index), [training_rows(m, index) for m in maps],
                 training_rows(labels, index))
        model, best = fit_decoder(train, splits["valid"], len(organs) + 1, cfg, seed=ctx.cfg.seed,
                                  device=encoder.device, desc=f"{dataset} {label}", progress=ctx.progress)
        dice = organ_dice(predict(model, splits["test"], cfg.batch_size, encoder.device), splits["test"][2],
                          len(organs) + 1)  # (N, C)
        organ_estimates = {name: bootstrap(batched_organ_mean, [dice[:, c : c + 1]], resamples)
                           for c, name in enumerate(names)}
        per_organ[label] = {"values": {n: e.value for n, e in organ_estimates.items()},
                            "ci": {n: e.json_ci() for n, e in organ_estimates.items()}}
        mean = bootstrap(batched_organ_mean, [dice], resamples)
        log.info("volume segmentation %s %s %s: val Dice %.4f, test Dice %s (%d volumes)", encoder.name,
                 dataset, label, best, mean.value, len(index))
        return mean

    rows = sweep_fractions(ctx, len(splits["train"][2]), score, f"volume segmentation {dataset}",
                           fractions=cfg.fractions, min_images=cfg.min_train_volumes)
    for label, row in rows.items():
        row["per_organ"] = per_organ[label]["values"]
        row["per_organ_ci"] = per_organ[label]["ci"]
    return {"metric": "dice", "organs": names, "volumes": {s: len(splits[s][2]) for s in SPLITS},
            "fractions": rows}


@TASKS.register("volume_segmentation")
def run(encoder: Encoder, ctx: TaskContext) -> dict[str, Any]:
    """{dataset: {"metric", "organs", "volumes", "fractions": {"20%": {"value", "ci",
    "train_images", "per_organ": {organ: Dice}, "per_organ_ci"}, ...}}}."""
    out = {}
    for dataset in tqdm(ctx.cfg.volume_segmentation.datasets, desc="volume segmentation",
                        disable=not ctx.progress):
        out[dataset] = segment_dataset(encoder, ctx, dataset)
        log.info("%s volume segmentation on %s: %s", encoder.label, dataset,
                 {k: v["value"] for k, v in out[dataset]["fractions"].items()})
    return out
