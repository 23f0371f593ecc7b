"""RSNA Pneumonia Detection (stage 2): box labels, detailed class info and one DICOM per patientId."""

from __future__ import annotations

import uuid
from typing import Sequence

from unimed.phantom.study import Study
from unimed.phantom.writers.base import LayoutWriter, ManifestEntry, Row, StudyResult, to_uint8, write_csv
from unimed.phantom.writers.dicom import dicom_ids, write_dicom

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
LABELS_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
IMAGES = "stage_2_train_images"
# A fixed namespace makes uuid5 ids a pure function of the seed and the study.
NAMESPACE = uuid.UUID("5b1c0f7e-2d5e-4c39-9a77-0c2b7e0b6a11")


class RsnaWriter(LayoutWriter):
    """RSNA: frontal images from the English-speaking site, enriched for pneumonia; no official split."""

    folder = "rsna"
    dataset = "rsna"
    count_field = "rsna_studies"
    enrich = {"pneumonia": 0.3}

    def write_study(self, study: Study, split: str) -> StudyResult:
        # In RSNA every image has its own patientId, which is also the DICOM PatientID.
        patient = str(uuid.uuid5(NAMESPACE, f"{self.cfg.seed}/{self.dataset}/{study.image_id}"))
        ids = dicom_ids(self.cfg.seed, self.dataset, patient, study.study_id, study.image_id)
        write_dicom(
            self.dest / IMAGES / f"{patient}.dcm", to_uint8(study.image), ids,
            view=study.view, sex=study.sex, age=study.age,
        )
        boxes = [b for b in study.boxes if b.label == "pneumonia"]
        rows: list[Row] = [
            (LABELS_CSV, (patient, f"{b.x0:.1f}", f"{b.y0:.1f}", f"{b.x1 - b.x0:.1f}", f"{b.y1 - b.y0:.1f}", "1"))
            for b in boxes
        ]
        if not boxes:
            rows.append((LABELS_CSV, (patient, "", "", "", "", "0")))
        # The real class file repeats the class once per labels row.
        rows += [(CLASS_CSV, (patient, self.detailed_class(study, bool(boxes))))] * len(rows)
        labels = {"pneumonia": float(bool(boxes))}
        entry = ManifestEntry(split, True, study.site, study.language, labels, boxes=len(boxes))
        return StudyResult(tuple(rows), entry)

    @staticmethod
    def detailed_class(study: Study, opacity: bool) -> str:
        """RSNA's three detailed classes."""
        if opacity:
            return "Lung Opacity"
        return "Normal" if study.chexpert.get("No Finding") == 1.0 else "No Lung Opacity / Not Normal"

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / LABELS_CSV, LABELS_COLUMNS, self.table_rows(rows, LABELS_CSV))
        write_csv(self.dest / CLASS_CSV, CLASS_COLUMNS, self.table_rows(rows, CLASS_CSV))
