"""MIMIC-CXR-JPG 2.0.0 + reports: gzipped metadata / split / chexpert CSVs and the p1X/p<subject>/s<study> tree."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unimed.data.reports import clean_report, mimic_report_text
from unimed.phantom.study import Study
from unimed.phantom.writers.base import (
    LayoutWriter,
    ManifestEntry,
    Row,
    StudyResult,
    format_label,
    numeric_id,
    save_jpeg,
    stable_date,
    stable_hex,
    stable_int,
    stable_time,
    write_csv,
)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
PARALLEL_CSV = "parallel-reports/test.csv"
"""Relative to the world's root: the test studies' reports in every language, for cross-lingual
retrieval (the MIMIC and PadChest layouts each hold one language per study)."""
PARALLEL_COLUMNS = ("study_id", "en", "es")

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
    "InstitutionName",  # not in the real file (one hospital); the phantom names each study's site
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
# MIMIC's chexpert CSV orders the labels alphabetically, unlike CheXpert's own CSVs.
MIMIC_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
CHEXPERT_COLUMNS = ("subject_id", "study_id", *MIMIC_LABELS)

VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
ORIENTATION = {"PA": "Erect", "AP": "Recumbent", "LATERAL": "Erect"}
# Multiplying by a number coprime with 10**7 permutes 0..10**7-1, so distinct numbers get distinct ids.
_SCRAMBLE = 7_654_321


def mimic_number(first_digit: int, number: int, seed: int) -> int:
    """An 8-digit MIMIC-style id starting with `first_digit`; numbers that differ mod 10**7 get distinct ids."""
    offset = stable_int("mimic-offset", seed) % 10**7
    return first_digit * 10**7 + (number * _SCRAMBLE + offset) % 10**7


def dicom_id(seed: int, image_id: str) -> str:
    """A MIMIC-style dicom_id: five dash-separated groups of 8 hex digits."""
    digest = stable_hex(20, "mimic-dicom", seed, image_id)
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def parallel_row(study: Study, study_id: str) -> tuple[str, str, str]:
    """(study_id, English, Spanish) as the models read them: the MIMIC adapter's FINDINGS +
    IMPRESSION text, and the stemmed PadChest-style Spanish report the Spanish site would write."""
    return study_id, mimic_report_text(study.reports["en"]), clean_report(study.reports["es"])


class MimicWriter(LayoutWriter):
    """MIMIC-CXR-JPG: English reports, PA/AP/LATERAL views, official train/validate/test by patient;
    the English-speaking site's studies, then the control community's English ones."""

    folder = "mimic-cxr-jpg"
    dataset = "mimic-cxr"
    count_field = "mimic_studies"
    frontal_only = False
    language = "en"
    control = True
    splits = (("train", 0.8), ("validate", 0.1), ("test", 0.1))

    def write_study(self, study: Study, split: str) -> StudyResult:
        seed = self.cfg.seed
        subject = str(mimic_number(1, numeric_id(study.patient_id, "patient"), seed))
        study_no = str(mimic_number(5, study.index, seed))
        image = dicom_id(seed, study.image_id)
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        save_jpeg(self.dest / folder / f"s{study_no}" / f"{image}.jpg", study.image)
        (self.dest / folder / f"s{study_no}.txt").write_text(study.reports["en"], encoding="utf-8")
        rows: tuple[Row, ...] = (
            (METADATA_CSV, self._metadata(study, image, subject, study_no)),
            (SPLIT_CSV, (image, study_no, subject, split)),
            (CHEXPERT_CSV, (subject, study_no, *(format_label(study.chexpert[n]) for n in MIMIC_LABELS))),
        )
        if split == "test" and study.view != "LATERAL":
            rows += ((PARALLEL_CSV, parallel_row(study, study_no)),)
        entry = ManifestEntry(split, study.view != "LATERAL", study.site, study.language, dict(study.chexpert))
        return StudyResult(rows, entry)

    def _metadata(self, study: Study, image: str, subject: str, study_no: str) -> tuple[str, ...]:
        # MIMIC shifts dates into the 22nd century for de-identification.
        date = stable_date(2110, 90, self.cfg.seed, self.dataset, study.study_id)
        time = stable_time(self.cfg.seed, self.dataset, study.study_id) + ".000"
        height, width = study.image.shape
        procedure = "CHEST (PA AND LAT)" if study.view != "AP" else "CHEST (PORTABLE AP)"
        return (
            image,
            subject,
            study_no,
            procedure,
            study.view,
            str(height),
            str(width),
            date,
            time,
            procedure,
            VIEW_MEANING[study.view],
            ORIENTATION[study.view],
            study.site,
        )

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / METADATA_CSV, METADATA_COLUMNS, self.table_rows(rows, METADATA_CSV))
        write_csv(self.dest / SPLIT_CSV, SPLIT_COLUMNS, self.table_rows(rows, SPLIT_CSV))
        write_csv(self.dest / CHEXPERT_CSV, CHEXPERT_COLUMNS, self.table_rows(rows, CHEXPERT_CSV))
