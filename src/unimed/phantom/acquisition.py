"""The acquisition chain of a site: density -> exposure curve -> noise -> collimation -> side marker."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unimed.phantom.sites import Acquisition


@functools.lru_cache(maxsize=32)
def marker_bitmap(letter: str, height: int) -> np.ndarray:
    """(h, w) float32 in [0, 1]: a side-marker letter rendered with Pillow's built-in font."""
    font = ImageFont.load_default(size=height)
    left, top, right, bottom = font.getbbox(letter)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), letter, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _collimate(image: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> None:
    size = image.shape[0]
    lo, hi = acq.border_fraction
    top, bottom, left, right = (int(round(f * size)) for f in rng.uniform(lo, hi, 4))
    value = np.float32(acq.border_value)
    image[:top] = value
    image[size - bottom:] = value
    image[:, :left] = value
    image[:, size - right:] = value


def _stamp(image: np.ndarray, acq: Acquisition, view: str) -> None:
    """The patient's-left marker: top right on frontal films (patient faces the viewer), top left on laterals."""
    size = image.shape[0]
    bitmap = marker_bitmap(acq.markers["left"], max(8, size // 14))
    h, w = bitmap.shape
    y = size // 9
    x = size // 9 if view == "LATERAL" else size - size // 9 - w
    patch = image[y:y + h, x:x + w]
    np.maximum(patch, 0.95 * bitmap[: patch.shape[0], : patch.shape[1]], out=patch)


def expose(density: np.ndarray, acq: Acquisition, rng: np.random.Generator, noise_scale: float, view: str) -> np.ndarray:
    """Film-like image in [0, 1] (bright = dense) from a density map; (S, S) float32."""
    image = 1.0 - np.exp(np.float32(-2.4 * acq.gain) * np.clip(density, 0.0, None))
    image = image ** np.float32(acq.gamma)
    image += np.float32(acq.noise * noise_scale) * rng.standard_normal(image.shape, dtype=np.float32)
    _collimate(image, acq, rng)
    _stamp(image, acq, view)
    return np.clip(image, 0.0, 1.0, out=image)
