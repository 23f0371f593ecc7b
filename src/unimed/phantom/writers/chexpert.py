"""CheXpert-v1.0-small (train.csv / valid.csv) and the CXP500 expert-labelled zero-shot test set."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unimed.data.labels import CHEXPERT_LABELS
from unimed.phantom.catalogue import CHEXPERT_OF, NOT_PATHOLOGY
from unimed.phantom.study import Study
from unimed.phantom.writers.base import (
    LayoutWriter,
    ManifestEntry,
    Row,
    StudyResult,
    format_label,
    numeric_id,
    save_jpeg,
    write_csv,
)

ROOT = "CheXpert-v1.0-small"
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
CXP500_CSV = "test_labels.csv"
CXP500_COLUMNS = ("Path", *CHEXPERT_LABELS)
SEX = {"M": "Male", "F": "Female"}


def expert_labels(study: Study) -> dict[str, float]:
    """0/1 labels as an expert panel reads the image: from every latent finding, mentioned or not."""
    present = {finding.name for finding in study.findings}
    labels = dict.fromkeys(CHEXPERT_LABELS, 0.0)
    for name in present:
        labels.update(dict.fromkeys(CHEXPERT_OF[name], 1.0))
    labels["No Finding"] = float(not present - NOT_PATHOLOGY)
    return labels


def image_path(split: str, study: Study) -> Path:
    """`<split>/patient<NNNNN>/study<K>/view1_<frontal|lateral>.jpg`; K is the study index + 1, unique."""
    patient = numeric_id(study.patient_id, "patient") % 10**7 + 1
    view = "lateral" if study.view == "LATERAL" else "frontal"
    return Path(split) / f"patient{patient:05d}" / f"study{study.index + 1}" / f"view1_{view}.jpg"


class ChexpertWriter(LayoutWriter):
    """CheXpert-small: report-extracted labels in train.csv, radiologist-style 0/1 labels in valid.csv."""

    folder = "chexpert"
    dataset = "chexpert"
    count_field = "chexpert_studies"
    frontal_only = False
    splits = (("train", 0.85), ("valid", 0.15))

    def write_study(self, study: Study, split: str) -> StudyResult:
        relative = Path(ROOT) / image_path(split, study)
        save_jpeg(self.dest / relative, study.image)
        labels = expert_labels(study) if split == "valid" else dict(study.chexpert)
        lateral = study.view == "LATERAL"
        row = (
            relative.as_posix(),
            SEX.get(study.sex, study.sex),
            str(study.age),
            "Lateral" if lateral else "Frontal",
            "" if lateral else study.view,
            *(format_label(labels[name]) for name in CHEXPERT_LABELS),
        )
        entry = ManifestEntry(split, not lateral, study.site, study.language, labels)
        return StudyResult(((split, row),), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        for split, _ in self.splits:
            write_csv(self.dest / ROOT / f"{split}.csv", COLUMNS, self.table_rows(rows, split))


class Cxp500Writer(LayoutWriter):
    """CXP500: frontal test studies with 0/1 expert labels in `test_labels.csv`."""

    folder = "cxp500"
    dataset = "cxp500"
    count_field = "cxp500_studies"

    def split(self, study: Study) -> str:
        """Every CXP500 study is a test study."""
        return "test"

    def write_study(self, study: Study, split: str) -> StudyResult:
        relative = image_path("test", study)
        save_jpeg(self.dest / relative, study.image)
        labels = expert_labels(study)
        row = (relative.as_posix(), *(str(int(labels[name])) for name in CHEXPERT_LABELS))
        entry = ManifestEntry(split, True, study.site, study.language, labels)
        return StudyResult(((CXP500_CSV, row),), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / CXP500_CSV, CXP500_COLUMNS, self.table_rows(rows, CXP500_CSV))
