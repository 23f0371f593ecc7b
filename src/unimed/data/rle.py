"""Kaggle SIIM-ACR relative run-length encoding of segmentation masks.

The SIIM format walks the mask in column-major (Fortran) order, i.e. over the transposed image, and
stores pairs of (gap since the end of the previous run, run length). "-1" means an empty mask.
No maintained library implements this relative variant, so it is written here.
"""

from __future__ import annotations

import numpy as np

EMPTY = "-1"


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D boolean mask (H, W) as SIIM relative RLE; "-1" for an empty mask."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    if edges.size == 0:
        return EMPTY
    starts, ends = edges[0::2], edges[1::2]
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{g} {n}" for g, n in zip(gaps, ends - starts))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode SIIM relative RLE into a boolean mask of `shape` (H, W); raises ValueError if malformed."""
    height, width = shape
    flat = np.zeros(height * width, dtype=bool)
    text = rle.strip()
    if text in ("", EMPTY):
        return flat.reshape((height, width), order="F")
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        raise ValueError(f"RLE holds a non-integer value: {text[:40]!r}") from None
    if len(values) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(values)})")
    position = 0
    for gap, length in zip(values[0::2], values[1::2]):
        if gap < 0 or length <= 0:
            raise ValueError(f"RLE run with gap {gap} and length {length} is invalid")
        position += gap
        if position + length > flat.size:
            raise ValueError(f"RLE runs past the end of a {height}x{width} mask")
        flat[position : position + length] = True
        position += length
    return flat.reshape((height, width), order="F")
