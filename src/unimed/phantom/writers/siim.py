"""SIIM-ACR Pneumothorax: `train-rle.csv` (with the real header's " EncodedPixels") and nested DICOMs."""

from __future__ import annotations

import uuid
from typing import Sequence

import numpy as np
from scipy import ndimage

from unimed.data.rle import EMPTY, rle_encode
from unimed.phantom.study import Study
from unimed.phantom.writers.base import LayoutWriter, ManifestEntry, Row, StudyResult, to_uint8, write_csv
from unimed.phantom.writers.dicom import dicom_ids, write_dicom

RLE_CSV = "train-rle.csv"
# The leading space is in the real Kaggle header; readers must cope with it.
RLE_COLUMNS = ("ImageId", " EncodedPixels")
IMAGES = "dicom-images-train"
NAMESPACE = uuid.UUID("9e0f3c52-6a41-4f0e-8d1b-3f6c2a7d5e90")


def component_rles(mask: np.ndarray | None) -> list[str]:
    """One RLE per connected component of the mask (the real file has a row per component); ["-1"] if empty."""
    if mask is None or not mask.any():
        return [EMPTY]
    components, count = ndimage.label(mask)
    return [rle_encode(components == k) for k in range(1, count + 1)]


class SiimWriter(LayoutWriter):
    """SIIM: frontal images from the English-speaking site, enriched for pneumothorax; no official split."""

    folder = "siim"
    dataset = "siim"
    count_field = "siim_studies"
    enrich = {"pneumothorax": 0.3}

    def write_study(self, study: Study, split: str) -> StudyResult:
        patient = str(uuid.uuid5(NAMESPACE, f"{self.cfg.seed}/{self.dataset}/{study.patient_id}"))
        ids = dicom_ids(self.cfg.seed, self.dataset, patient, study.study_id, study.image_id)
        path = self.dest / IMAGES / ids.study_uid / ids.series_uid / f"{ids.sop_uid}.dcm"
        write_dicom(path, to_uint8(study.image), ids, view=study.view, sex=study.sex, age=study.age)
        rles = component_rles(study.pneumothorax_mask)
        labels = {"pneumothorax": float(rles != [EMPTY])}
        entry = ManifestEntry(split, True, study.site, study.language, labels)
        return StudyResult(tuple((RLE_CSV, (ids.sop_uid, rle)) for rle in rles), entry)

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / RLE_CSV, RLE_COLUMNS, self.table_rows(rows, RLE_CSV))
