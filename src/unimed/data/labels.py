"""The label vocabularies of the public datasets, as their tables spell them.

They belong to the data layer: the adapters read them, the evaluation scores them, and the phantom
generator renders studies with them (the phantom imports them from here, never the reverse).
"""

from __future__ import annotations

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""The 14 labels of the CheXpert labeler (CheXpert, MIMIC-CXR-JPG, CXP500)."""

PDC_LABELS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "pleural effusion",
    "hilar enlargement",
    "pneumothorax",
    "pneumonia",
    "vascular redistribution",
    "heart insufficiency",
)
"""The ten physician-labelled PadChest classes of the zero-shot set (PDC)."""

COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
"""The three classes of COVIDx CXR."""

CCII_CLASSES: tuple[str, ...] = ("NCP", "CP", "Normal")
"""The three classes of CC-CCII: novel coronavirus pneumonia, common pneumonia, normal."""
