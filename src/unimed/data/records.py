"""Canonical records: what every dataset adapter returns, whatever the layout on disk."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path


def language_code(value: str) -> str:
    """A report language as records and prompts name it: its code in lower case, without a region
    ("EN", "en-US" and "en_GB" are "en")."""
    return re.split(r"[-_]", str(value).strip().lower(), maxsplit=1)[0]


@dataclasses.dataclass(frozen=True)
class BoxAnn:
    """A box in pixel coordinates of the record's image: (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str


@dataclasses.dataclass(frozen=True)
class PointAnn:
    """A point finding of a volume (a LUNA16 nodule): centre in RAS world millimetres, diameter in mm."""

    x: float
    y: float
    z: float
    diameter_mm: float
    label: str


@dataclasses.dataclass(frozen=True)
class Crop:
    """The cube of a volume that a record stands for (a LUNA16 candidate): its centre in RAS world
    millimetres and its side in mm."""

    x: float
    y: float
    z: float
    size_mm: float

    def tag(self) -> str:
        """What tells this crop from the volume's others in a split-file key: ``@x,y,z`` (mm)."""
        return f"@{self.x:.2f},{self.y:.2f},{self.z:.2f}"


@dataclasses.dataclass(frozen=True)
class Record:
    """One image (and its report, when the dataset has one) in canonical form.

    `labels` maps a label name to 1.0 / 0.0 / -1.0 (uncertain) / NaN (not mentioned).
    `target` is the class name of single-label datasets (COVIDx).
    `mask_rle` is a Kaggle-style relative RLE of a segmentation mask (SIIM), with `image_size` (H, W).
    `image_path` is None only for a row of a text-only corpus (read by the text stages alone).
    `ndim` is 2 for images, 3 for volumes (`image_path` is then a NIfTI, a `.mhd` header or a folder
    of slice images; read it with `unimed.data.volumes.read_volume`); `mask_path` is a volume's label
    map (BCV) and `points` its point findings (LUNA16 nodules). A record with a `crop` stands for
    that cube of its volume only (a LUNA16 candidate), read with `unimed.data.volumes.crop_cube`.
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
    ndim: int = 2
    mask_path: Path | None = None
    points: tuple[PointAnn, ...] = ()
    crop: Crop | None = None

    def image_key(self, root: str | Path) -> str:
        """The record's id in split files: its image path relative to `root` (POSIX; absolute when
        outside it), followed by its crop's tag when it stands for a crop of its volume."""
        path = Path(self.image_path)
        key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        return key + self.crop.tag() if self.crop else key

    def label(self, name: str) -> float:
        """The label value, NaN when the dataset does not state it."""
        return self.labels.get(name, math.nan)
