"""Canonical records: what every dataset adapter returns, whatever the layout on disk."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BoxAnn:
    """A box in pixel coordinates of the record's image: (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One image (and its report, when the dataset has one) in canonical form.

    `labels` maps a label name to 1.0 / 0.0 / -1.0 (uncertain) / NaN (not mentioned).
    `target` is the class name of single-label datasets (COVIDx).
    `mask_rle` is a Kaggle-style relative RLE of a segmentation mask (SIIM), with `image_size` (H, W).
    `image_path` is None only for a row of a text-only corpus (read by the text stages alone).
    """

    dataset: str
    image_path: Path | None
    patient_id: str
    study_id: str
    split: str
    report: str | None = None
    language: str | None = None
    site: str | None = None
    view: str | None = None
    labels: dict[str, float] = dataclasses.field(default_factory=dict)
    target: str | None = None
    boxes: tuple[BoxAnn, ...] = ()
    mask_rle: str | None = None
    image_size: tuple[int, int] | None = None

    def label(self, name: str) -> float:
        """The label value, NaN when the dataset does not state it."""
        return self.labels.get(name, math.nan)
