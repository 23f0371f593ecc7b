"""Findings drawn onto a frontal frame: each renderer changes density inside its own region.

Renderers are registered by finding name; `render_findings` runs those of the present findings in
catalogue order. `contrast` (down) and `scale` (down) come from the difficulty knob.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
from scipy import ndimage

from unimed.phantom.anatomy import SIDES, Frame, Lung, heart_region, rib_centre, segment_band, soft_ellipse
from unimed.phantom.catalogue import LOBES
from unimed.phantom.devices import draw_devices, draw_foreign_objects
from unimed.phantom.study import Box
from unimed.registry import Registry

_SIZE = {"small": 0.0, "moderate": 1.0, "large": 2.0}
_SEVERITY = {"mild": 0.0, "moderate": 1.0, "severe": 2.0}
_ZONE_HEIGHT = {"upper": 0.22, "middle": 0.5, "lower": 0.75}


@dataclasses.dataclass
class Canvas:
    """A frame being drawn on, plus the annotations drawing produces."""

    frame: Frame
    rng: np.random.Generator
    contrast: float
    scale: float
    boxes: list[Box] = dataclasses.field(default_factory=list)
    pneumothorax: np.ndarray | None = None

    def add(self, amount: float, region: np.ndarray) -> None:
        self.frame.density += np.float32(amount * self.contrast) * region


Renderer = Callable[[Canvas, dict[str, str]], None]
RENDERERS: Registry[Renderer] = Registry("phantom finding renderer")


@functools.lru_cache(maxsize=8)
def blob_textures(size: int) -> np.ndarray:
    """(K, S, S) smooth noise in [0, 1] that makes opacities irregular; fixed per size."""
    rng = np.random.default_rng(777 + size)
    noise = ndimage.gaussian_filter(rng.standard_normal((4, size, size)).astype(np.float32), (0, size / 40, size / 40))
    lo, hi = noise.min(axis=(1, 2), keepdims=True), noise.max(axis=(1, 2), keepdims=True)
    return (noise - lo) / (hi - lo)


def _sides(side: str) -> list[str]:
    return ["left", "right"] if side == "bilateral" else [side]


def _irregular(c: Canvas, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An irregular opacity in [0, 1] centred at (cx, cy), confined to the lungs."""
    f = c.frame
    tex = blob_textures(f.size)[int(c.rng.integers(4))]
    core = soft_ellipse(f.u, f.v, cx, cy, rx, ry, edge=0.6)
    return np.clip(core * (0.55 + tex) - 0.25, 0.0, 1.0) * f.lung


def _box(c: Canvas, region: np.ndarray, label: str, threshold: float = 0.2) -> None:
    ys, xs = np.nonzero(region > threshold)
    if len(xs):
        c.boxes.append(Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), label))


@RENDERERS.register("cardiomegaly")
def _cardiomegaly(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    width = f.geometry.heart * (1.08 if f.view == "AP" else 1.0)
    grow = 1.0 + (0.13 + 0.08 * _SEVERITY[attrs["severity"]]) * c.scale
    extra = np.clip(heart_region(f.u, f.v, width * grow) - heart_region(f.u, f.v, width), 0.0, 1.0)
    f.density += np.float32(0.52) * extra * f.lung  # heart replaces aerated lung


@RENDERERS.register("pleural_effusion")
def _effusion(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    frac = (0.14 + 0.14 * _SIZE[attrs["size"]]) * c.scale
    for side in _sides(attrs["side"]):
        lung, sign = f.lungs[side], SIDES[side]
        lateral = np.clip((f.u - lung.cx) * sign / lung.w + 0.3, 0.0, None)
        level = lung.base - frac * (lung.base - lung.top) - 0.06 * lateral**2  # meniscus rises laterally
        fluid = np.clip((f.v - level) / 0.05, 0.0, 1.0) * np.clip((1.12 - f.lung_r[side]) / 0.1, 0.0, 1.0)
        c.add(0.09, fluid)


@RENDERERS.register("pneumothorax")
def _pneumothorax(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    side = attrs["side"]
    lung, r = f.lungs[side], f.lung_r[side]
    edge = 1.0 - (0.14 + 0.12 * _SIZE[attrs["size"]]) * c.scale  # collapsed lung edge, as elliptic radius
    lateral = (f.u - lung.cx) * SIDES[side] / lung.w
    region = ((lateral > -0.25) | (f.v < lung.top + 0.3 * (lung.base - lung.top))) & (f.v < lung.base - 0.12)
    mask = (r > edge) & (r < 1.0) & region
    c.add(-0.04, mask)
    f.density -= np.float32(0.08) * f.markings * mask  # no lung markings beyond the pleural line
    c.add(0.05, np.clip(1.0 - np.abs(r - edge) / 0.015, 0.0, 1.0) * region)
    c.pneumothorax = mask if c.pneumothorax is None else c.pneumothorax | mask


def _lobe_opacity(c: Canvas, attrs: dict[str, str], amount: float) -> np.ndarray:
    side, zone = LOBES[attrs["lobe"]]
    lung = c.frame.lungs[side]
    height = {"upper": 0.25, "middle": 0.55, "lower": 0.8}[zone] + c.rng.uniform(-0.08, 0.08)
    cx, cy = lung.point(SIDES[side], c.rng.uniform(0.35, 0.75), height)
    radius = c.rng.uniform(0.10, 0.16) * c.scale
    opacity = _irregular(c, cx, cy, radius, radius * c.rng.uniform(0.8, 1.3))
    c.add(amount, opacity)
    return opacity


@RENDERERS.register("pneumonia")
def _pneumonia(c: Canvas, attrs: dict[str, str]) -> None:
    _box(c, _lobe_opacity(c, attrs, 0.20), "pneumonia")


@RENDERERS.register("consolidation")
def _consolidation(c: Canvas, attrs: dict[str, str]) -> None:
    _lobe_opacity(c, attrs, 0.20)


@RENDERERS.register("atelectasis")
def _atelectasis(c: Canvas, attrs: dict[str, str]) -> None:
    f, side = c.frame, attrs["side"]
    lung, sign = f.lungs[side], SIDES[side]
    height = 0.62 if attrs["zone"] == "middle" else 0.82
    p0 = lung.point(sign, 0.15, height + c.rng.uniform(-0.05, 0.05))
    p1 = lung.point(sign, 0.85, height + c.rng.uniform(-0.08, 0.02))
    c.add(0.22, segment_band(f.u, f.v, p0, p1, 0.035 * c.scale) * f.lung)


@RENDERERS.register("edema")
def _edema(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    amp = 0.6 + 0.3 * _SEVERITY[attrs["severity"]]
    haze = np.exp(-(((np.abs(f.u) - 0.22) / 0.28) ** 2) - ((f.v - 0.0) / 0.38) ** 2) * f.lung
    c.add(0.035 * amp, haze)
    c.add(0.02 * amp, f.markings * haze)


@RENDERERS.register("vascular_redistribution")
def _redistribution(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    c.add(0.04, f.markings * np.clip((-0.1 - f.v) / 0.3, 0.0, 1.0))


@RENDERERS.register("hilar_enlargement")
def _hilar(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    for side in _sides(attrs["side"]):
        c.add(0.15, soft_ellipse(f.u, f.v, SIDES[side] * 0.2, -0.05, 0.085 * c.scale, 0.11 * c.scale, edge=0.6))


def _lesion(c: Canvas, attrs: dict[str, str], amount: float) -> None:
    f, side = c.frame, attrs["side"]
    lung = f.lungs[side]
    cx, cy = lung.point(SIDES[side], c.rng.uniform(0.25, 0.8), _ZONE_HEIGHT[attrs["zone"]] + c.rng.uniform(-0.08, 0.08))
    radius = float(attrs["size_mm"]) / 320.0 * 2.0 * c.scale  # the thorax is ~320 mm over 2 units
    c.add(amount, _irregular(c, cx, cy, radius, radius) if radius > 0.15 else soft_ellipse(f.u, f.v, cx, cy, radius, radius, 0.5))


@RENDERERS.register("nodule")
def _nodule(c: Canvas, attrs: dict[str, str]) -> None:
    _lesion(c, attrs, 0.22)


@RENDERERS.register("mass")
def _mass(c: Canvas, attrs: dict[str, str]) -> None:
    _lesion(c, attrs, 0.24)


@RENDERERS.register("covid")
def _covid(c: Canvas, attrs: dict[str, str]) -> None:
    f = c.frame
    tex = blob_textures(f.size)[int(c.rng.integers(4))]
    for side in SIDES:
        lung = f.lungs[side]
        peripheral = np.clip((f.lung_r[side] - 0.45) / 0.25, 0.0, 1.0) * np.clip((f.v - lung.top) / (lung.base - lung.top) * 1.5, 0.0, 1.0)
        c.add(0.09, peripheral * np.clip((tex - 0.5) / 0.15, 0.0, 1.0) * f.lung)


@RENDERERS.register("pleural_thickening")
def _thickening(c: Canvas, attrs: dict[str, str]) -> None:
    f, side = c.frame, attrs["side"]
    lung = f.lungs[side]
    cap = np.clip((f.lung_r[side] - 0.82) / 0.06, 0.0, 1.0) * (f.lung_r[side] < 1.05)
    c.add(0.07, cap * np.clip((lung.top + 0.3 * (lung.base - lung.top) - f.v) / 0.1, 0.0, 1.0))


@RENDERERS.register("fracture")
def _fracture(c: Canvas, attrs: dict[str, str]) -> None:
    f, sign = c.frame, SIDES[attrs["side"]]
    u0 = sign * c.rng.uniform(0.45, 0.72)
    v0 = rib_centre(int(attrs["rib"]), u0)
    c.add(0.40, soft_ellipse(f.u, f.v, u0, v0, 0.06 * c.scale, 0.045 * c.scale, edge=0.6))  # callus
    c.add(-0.12, segment_band(f.u, f.v, (u0 - 0.012, v0 - 0.035), (u0 + 0.012, v0 + 0.035), 0.01))


@RENDERERS.register("heart_insufficiency")
def _heart_insufficiency(c: Canvas, attrs: dict[str, str]) -> None:
    """Drawn through its parts (cardiomegaly, edema, redistribution), which sampling always adds."""


@RENDERERS.register("support_devices")
def _devices(c: Canvas, attrs: dict[str, str]) -> None:
    draw_devices(c.frame, attrs["device"], c.rng)


@RENDERERS.register("foreign_object")
def _foreign(c: Canvas, attrs: dict[str, str]) -> None:
    c.boxes.extend(draw_foreign_objects(c.frame, attrs["object"], int(attrs["count"]), c.rng))


def render_findings(c: Canvas, present: dict[str, dict[str, str]]) -> None:
    """Draw every present finding on a frontal frame."""
    for name, attrs in present.items():
        RENDERERS.get(name)(c, attrs)


def render_lateral_findings(c: Canvas, present: dict[str, dict[str, str]]) -> None:
    """The same findings as seen from the side: opacities project into the single lung field."""
    f = c.frame
    field: Lung = f.lungs["left"]
    blobs = {"pneumonia": 0.13, "consolidation": 0.13, "mass": 0.1, "nodule": 0.04, "atelectasis": 0.06}
    for name, attrs in present.items():
        if name in blobs:
            cx = c.rng.uniform(-0.3, 0.35)
            cy = field.top + c.rng.uniform(0.25, 0.85) * (field.base - field.top)
            c.add(0.2, _irregular(c, cx, cy, blobs[name] * c.scale, blobs[name] * c.scale))
        elif name == "pleural_effusion":
            c.add(0.22, np.clip((f.v - field.base + 0.2 * c.scale - 0.2 * np.clip(f.u, 0, None)) / 0.05, 0, 1) * f.lung)
        elif name == "cardiomegaly":
            c.add(0.25, soft_ellipse(f.u, f.v, -0.22, 0.2, 0.38, 0.3, edge=0.2) * (1 - soft_ellipse(f.u, f.v, -0.22, 0.2, 0.3, 0.25)))
        elif name in ("edema", "covid"):
            c.add(0.12, np.exp(-((f.u / 0.4) ** 2) - ((f.v / 0.4) ** 2)) * f.lung)
        elif name == "pneumothorax":
            c.add(-0.06, np.clip((field.top + 0.15 - f.v) / 0.1, 0, 1) * f.lung)
        elif name == "support_devices":
            draw_devices(f, attrs["device"], c.rng)
