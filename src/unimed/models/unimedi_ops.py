"""UniMedI's attentive slice selection and attention-guided masking (spec §3 and §6).

Pure tensor functions on the [CLS] attention `v` of eq. 1 (one weight per patch token). The 3D
tokens are ordered (d, h, w), as Conv3d + flatten(2) leaves them, so the `tokens_per_slice` tokens
of one depth slab are consecutive. Selection is a discrete index and carries no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SLICE_MODES = ("center", "random", "all")


def slice_scores(attention: torch.Tensor, tokens_per_slice: int) -> torch.Tensor:
    """Eq. 2: (B, P) token attention -> (B, P // tokens_per_slice) mean attention of each slab."""
    batch, tokens = attention.shape
    if tokens_per_slice < 1 or tokens % tokens_per_slice:
        raise ValueError(
            f"{tokens} tokens are not a multiple of tokens_per_slice={tokens_per_slice}"
        )
    return attention.reshape(batch, tokens // tokens_per_slice, tokens_per_slice).mean(-1)


def _check_k(k: int, slices: int) -> None:
    if not 1 <= k <= slices:
        raise ValueError(f"k must be in [1, {slices}] (the number of slices), got {k}")


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, k) indices of the k largest values of each row; ties go to the lower index."""
    return torch.argsort(values, dim=-1, descending=True, stable=True)[:, :k]


def top_k_slices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S) slice scores -> (B, k) long indices of the k best slices, ascending (anatomical
    order). Ties go to the lower index."""
    _check_k(k, scores.shape[-1])
    return _top_indices(scores, k).sort(dim=-1).values


def random_slices(
    batch: int,
    slices: int,
    k: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, k) long: k distinct slice indices per row, uniform over the k-subsets, ascending (the
    "random slices selection" ablation). `generator` must live on `device`."""
    _check_k(k, slices)
    noise = torch.rand(batch, slices, generator=generator, device=device)
    return noise.argsort(dim=-1)[:, :k].sort(dim=-1).values


def slab_to_slices(
    slabs: torch.Tensor,
    depth_patch: int,
    mode: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Physical input slices standing for selected slabs of `depth_patch` slices (spec §2, [A]).

    (B, k) slab indices -> "center": (B, k) each slab's centre slice (the upper one of the two
    middle slices when `depth_patch` is even); "random": (B, k) a uniformly random slice of each
    slab; "all": (B, k * depth_patch) every slice of each slab, in order.
    """
    first = slabs * depth_patch
    if mode == "center":
        return first + depth_patch // 2
    if mode == "random":
        offsets = torch.randint(
            depth_patch, slabs.shape, generator=generator, device=slabs.device
        )
        return first + offsets
    if mode == "all":
        offsets = torch.arange(depth_patch, device=slabs.device)
        return (first.unsqueeze(-1) + offsets).flatten(-2)  # (B, k * depth_patch)
    raise ValueError(f"slice mode must be one of {', '.join(SLICE_MODES)}, got {mode!r}")


def attention_keep_mask(
    attention: torch.Tensor, ratio: float, groups: Sequence[int]
) -> torch.Tensor:
    """Attention-guided mask (spec §6): (B, P) attention -> (B, P) bool, True = masked.

    `groups` are the sizes of consecutive token groups (e.g. volume tokens, then each slice's
    tokens); in a group of n tokens the round((1 - ratio) * n) highest-attention ones are kept,
    rounding halves up and breaking ties towards the lower index. ``groups=[P]`` ranks jointly.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if sum(groups) != attention.shape[-1]:
        raise ValueError(f"group sizes {list(groups)} do not sum to {attention.shape[-1]} tokens")
    masks = []
    for group in attention.split(list(groups), dim=-1):
        keep = int((1 - ratio) * group.shape[-1] + 0.5)
        mask = torch.ones_like(group, dtype=torch.bool)
        masks.append(mask.scatter(-1, _top_indices(group, keep), False))
    return torch.cat(masks, dim=-1)
