"""The latent findings the phantom world knows, and how each maps onto the datasets' label sets.

The maps are language-independent medical facts (a pneumonia is a consolidation and a lung opacity),
so they live here; how a finding is *said* lives in the language packs (`lang/*.yaml`).
"""

from __future__ import annotations

FINDING_NAMES: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "pneumonia",
    "consolidation",
    "atelectasis",
    "edema",
    "nodule",
    "mass",
    "hilar_enlargement",
    "vascular_redistribution",
    "heart_insufficiency",
    "covid",
    "pleural_thickening",
    "fracture",
    "support_devices",
    "foreign_object",
)

# CheXpert labels a finding sets when the English report mentions it.
CHEXPERT_OF: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "pleural_effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "pneumonia": ("Pneumonia", "Consolidation", "Lung Opacity"),
    "consolidation": ("Consolidation", "Lung Opacity"),
    "atelectasis": ("Atelectasis", "Lung Opacity"),
    "edema": ("Edema", "Lung Opacity"),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "hilar_enlargement": ("Enlarged Cardiomediastinum",),
    "vascular_redistribution": (),
    "heart_insufficiency": (),
    "covid": ("Pneumonia", "Lung Opacity"),
    "pleural_thickening": ("Pleural Other",),
    "fracture": ("Fracture",),
    "support_devices": ("Support Devices",),
    "foreign_object": (),
}

# PDC classes (ground truth, not report-derived) and the findings that make each positive.
PDC_OF: dict[str, tuple[str, ...]] = {
    "atelectasis": ("atelectasis",),
    "cardiomegaly": ("cardiomegaly",),
    "consolidation": ("consolidation", "pneumonia"),
    "edema": ("edema",),
    "pleural effusion": ("pleural_effusion",),
    "hilar enlargement": ("hilar_enlargement",),
    "pneumothorax": ("pneumothorax",),
    "pneumonia": ("pneumonia",),
    "vascular redistribution": ("vascular_redistribution",),
    "heart insufficiency": ("heart_insufficiency",),
}

# PadChest `Labels` names (English, as in the real CSV).
PADCHEST_NAME: dict[str, str] = {
    "cardiomegaly": "cardiomegaly",
    "pleural_effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "pneumonia": "pneumonia",
    "consolidation": "consolidation",
    "atelectasis": "atelectasis",
    "edema": "pulmonary edema",
    "nodule": "nodule",
    "mass": "pulmonary mass",
    "hilar_enlargement": "hilar enlargement",
    "vascular_redistribution": "vascular redistribution",
    "heart_insufficiency": "heart insufficiency",
    "covid": "COVID 19",
    "pleural_thickening": "pleural thickening",
    "fracture": "rib fracture",
    "support_devices": "electrical device",
    "foreign_object": "foreign body",
}

# Findings that a report may state as absent ("no pleural effusion"); packs must phrase these.
NEGATABLE: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "edema",
    "fracture",
)

# Findings that do not make a study abnormal (CheXpert's "No Finding" ignores support devices).
NOT_PATHOLOGY: frozenset[str] = frozenset({"support_devices", "foreign_object"})

# Findings that heart insufficiency always brings along.
HEART_INSUFFICIENCY_PARTS: tuple[str, ...] = ("cardiomegaly", "edema", "vascular_redistribution")

# Mutually exclusive infection patterns, drawn as one categorical so enrich gives exact marginals.
INFECTIONS: tuple[str, ...] = ("covid", "pneumonia")

LOBES: dict[str, tuple[str, str]] = {
    "right upper lobe": ("right", "upper"),
    "right middle lobe": ("right", "middle"),
    "right lower lobe": ("right", "lower"),
    "left upper lobe": ("left", "upper"),
    "lingula": ("left", "middle"),
    "left lower lobe": ("left", "lower"),
}

DEVICES: tuple[str, ...] = ("endotracheal_tube", "central_line", "nasogastric_tube", "pacemaker")
FOREIGN_OBJECTS: tuple[str, ...] = ("button", "ring", "clip", "zipper")
