"""Reproducible 8-bit MONOCHROME2 DICOM files for the Kaggle-style layouts (RSNA, SIIM)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage, generate_uid

from unimed.phantom.writers.base import stable_date, stable_time


@dataclasses.dataclass(frozen=True)
class DicomIds:
    """The identifiers of one DICOM instance; UIDs derived from the seed and study ids, never from time."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    date: str
    time: str


def dicom_ids(seed: int, dataset: str, patient_id: str, study_id: str, image_id: str) -> DicomIds:
    """Seeded UIDs (pydicom's `generate_uid` hashes its entropy sources) and a plausible date/time."""
    return DicomIds(
        patient_id=patient_id,
        study_uid=generate_uid(entropy_srcs=["study", str(seed), dataset, study_id]),
        series_uid=generate_uid(entropy_srcs=["series", str(seed), dataset, study_id]),
        sop_uid=generate_uid(entropy_srcs=["instance", str(seed), dataset, image_id]),
        date=stable_date(2000, 20, seed, dataset, study_id),
        time=stable_time(seed, dataset, study_id),
    )


def write_dicom(path: Path, pixels: np.ndarray, ids: DicomIds, *, view: str, sex: str, age: int) -> None:
    """Write a uint8 (H, W) image as a MONOCHROME2 Secondary Capture chest radiograph."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"write_dicom expects a uint8 (H, W) array, got {pixels.dtype} {pixels.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = ids.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ids.sop_uid
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.PatientID = ids.patient_id
    ds.PatientName = ids.patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyDate = ds.SeriesDate = ids.date
    ds.StudyTime = ds.SeriesTime = ids.time
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
