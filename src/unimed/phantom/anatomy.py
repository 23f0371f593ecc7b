"""Normal chest anatomy as a density map: thorax, lungs, heart, mediastinum, spine, ribs, clavicles.

Everything is analytic on a patient coordinate frame (u to the patient's left, v downwards, both
about [-1, 1]), so one study is a few dozen vectorised array operations. Coordinate grids and lung
marking textures are cached per image size.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

N_TEXTURES = 6
SIDES = {"right": -1.0, "left": 1.0}  # PA convention: the patient's right is on the image left


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Per-patient body habitus and positioning."""

    scale: float
    aspect: float
    angle: float
    shift: tuple[float, float]
    inspiration: float
    heart: float
    texture: int
    flip_texture: bool
    female: bool


@dataclasses.dataclass(frozen=True)
class Lung:
    """One lung field as an ellipse-like region: centre x, half width, apex and base heights."""

    cx: float
    w: float
    top: float
    base: float

    def point(self, side_sign: float, lateral: float, height: float) -> tuple[float, float]:
        """Patient coordinates of a point `lateral` (0 medial edge .. 1 lateral edge) and `height`
        (0 apex .. 1 base) inside this lung."""
        return self.cx + side_sign * (lateral - 0.5) * 1.6 * self.w, self.top + height * (self.base - self.top)


@dataclasses.dataclass
class Frame:
    """A rendered view: patient-frame grids, lung regions, and the density it accumulates."""

    size: int
    geometry: Geometry
    u: np.ndarray  # (S, S) patient x
    v: np.ndarray  # (S, S) patient y
    density: np.ndarray  # (S, S) float32
    lung: np.ndarray  # (S, S) soft lung field in [0, 1]
    markings: np.ndarray  # (S, S) vessel texture inside the lungs, in [0, 1]
    lungs: dict[str, Lung]
    lung_r: dict[str, np.ndarray]  # side -> (S, S) elliptic radius, < 1 inside that lung
    view: str

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Image pixel (x, y) of a patient-frame point."""
        g = self.geometry
        c, s = np.cos(g.angle), np.sin(g.angle)
        x = g.shift[0] + g.scale * (c * u * g.aspect - s * v)
        y = g.shift[1] + g.scale * (s * u * g.aspect + c * v)
        half = (self.size - 1) / 2.0
        return float((x + 1.0) * half), float((y + 1.0) * half)

    def pixels_per_unit(self) -> float:
        return self.geometry.scale * (self.size - 1) / 2.0


@functools.lru_cache(maxsize=8)
def image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image coordinates X, Y in [-1, 1], each (S, S) float32."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(axis, axis)


@functools.lru_cache(maxsize=8)
def marking_textures(size: int) -> np.ndarray:
    """(K, S, S) vessel-like textures: thin ridges at zero crossings of band-passed noise.

    Built once per size from a fixed seed: they are a property of the renderer, and which one a
    patient gets (and its flip) is drawn from the study seed.
    """
    rng = np.random.default_rng(20240611 + size)
    noise = rng.standard_normal((N_TEXTURES, size, size)).astype(np.float32)
    sigma = size / 96.0
    band = ndimage.gaussian_filter(noise, (0, sigma, sigma)) - ndimage.gaussian_filter(noise, (0, 3 * sigma, 3 * sigma))
    scale = band.std(axis=(1, 2), keepdims=True)
    return np.exp(-((band / (0.35 * scale)) ** 2)).astype(np.float32)


def draw_geometry(rng: np.random.Generator, female: bool) -> Geometry:
    """Random habitus and positioning of one patient."""
    return Geometry(
        scale=float(rng.uniform(0.86, 0.98)),
        aspect=float(rng.uniform(0.92, 1.08)),
        angle=float(np.deg2rad(rng.uniform(-4.0, 4.0))),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.02, 0.06))),
        inspiration=float(rng.uniform(0.88, 1.08)),
        heart=float(rng.uniform(0.9, 1.08)),
        texture=int(rng.integers(N_TEXTURES)),
        flip_texture=bool(rng.random() < 0.5),
        female=female,
    )


def _patient_grid(size: int, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    x, y = image_grid(size)
    c, s = np.float32(np.cos(g.angle)), np.float32(np.sin(g.angle))
    dx, dy = x - np.float32(g.shift[0]), y - np.float32(g.shift[1])
    u = (c * dx + s * dy) / np.float32(g.scale * g.aspect)
    v = (c * dy - s * dx) / np.float32(g.scale)
    return u, v


def soft_ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float = 0.15) -> np.ndarray:
    """1 inside the ellipse, falling linearly to 0 over a relative rim `edge`."""
    r = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def segment_band(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], half: float) -> np.ndarray:
    """Soft band of half width `half` around the segment p0-p1 (distance field, vectorised)."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * ax + (v - p0[1]) * ay) / (ax * ax + ay * ay), 0.0, 1.0)
    d = np.hypot(u - p0[0] - t * ax, v - p0[1] - t * ay)
    return np.clip(1.0 - d / half, 0.0, 1.0)


_RIB_TOP, _RIB_PERIOD, _RIB_RISE, _RIB_FALL = -0.84, 0.125, 0.32, 0.55
HEART = (0.10, 0.20, 0.27, 0.20)  # centre u, centre v, half width, half height (before habitus)


def rib_centre(rib: int, u: float) -> float:
    """Height of the centre line of posterior rib `rib` (1 = first) at lateral position `u`."""
    return _RIB_TOP + (rib - 1) * _RIB_PERIOD - _RIB_RISE * abs(u) + _RIB_FALL * u * u


def heart_region(u: np.ndarray, v: np.ndarray, width: float) -> np.ndarray:
    """Soft cardiac silhouette of a given width factor."""
    cu, cv, rx, ry = HEART
    return soft_ellipse(u, v, cu + 0.05 * (width - 1), cv + 0.03 * (width - 1), rx * width, ry * width**0.4, edge=0.12)


def _ribs(u: np.ndarray, v: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    au = np.abs(u)
    phase = (v - _RIB_TOP + _RIB_RISE * au - _RIB_FALL * u * u) / _RIB_PERIOD
    posterior = np.clip(np.cos(2 * np.pi * phase) - 0.45, 0.0, None) / 0.55
    extent = np.clip((half_width - 0.05 - au) / 0.06, 0.0, 1.0) * np.clip((0.55 - v) / 0.1, 0.0, 1.0)
    return posterior * extent * np.clip((au - 0.05) / 0.08, 0.0, 1.0)


def _lungs(u: np.ndarray, v: np.ndarray, g: Geometry) -> tuple[dict[str, Lung], dict[str, np.ndarray]]:
    """Lung fields: ellipses widening to the base, cut by the domed hemidiaphragms."""
    lungs, radii = {}, {}
    for side, sign in SIDES.items():
        base = 0.40 * g.inspiration + (0.05 if side == "left" else 0.0)  # right hemidiaphragm sits higher
        lung = Lung(cx=sign * 0.43, w=0.31, top=-0.74, base=base)
        cy, h = (lung.top + lung.base + 0.2) / 2, (lung.base + 0.2 - lung.top) / 2
        dv = (v - cy) / h
        du = (u - lung.cx) / (lung.w * (1.0 + 0.2 * dv))
        lateral = (u - lung.cx) * sign / lung.w
        dome = base - 0.13 * np.clip(1.0 - (lateral + 0.2) ** 2, 0.0, 1.0)
        radii[side] = np.maximum(np.sqrt(du * du + dv * dv), 1.0 + (v - dome) / h)
        lungs[side] = lung
    return lungs, radii


def _body(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(soft tissue density, half width of the trunk at each height): neck widening to shoulders."""
    half_width = 0.2 + 0.73 * np.sqrt(np.clip((v + 0.98) / 0.25, 0.0, 1.0))
    thick = np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))
    return 0.5 * thick, half_width


def render_frontal(size: int, g: Geometry, view: str) -> Frame:
    """Normal PA/AP anatomy. AP films magnify the heart, as the heart is far from the detector."""
    u, v = _patient_grid(size, g)
    lungs, radii = _lungs(u, v, g)
    heart = heart_region(u, v, g.heart * (1.08 if view == "AP" else 1.0))
    lung = np.clip((1.0 - np.minimum(radii["left"], radii["right"])) / 0.08, 0.0, 1.0) * (1.0 - heart)
    tex = marking_textures(size)[g.texture]
    tex = tex[:, ::-1] if g.flip_texture else tex
    hilum = np.exp(-(((np.abs(u) - 0.2) / 0.45) ** 2 + (v / 0.6) ** 2))  # vessels fade to the periphery
    markings = tex * lung * (0.25 + 0.75 * hilum)

    body, half_width = _body(u, v)
    mediastinum = np.clip((0.11 - np.abs(u - 0.02)) / 0.03, 0.0, 1.0) * np.clip((0.25 - v) / 0.1, 0.0, 1.0)
    knob = soft_ellipse(u, v, 0.10, -0.33, 0.07, 0.06)
    spine = np.clip((0.075 - np.abs(u)) / 0.02, 0.0, 1.0) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.11))
    trachea = np.clip((0.035 - np.abs(u)) / 0.015, 0.0, 1.0) * np.clip((-0.3 - v) / 0.1, 0.0, 1.0)
    clavicles = sum(segment_band(u, v, (s * 0.07, -0.68), (s * 0.62, -0.8), 0.03) for s in (-1.0, 1.0))
    abdomen = np.clip((v - 0.3) / 0.2, 0.0, 1.0) * (1.0 - lung)
    density = (
        body + 0.08 * abdomen * body - 0.36 * lung + 0.05 * markings + 0.22 * mediastinum * (1 - lung)
        + 0.06 * knob + 0.16 * heart + 0.14 * spine - 0.08 * trachea + 0.10 * _ribs(u, v, half_width)
        + 0.16 * clavicles
    )
    if g.female:
        for s in (-1.0, 1.0):
            density += 0.07 * soft_ellipse(u, v, s * 0.5, 0.45, 0.32, 0.22, edge=0.4) * (v > 0.3)
    return Frame(size, g, u, v, density.astype(np.float32), lung, markings, lungs, radii, view)


def render_lateral(size: int, g: Geometry) -> Frame:
    """Side view: u runs anterior (-) to posterior (+); both lungs overlap in one field."""
    u, v = _patient_grid(size, g)
    field = Lung(cx=0.05, w=0.42, top=-0.75, base=0.45 * g.inspiration)
    cy, h = (field.top + field.base) / 2, (field.base - field.top) / 2
    r = np.sqrt(((u - field.cx) / field.w) ** 2 + ((v - cy) / h) ** 2)
    lung = np.clip((1.0 - r) / 0.1, 0.0, 1.0)
    tex = marking_textures(size)[g.texture] * lung
    body = 0.55 * np.sqrt(np.clip(1.0 - (u / 0.85) ** 2, 0.0, 1.0))
    heart = soft_ellipse(u, v, -0.22, 0.2, 0.3 * g.heart, 0.25, edge=0.2)
    spine = np.clip((0.1 - np.abs(u - 0.62)) / 0.03, 0.0, 1.0) * (0.75 + 0.25 * np.cos(2 * np.pi * v / 0.12))
    sternum = segment_band(u, v, (-0.72, -0.55), (-0.66, 0.25), 0.03)
    arms = soft_ellipse(u, v, -0.35, -0.75, 0.3, 0.2, edge=0.5)
    trachea = segment_band(u, v, (-0.05, -1.0), (0.08, -0.15), 0.04)
    density = (
        body - 0.30 * lung + 0.06 * tex + 0.25 * heart * (1 - 0.5 * lung) + 0.22 * spine + 0.15 * sternum
        + 0.15 * arms - 0.08 * trachea
    )
    return Frame(size, g, u, v, density.astype(np.float32), lung, tex, {"left": field, "right": field},
                 {"left": r, "right": r}, "LATERAL")
