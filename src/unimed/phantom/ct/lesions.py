"""CT findings drawn into the anatomy: each changes HU inside its own region and records the slices
it occupies, so slice selection and localisation can be scored against the truth.

Lesion contrast scales with 1 / difficulty; sizes are the latent sizes (the reports and the LUNA
annotations quote them), so difficulty never makes a report or annotation wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from unimed.phantom.catalogue import LOBES
from unimed.phantom.ct.anatomy import HU, Anatomy, Grid

SIDES = ("right", "left")


@dataclasses.dataclass(frozen=True)
class Lesion:
    """Where one finding is in the volume. `slices` are z indices (RAS order, 0 = most inferior);
    nodules also give their centre in world mm (RAS) and voxels (z, y, x) and their diameter.
    `mask` is the (D, H, W) region whose slices `slices` lists, what a figure outlines."""

    name: str
    slices: tuple[int, ...]
    centre_mm: tuple[float, float, float] | None = None
    centre_voxel: tuple[float, float, float] | None = None
    diameter_mm: float | None = None
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


def _slices(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(k) for k in np.flatnonzero(mask.any(axis=(1, 2))))


def _zone_of(anatomy: Anatomy, grid: Grid, side: str) -> np.ndarray:
    """(D, 1, 1) height of every slice within the lung of `side`, 0 at its base and 1 at its apex."""
    z = grid.z[:, 0, 0]
    present = anatomy.lungs[side].any(axis=(1, 2))
    if not present.any():
        return np.zeros((len(z), 1, 1), np.float32)
    low, high = z[present].min(), z[present].max()
    return ((z - low) / max(high - low, 1e-3))[:, None, None].astype(np.float32)


_ZONES = {"lower": (0.0, 0.4), "middle": (0.3, 0.7), "upper": (0.6, 1.0)}


def _blend(hu: np.ndarray, weight: np.ndarray, value: float, contrast: float) -> None:
    """Move `hu` towards `value` by `weight * contrast` (in place)."""
    w = np.clip(weight * contrast, 0.0, 1.0).astype(np.float32)
    hu += w * (np.float32(value) - hu)


def _nodule(hu, anatomy, grid, attrs, rng, contrast) -> Lesion:
    side, zone, diameter = attrs["side"], attrs["zone"], float(attrs["size_mm"])
    radius = diameter / 2.0
    lung = anatomy.lungs[side]
    lo, hi = _ZONES[zone]
    height = _zone_of(anatomy, grid, side)
    interior = ndimage.binary_erosion(lung, iterations=max(1, int(np.ceil(radius / grid.pixel_mm))) ,
                                      structure=np.ones((1, 3, 3), bool))
    candidates = np.argwhere(interior & (height >= lo) & (height <= hi))
    if len(candidates) == 0:
        candidates = np.argwhere(lung) if lung.any() else np.argwhere(np.ones(lung.shape, bool))
    k, j, i = candidates[int(rng.integers(len(candidates)))]
    jitter = rng.uniform(-0.4, 0.4, 3)
    centre_voxel = (float(k + jitter[0]), float(j + jitter[1]), float(i + jitter[2]))
    ox, oy, oz = grid.origin
    sx, sy, sz = grid.spacing
    centre = (ox + centre_voxel[2] * sx, oy + centre_voxel[1] * sy, oz + centre_voxel[0] * sz)
    # Slab-averaged distance: a slice shows the nodule when its slab cuts the sphere.
    dz = np.maximum(np.abs(grid.z - centre[2]) - sz / 2.0, 0.0)
    dist = np.sqrt((grid.x - centre[0]) ** 2 + (grid.y - centre[1]) ** 2 + dz**2)
    occupancy = np.clip((radius - dist) / grid.pixel_mm + 0.5, 0.0, 1.0)
    _blend(hu, occupancy, 35.0, contrast)
    mask = occupancy > 0.5
    return Lesion("nodule", _slices(mask), centre, centre_voxel, diameter, mask)


def _ground_glass(hu, anatomy, grid, rng, contrast) -> Lesion:
    """COVID-like: several peripheral, mostly lower and posterior ground-glass patches in both lungs."""
    weight = np.zeros(grid.shape, np.float32)
    for side in SIDES:
        lung = anatomy.lungs[side]
        (cx, cy), (ax, ay) = anatomy.lung_centre[side], anatomy.lung_axes[side]
        radial = np.sqrt(((grid.x - cx) / ax) ** 2 + ((grid.y - cy) / ay) ** 2)
        height = _zone_of(anatomy, grid, side)
        peripheral = np.argwhere(lung & (radial > 0.7) & (height < 0.75))
        if len(peripheral) == 0:
            continue
        for _ in range(int(rng.integers(3, 6))):
            k, j, i = peripheral[int(rng.integers(len(peripheral)))]
            r_xy, r_z = rng.uniform(14.0, 30.0), rng.uniform(14.0, 28.0)
            d2 = (((grid.x - float(grid.x[0, 0, i])) / r_xy) ** 2 + ((grid.y - float(grid.y[0, j, 0])) / r_xy) ** 2
                  + ((grid.z - float(grid.z[k, 0, 0])) / r_z) ** 2)
            weight += np.exp(-d2).astype(np.float32)
    weight = np.clip(weight, 0.0, 1.0) * (anatomy.lungs["right"] | anatomy.lungs["left"])
    _blend(hu, weight, -560.0, contrast)
    mask = weight > 0.3
    return Lesion("covid", _slices(mask), mask=mask)


def _consolidation(hu, anatomy, grid, attrs, rng, contrast) -> Lesion:
    """Lobar pneumonia: one lobe (an oblique band of one lung) filled, with an irregular edge."""
    side, zone = LOBES[attrs["lobe"]]
    lung = anatomy.lungs[side]
    cy, ay = anatomy.lung_centre[side][1], anatomy.lung_axes[side][1]
    tilt = _zone_of(anatomy, grid, side) + 0.25 * (grid.y - cy) / ay
    band = {"upper": tilt > 0.62, "middle": (tilt > 0.3) & (tilt <= 0.68) & (grid.y > cy),
            "lower": tilt <= 0.45}[zone]
    edge = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), (1.0, 3.0, 3.0))
    region = lung & band & (edge > -0.6 * float(edge.std()))
    _blend(hu, region.astype(np.float32), 30.0, contrast)
    return Lesion("pneumonia", _slices(region), mask=region)


_EFFUSION_DEPTH = {"small": (0.22, 0.3), "moderate": (0.38, 0.5), "large": (0.55, 0.75)}
_PNEUMOTHORAX_DEPTH = {"small": 0.15, "moderate": 0.28, "large": 0.45}


def _effusion(hu, anatomy, grid, attrs, contrast) -> Lesion:
    """Dependent (posterior, basal) fluid; `bilateral` fills both sides."""
    sides = SIDES if attrs["side"] == "bilateral" else (attrs["side"],)
    depth, height = _EFFUSION_DEPTH[attrs["size"]]
    region = np.zeros(grid.shape, bool)
    for side in sides:
        cy, ay = anatomy.lung_centre[side][1], anatomy.lung_axes[side][1]
        region |= anatomy.lungs[side] & (grid.y < cy - ay + 2 * ay * depth) & (_zone_of(anatomy, grid, side) < height)
    _blend(hu, region.astype(np.float32), HU["fluid"], contrast)
    return Lesion("pleural_effusion", _slices(region), mask=region)


def _pneumothorax(hu, anatomy, grid, attrs, contrast) -> Lesion:
    """Non-dependent (anterior) free air: lung markings vanish."""
    side = attrs["side"]
    cy, ay = anatomy.lung_centre[side][1], anatomy.lung_axes[side][1]
    region = anatomy.lungs[side] & (grid.y > cy + ay - 2 * ay * _PNEUMOTHORAX_DEPTH[attrs["size"]])
    _blend(hu, region.astype(np.float32), HU["air"], contrast)
    return Lesion("pneumothorax", _slices(region), mask=region)


def render_lesions(
    hu: np.ndarray, anatomy: Anatomy, grid: Grid, present: Mapping[str, Mapping[str, str]],
    rng: np.random.Generator, contrast: float,
) -> list[Lesion]:
    """Draw every present CT finding into `hu` (in place), in a fixed order; return where each is."""
    out = []
    if "pleural_effusion" in present:
        out.append(_effusion(hu, anatomy, grid, present["pleural_effusion"], contrast))
    if "pneumothorax" in present:
        out.append(_pneumothorax(hu, anatomy, grid, present["pneumothorax"], contrast))
    if "covid" in present:
        out.append(_ground_glass(hu, anatomy, grid, rng, contrast))
    if "pneumonia" in present:
        out.append(_consolidation(hu, anatomy, grid, present["pneumonia"], rng, contrast))
    if "nodule" in present:
        out.append(_nodule(hu, anatomy, grid, present["nodule"], rng, contrast))
    return out
