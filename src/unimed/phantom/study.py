"""The latent truth of one phantom study, from which its image, labels and reports are all rendered."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates of the study's image; `shape` is 0 rect, 1 ellipse, 2 polygon."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    shape: int = 0
    polygon: tuple[tuple[float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Finding:
    """One latent finding with its attributes (side, size, location, severity) and how reports treat it."""

    name: str
    attrs: dict[str, str]
    hedged: bool = False
    mentioned: bool = True


@dataclasses.dataclass
class Study:
    """Everything generated for one study; all fields derive from the same latent findings.

    `pneumothorax_mask` is a (H, W) bool mask on frontal views with a pneumothorax, else None;
    `boxes` (pneumonia opacities, foreign objects) are given on frontal views only.
    """

    index: int
    patient_id: str
    study_id: str
    image_id: str
    site: str
    language: str
    view: str
    sex: str
    age: int
    findings: list[Finding]
    image: np.ndarray
    pneumothorax_mask: np.ndarray | None
    boxes: list[Box]
    reports: dict[str, str]
    chexpert: dict[str, float]
    pdc: dict[str, int]
    covid_class: str
    padchest_labels: list[str] = dataclasses.field(default_factory=list)
    negated: tuple[str, ...] = ()  # absent findings the reports state as absent
