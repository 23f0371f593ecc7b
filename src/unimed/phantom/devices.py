"""Metal and plastic: support devices (tubes, lines, pacemakers) and external foreign objects.

Thin curves and polygons are rasterised with Pillow's ImageDraw (on a float image) rather than with
distance fields, which would cost a full-image pass per segment.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from unimed.phantom.anatomy import Frame
from unimed.phantom.study import Box

# Device paths in patient coordinates (u to the patient's left, v down), before jitter.
_PATHS: dict[str, list[tuple[float, float]]] = {
    "endotracheal_tube": [(0.0, -1.1), (0.0, -0.75), (0.01, -0.42)],
    "central_line": [(-0.62, -0.78), (-0.3, -0.68), (-0.1, -0.55), (-0.07, -0.2)],
    "nasogastric_tube": [(0.02, -1.1), (0.0, -0.4), (0.02, 0.35), (0.2, 0.62)],
    "pacemaker": [(0.48, -0.6), (0.3, -0.5), (0.05, -0.2), (-0.02, 0.15), (0.06, 0.32)],
}
_LINE_VALUE = {"endotracheal_tube": 0.22, "central_line": 0.28, "nasogastric_tube": 0.22, "pacemaker": 0.45}


def _new_layer(frame: Frame) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("F", (frame.size, frame.size), 0.0)
    return layer, ImageDraw.Draw(layer)


def draw_devices(frame: Frame, device: str, rng: np.random.Generator) -> None:
    """Add one support device to the frame's density."""
    layer, draw = _new_layer(frame)
    width = max(1, round(frame.size / 110))
    points = [frame.to_pixel(u + rng.uniform(-0.02, 0.02), v + rng.uniform(-0.02, 0.02)) for u, v in _PATHS[device]]
    draw.line(points, fill=_LINE_VALUE[device], width=width + (1 if device == "endotracheal_tube" else 0), joint="curve")
    if device == "pacemaker":
        x, y = points[0]
        half = 0.07 * frame.pixels_per_unit()
        draw.rounded_rectangle([x - half, y - 0.7 * half, x + half, y + 0.7 * half], radius=half / 3, fill=0.7)
    frame.density += np.asarray(layer)


def _object_shape(frame: Frame, kind: str, rng: np.random.Generator) -> tuple[int, list[tuple[float, float]], float]:
    """(Object-CXR shape code, outline points in pixels, radius in pixels) of one object."""
    cx, cy = frame.to_pixel(rng.uniform(-0.75, 0.75), rng.uniform(-0.8, 0.45))
    r = rng.uniform(0.025, 0.05) * frame.pixels_per_unit() * (1.6 if kind == "zipper" else 1.0)
    if kind == "clip":
        angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
        radii = r * rng.uniform(0.5, 1.2, 5)
        return 2, [(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles)], r
    aspect = rng.uniform(0.3, 0.6) if kind == "zipper" else rng.uniform(0.7, 1.0)
    return (0 if kind == "zipper" else 1), [(cx - r, cy - r * aspect), (cx + r, cy + r * aspect)], r


def draw_foreign_objects(frame: Frame, kind: str, count: int, rng: np.random.Generator) -> list[Box]:
    """Add `count` objects of one kind; returns their boxes (label "foreign_object")."""
    layer, draw = _new_layer(frame)
    boxes = []
    limit = float(frame.size)
    for _ in range(count):
        shape, pts, r = _object_shape(frame, kind, rng)
        if shape == 2:
            draw.polygon(pts, fill=0.8)
        elif shape == 0:
            draw.rectangle(pts, fill=0.7)
        else:
            draw.ellipse(pts, fill=None if kind == "ring" else 0.75, outline=0.85, width=max(1, round(r / 3)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        x1, y1 = min(limit, max(xs) + 1), min(limit, max(ys) + 1)
        if x1 > x0 and y1 > y0:
            polygon = tuple((float(x), float(y)) for x, y in pts) if shape == 2 else ()
            boxes.append(Box(float(x0), float(y0), float(x1), float(y1), "foreign_object", shape, polygon))
    frame.density += np.asarray(layer)
    return boxes
