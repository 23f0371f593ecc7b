"""Frozen dense maps of the image encoder (segmentation and detection).

Images use the "full" geometry (whole image resized to S x S). Convolutional encoders give maps at
distinct strides (2 ... 32); plain ViTs give every block at one stride, so four evenly spaced
blocks are resampled (bilinear) to strides 4, 8, 16 and 32, a simple feature pyramid, and any
timm image encoder works. A hybrid ViT (a CNN tokenizer, timm's ``HybridEmbed``) is read as
TransUNet's decoder reads one: the CNN's own maps at the strides below the patch's, then the last
block's tokens at the patch stride (resampled tokens would hold no detail finer than the patch).

:class:`unimed.eval.features.FeatureCache` keeps every level the encoder offers (float16, CPU) once
per split; a task takes the levels of stride >= its ``min_stride`` (:func:`select_levels`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import HybridEmbed

from unimed.eval.data import rgb
from unimed.eval.errors import EvalError

if TYPE_CHECKING:  # the encoder wrapper calls into this module (its slice-wise volume maps)
    from unimed.eval.encoders import Encoder

log = logging.getLogger(__name__)

# Strides a single-stride (ViT) encoder's maps are resampled to: the U-Net's usual pyramid.
VIT_STRIDES = (4, 8, 16, 32)
GEOMETRY = "full"  # dense tasks map boxes and masks by a plain scale

Maps = list[torch.Tensor]  # dense maps, each (N, C_i, H_i, W_i), shallow to deep


def feature_layout(visual: nn.Module, min_stride: int = 1) -> tuple[list[int], tuple[int, ...] | None]:
    """Which intermediates to take from the timm model and the strides to resample them to.

    Multi-stride (convolutional) models: every stage of stride >= `min_stride`, no resampling
    (None). Single-stride (ViT): evenly spaced blocks, resampled to the `VIT_STRIDES` >= `min_stride`.
    """
    reductions = [int(info["reduction"]) for info in visual.feature_info]
    if len(set(reductions)) > 1:
        indices = [i for i, r in enumerate(reductions) if r >= min_stride]
        strides = None
    else:
        targets = tuple(s for s in VIT_STRIDES if s >= min_stride)
        indices = sorted({int(i) for i in np.linspace(0, len(reductions) - 1, len(targets)).round()})
        strides = targets[len(targets) - len(indices):]
    if not indices:
        raise EvalError(
            f"the image encoder has no feature map of stride >= {min_stride} (strides {reductions})"
        )
    return indices, strides


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
"""(shape, dtype) -> an uninitialised tensor (:meth:`unimed.eval.data.EvalData.allocator`)."""


def in_memory(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default :data:`Allocate`: a tensor in memory."""
    return torch.empty(shape, dtype=dtype)


@torch.no_grad()
def dense_features(encoder: Encoder, images: torch.Tensor, batch_size: int, min_stride: int = 1,
                   allocate: Allocate = in_memory) -> Maps:
    """(N, 1, S, S) images -> frozen encoder maps of stride s_i >= `min_stride` (float16, CPU),
    each (N, C_i, S / s_i, S / s_i), shallow to deep, written batch by batch into tensors from
    `allocate` (in memory by default; a split's maps may go to disk)."""
    trunk = hybrid_trunk(encoder.visual)
    if trunk is not None:
        batch_maps = functools.partial(_hybrid_maps, encoder, trunk, min_stride=min_stride)
    else:
        batch_maps = functools.partial(_layout_maps, encoder, *feature_layout(encoder.visual, min_stride))
    return batched_maps(lambda x: batch_maps(rgb(x).to(encoder.device)), images, batch_size, allocate)


def batched_maps(maps_of: Callable[[torch.Tensor], Maps], inputs: torch.Tensor, batch_size: int,
                 allocate: Allocate = in_memory) -> Maps:
    """`maps_of` each batch of `batch_size` rows of `inputs`, in order, as float16 CPU maps
    written into tensors from `allocate` (:func:`filled`)."""
    batches = ((start, [m.half().cpu() for m in maps_of(inputs[start : start + batch_size])])
               for start in range(0, len(inputs), batch_size))
    return filled(batches, len(inputs), allocate)


def filled(batches: Iterable[tuple[int, Maps]], n: int, allocate: Allocate = in_memory) -> Maps:
    """`n` rows of maps from (first row, float16 maps of the rows from there) batches, written into
    tensors from `allocate` (in memory by default) as the batches come, shallow to deep."""
    out: Maps = []
    for start, maps in batches:
        if not out:
            out = [allocate((n, *m.shape[1:]), torch.float16) for m in maps]
        for level, m in zip(out, maps):
            level[start : start + len(m)] = m
    return out


def _layout_maps(encoder: Encoder, indices: list[int], strides: tuple[int, ...] | None,
                 x: torch.Tensor) -> Maps:
    """The intermediates `indices` of (B, 3, S, S) `x`, resampled to `strides` when given
    (:func:`feature_layout`)."""
    maps = encoder.model.forward_intermediates(x, indices=indices)
    if strides is None:
        return maps
    size = x.shape[-1]
    return [F.interpolate(m, size=(size // s, size // s), mode="bilinear") for m, s in zip(maps, strides)]


def hybrid_trunk(visual: nn.Module) -> nn.Module | None:
    """The CNN of a hybrid ViT's patch embedding (timm's ``HybridEmbed`` backbone), else None."""
    embed = next((m for m in visual.modules() if isinstance(m, HybridEmbed)), None)
    return None if embed is None else embed.backbone


def _hybrid_maps(encoder: Encoder, trunk: nn.Module, x: torch.Tensor, *, min_stride: int) -> Maps:
    """A hybrid ViT's maps of (B, 3, S, S) `x`: the output of the last of the CNN's modules at each
    stride >= `min_stride` below the patch stride (caught by forward hooks while the ViT runs; on
    the CPU the CNN takes `x` in pieces, :class:`unimed.models.image.HybridTrunk`, whose maps are
    joined in order), then the last block's (B, C, S / patch, S / patch) token map."""
    size = x.shape[-1]
    stages: dict[int, tuple[int, list[torch.Tensor]]] = {}  # stride -> (module index, its outputs)

    def keep(index: int, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        stride = size // out.shape[-1]
        last, pieces = stages.get(stride, (-1, []))
        if index > last:  # a later module at this stride: its maps replace the earlier one's
            stages[stride] = (index, [out])
        elif index == last:
            pieces.append(out)

    hooks = [child.register_forward_hook(functools.partial(keep, i))
             for i, child in enumerate(trunk.children())]
    try:
        top = encoder.model.forward_intermediates(x, indices=[len(encoder.visual.feature_info) - 1])[-1]
    finally:
        for hook in hooks:
            hook.remove()
    patch = size // top.shape[-1]
    if patch < min_stride:
        raise EvalError(f"the image encoder has no feature map of stride >= {min_stride} "
                        f"(CNN strides {sorted(stages)}, patch stride {patch})")
    return [torch.cat(stages[s][1]) for s in sorted(stages) if min_stride <= s < patch] + [top]


def select_levels(maps: Maps, image_size: int, min_stride: int) -> Maps:
    """The maps of stride >= `min_stride` (stride = image_size / map side)."""
    chosen = [m for m in maps if image_size // m.shape[-1] >= min_stride]
    if not chosen:
        strides = [image_size // m.shape[-1] for m in maps]
        raise EvalError(f"the image encoder has no feature map of stride >= {min_stride} (strides {strides})")
    return chosen


def slice_wise_maps(encoder: Encoder, volumes: torch.Tensor, batch_size: int, min_stride: int,
                    allocate: Allocate = in_memory) -> Maps:
    """The slice-wise adapter's 3D maps: (N, D, 1, S, S) axial slices -> every slice's 2D maps of
    stride s >= `min_stride`, stacked along depth and average-pooled there by s (at least one
    slice deep), so each map is (N, C_i, max(D // s, 1), S / s, S / s) float16, shallow to deep,
    written into tensors from `allocate`. The volumes go through in groups whose slices fill whole
    batches of `batch_size` (the least common multiple of it and D), so only a group's 2D maps are
    held and every batch is the one that encoding all slices at once would run."""
    n, depth, size = volumes.shape[0], volumes.shape[1], volumes.shape[-1]
    group = math.lcm(batch_size, depth) // depth

    def pooled(start: int) -> tuple[int, Maps]:
        chunk = volumes[start : start + group]
        flat = dense_features(encoder, chunk.flatten(0, 1), batch_size, min_stride)  # (G D, C, h, w)
        out = []
        for level in flat:
            stacked = level.view(len(chunk), depth, *level.shape[1:]).transpose(1, 2)  # (G, C, D, h, w)
            shape = (max(depth // (size // level.shape[-1]), 1), *level.shape[-2:])
            out.append(F.adaptive_avg_pool3d(stacked.float(), shape).half())
        return start, out

    return filled((pooled(start) for start in range(0, n, group)), n, allocate)
