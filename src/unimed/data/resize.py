"""Resizing volumes without skipping voxels (torch only, so a model can use it without importing
the volume readers: nibabel and SimpleITK take a few hundred milliseconds to import)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize_volume(volumes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *spatial) float `volumes` resized to `size`: every axis that shrinks is first averaged
    down (``F.interpolate`` "area": each new voxel the mean of the voxels its extent covers, as a
    scanner reconstructs a thicker slice), then the volume is interpolated (trilinear). Trilinear
    sampling alone reads the two voxels nearest each new one, so beyond a factor of 2 it never
    reads some of them (at 32 -> 8 slices, every other pair of slices) and a finding there would
    not reach the network."""
    smaller = [min(n, s) for n, s in zip(volumes.shape[2:], size)]
    if smaller != list(volumes.shape[2:]):
        volumes = F.interpolate(volumes, size=smaller, mode="area")
    if list(volumes.shape[2:]) != list(size):
        volumes = F.interpolate(volumes, size=tuple(size), mode="trilinear", align_corners=False)
    return volumes
