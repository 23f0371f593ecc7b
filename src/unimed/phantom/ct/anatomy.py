"""Chest and upper-abdomen anatomy in Hounsfield units, on a site's voxel grid.

Everything is placed in patient millimetres (RAS: +x towards the patient's right, +y anterior,
+z superior, z = 0 at the right diaphragm dome), then sampled on the grid, so two sites with
different voxel sizes image the same body differently, as real scanners do. Arrays are indexed
(z, y, x) with every axis increasing towards R, A and S. All shapes are vectorised numpy
expressions over broadcast coordinate axes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

ORGANS: dict[str, int] = {
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
}
"""Organ labels, numbered as in the BCV (Multi-Atlas Labeling Beyond the Cranial Vault) label maps;
BCV organs the phantom does not draw (gallbladder, veins, pancreas, adrenals) never occur."""

HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -860.0,
    "vessel": -80.0,
    "fat": -100.0,
    "muscle": 45.0,
    "soft": 25.0,
    "blood": 40.0,
    "liver": 60.0,
    "spleen": 48.0,
    "kidney": 32.0,
    "fluid": 12.0,
    "bone": 700.0,
    "marrow": 230.0,
    "disc": 85.0,
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """A site's sampling of patient space: `shape` (D, H, W), in-plane `pixel_mm`, `slice_mm`, and
    the z of the lowest slice. x and y are centred on the body axis."""

    shape: tuple[int, int, int]
    pixel_mm: float
    slice_mm: float
    z0_mm: float

    @property
    def x(self) -> np.ndarray:
        """(1, 1, W) x of every column, mm."""
        w = self.shape[2]
        return ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * self.pixel_mm)[None, None, :]

    @property
    def y(self) -> np.ndarray:
        """(1, H, 1) y of every row, mm."""
        h = self.shape[1]
        return ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * self.pixel_mm)[None, :, None]

    @property
    def z(self) -> np.ndarray:
        """(D, 1, 1) z of every slice, mm."""
        return (self.z0_mm + np.arange(self.shape[0], dtype=np.float32) * self.slice_mm)[:, None, None]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World (x, y, z) in mm of voxel (0, 0, 0)."""
        return float(self.x[0, 0, 0]), float(self.y[0, 0, 0]), float(self.z0_mm)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (x, y, z) in mm."""
        return self.pixel_mm, self.pixel_mm, self.slice_mm


@dataclasses.dataclass(frozen=True)
class Habitus:
    """One patient's body: scale factors and offsets that every study of the patient shares."""

    width: float
    depth: float
    lungs: float
    heart: float
    dome_mm: float
    apex_mm: float


def draw_habitus(rng: np.random.Generator, female: bool) -> Habitus:
    """A random but plausible body."""
    size = 0.94 if female else 1.0
    return Habitus(
        width=float(size * rng.uniform(0.92, 1.08)),
        depth=float(size * rng.uniform(0.9, 1.1)),
        lungs=float(rng.uniform(0.92, 1.06)),
        heart=float(rng.uniform(0.9, 1.1)),
        dome_mm=float(rng.uniform(-12.0, 12.0)),
        apex_mm=float(rng.uniform(170.0, 195.0)),
    )


@dataclasses.dataclass
class Anatomy:
    """A rendered body: HU volume, organ labels, and the lung masks lesions are drawn into."""

    hu: np.ndarray  # (D, H, W) float32
    organs: np.ndarray  # (D, H, W) uint8, ORGANS values
    lungs: dict[str, np.ndarray]  # "right" / "left" -> (D, H, W) bool
    lung_centre: dict[str, tuple[float, float]]  # side -> in-plane (x, y) centre, mm
    lung_axes: dict[str, tuple[float, float]]  # side -> in-plane semi-axes, mm


def _ellipsoid(x, y, z, centre, axes) -> np.ndarray:
    (cx, cy, cz), (ax, ay, az) = centre, axes
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


def _segment(x, y, z, a, b, radius) -> np.ndarray:
    """Voxels within `radius` of the segment a-b (a capsule)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = b - a
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d), 0.0, 1.0)
    return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= radius**2


def render_anatomy(grid: Grid, body: Habitus, rng: np.random.Generator) -> Anatomy:
    """The patient's anatomy sampled on `grid` (no lesions, no acquisition effects yet)."""
    x, y, z = grid.x, grid.y, grid.z
    shape = grid.shape
    hu = np.full(shape, HU["air"], np.float32)
    organs = np.zeros(shape, np.uint8)
    a, b = 165.0 * body.width, 118.0 * body.depth
    rb = np.sqrt((x / a) ** 2 + ((y + 5.0) / b) ** 2)  # (1, H, W): 1 on the skin
    inside = np.broadcast_to(rb <= 1.0, shape)
    hu[inside] = HU["fat"]
    hu[np.broadcast_to(rb <= 1.0 - 14.0 / a, shape)] = HU["muscle"]
    cavity = rb <= 1.0 - 26.0 / a
    hu[np.broadcast_to(cavity, shape)] = HU["soft"]

    # Diaphragm: a dome per side, the left one lower; below it lies the abdomen.
    side_height = np.where(x > 0, 0.0, -14.0) + body.dome_mm
    dome = side_height - 48.0 * (((np.abs(x) - 70.0) / 100.0) ** 2 + ((y + 10.0) / 115.0) ** 2)
    thorax = z > dome

    # Abdominal organs, each only below the diaphragm.
    abdomen = ~thorax & cavity
    liver = _ellipsoid(x, y, z, (55.0, 5.0, -75.0 + body.dome_mm), (100.0 * body.width, 88.0, 90.0)) & abdomen
    spleen = _ellipsoid(x, y, z, (-88.0, -42.0, -62.0 + body.dome_mm), (30.0, 48.0, 52.0)) & abdomen
    stomach = _ellipsoid(x, y, z, (-45.0, 35.0, -62.0 + body.dome_mm), (45.0, 40.0, 50.0)) & abdomen & ~spleen
    kidneys = {
        "right_kidney": _ellipsoid(x, y, z, (66.0, -52.0, -150.0 + body.dome_mm), (27.0, 27.0, 55.0)),
        "left_kidney": _ellipsoid(x, y, z, (-66.0, -50.0, -135.0 + body.dome_mm), (27.0, 27.0, 55.0)),
    }
    for name, mask, value in (("liver", liver, HU["liver"]), ("spleen", spleen, HU["spleen"]),
                              ("stomach", stomach, HU["fluid"] + 20.0)):
        hu[mask] = value
        organs[mask] = ORGANS[name]
    gas = stomach & (y > 53.0)  # non-dependent gas cap (patient supine)
    hu[gas] = HU["air"] + 50.0
    for name, mask in kidneys.items():
        hu[mask & abdomen] = HU["kidney"]
        organs[mask & abdomen] = ORGANS[name]

    # Lungs: one per side, above the diaphragm, tapering to the apex.
    taper = np.sqrt(np.clip((body.apex_mm - z) / 70.0, 0.0, 1.0))
    centres = {"right": (78.0 * body.width, -8.0), "left": (-80.0 * body.width, -8.0)}
    axes = {"right": (62.0 * body.width * body.lungs, 88.0 * body.depth * body.lungs),
            "left": (58.0 * body.width * body.lungs, 86.0 * body.depth * body.lungs)}
    lungs = {}
    for side, (cx, cy) in centres.items():
        ax, ay = axes[side]
        r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
        lungs[side] = (r <= taper) & thorax & (taper > 0) & cavity
    # Mediastinal fat between the lungs, then the heart, great vessels, airways and oesophagus.
    mediastinum = (np.abs(x) < 40.0) & (y > -48.0) & (y < 60.0) & (z > dome) & (z < body.apex_mm - 25.0)
    hu[np.broadcast_to(mediastinum, shape)] = HU["fat"] + 10.0
    for side in lungs:
        hu[lungs[side]] = HU["lung"]
    heart = _ellipsoid(x, y, z, (-22.0, 22.0, 62.0 + body.dome_mm),
                       (62.0 * body.heart, 50.0 * body.heart, 52.0 * body.heart)) & thorax
    aorta = (
        _segment(x, y, z, (8.0, 20.0, 80.0), (8.0, 20.0, 140.0), 14.0)
        | _segment(x, y, z, (8.0, 20.0, 140.0), (-22.0, -40.0, 148.0), 13.0)
        | _segment(x, y, z, (-22.0, -40.0, 148.0), (-20.0, -42.0, -260.0), 12.0)
    )
    esophagus = _segment(x, y, z, (-6.0, -24.0, 260.0), (-30.0, 20.0, -40.0 + body.dome_mm), 7.0)
    trachea = _segment(x, y, z, (0.0, 12.0, 300.0), (0.0, 12.0, 128.0), 10.0)
    bronchi = (_segment(x, y, z, (0.0, 12.0, 128.0), (42.0, 4.0, 96.0), 6.5)
               | _segment(x, y, z, (0.0, 12.0, 128.0), (-46.0, 2.0, 98.0), 6.0))
    for side in lungs:
        lungs[side] &= ~(heart | aorta | esophagus)
    hu[heart] = HU["blood"]
    hu[aorta] = HU["blood"]
    organs[aorta] = ORGANS["aorta"]
    hu[esophagus] = HU["muscle"]
    organs[esophagus & ~aorta] = ORGANS["esophagus"]
    airway = (trachea | bronchi) & np.broadcast_to(cavity | (rb <= 1.0), shape)
    wall = ndimage.binary_dilation(airway, iterations=1) & ~airway
    hu[wall & ~np.logical_or(*lungs.values())] = HU["muscle"]
    hu[airway] = HU["air"]

    # Vessels inside the lungs: a smooth random field above a threshold.
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 1.3, 1.3))
    field /= float(field.std()) + 1e-6
    lung_any = lungs["right"] | lungs["left"]
    vessels = lung_any & (field > 2.1)
    hu[vessels] = HU["vessel"]

    # Skeleton: vertebral bodies with discs, the posterior arch, ribs and sternum.
    vert = ((x / 19.0) ** 2 + ((y + 62.0) / 16.0) ** 2) <= 1.0
    shell = vert & ~(((x / 15.5) ** 2 + ((y + 62.0) / 12.5) ** 2) <= 1.0)
    disc = np.mod(z - body.dome_mm, 27.0) < 5.0
    hu[np.broadcast_to(vert, shape) & ~disc] = HU["marrow"]
    hu[np.broadcast_to(shell, shape) & ~disc] = HU["bone"]
    hu[np.broadcast_to(vert, shape) & disc] = HU["disc"]
    canal = (x**2 + (y + 88.0) ** 2) <= 8.0**2
    arch = ((x**2 + (y + 88.0) ** 2) <= 13.0**2) & ~canal
    spinous = (np.abs(x) < 4.0) & (y < -98.0) & (y > -118.0 * body.depth)
    hu[np.broadcast_to(arch | spinous, shape)] = HU["bone"]
    hu[np.broadcast_to(canal, shape)] = HU["soft"]
    rib_band = (rb > 1.0 - 34.0 / a) & (rb < 1.0 - 26.0 / a) & (y > -95.0)
    rib_phase = np.mod(z - 0.32 * (y + 100.0), 26.0) < 8.0
    ribs = rib_band & rib_phase & (z > -60.0 + body.dome_mm) & (z < body.apex_mm + 10.0)
    hu[ribs] = HU["bone"]
    sternum = (np.abs(x) < 14.0) & (y > b - 32.0) & (y < b - 18.0) & (z > 30.0) & (z < 170.0)
    hu[np.broadcast_to(sternum, shape)] = HU["bone"]
    return Anatomy(hu=hu, organs=organs, lungs=lungs, lung_centre=centres, lung_axes=axes)
