"""Writers of the four 3D layouts: BIMCV-COVID19+, CC-CCII, LUNA16 and BCV (docs/LAYOUTS.md).

Each writer puts a generated :class:`CTStudy` on disk the way its real dataset stores volumes:
NIfTI in the site's voxel orientation and intensity storage (BIMCV, BCV), MetaImage `.mhd/.raw`
with LPS world coordinates (LUNA16), or windowed 8-bit slice images (CC-CCII). Besides the official
files every layout gets `phantom_findings.csv`, the phantom's ground truth of which slices each
finding occupies (keyed like the adapters' split files), which no real dataset has.
"""

from __future__ import annotations

import abc
import gzip
import re
from pathlib import Path, PurePosixPath
from typing import ClassVar, Mapping, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from unimed.data.volumes import SLICE_WINDOW
from unimed.phantom.catalogue import PADCHEST_NAME
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.anatomy import ORGANS
from unimed.phantom.ct.generator import STUDY_ID_BASE, CTStudy
from unimed.phantom.writers.base import ManifestEntry, Row, StudyResult, stable_int, write_csv

TRUTH_CSV = "phantom_findings.csv"
TRUTH_COLUMNS = ("key", "finding", "slices", "x_mm", "y_mm", "z_mm", "diameter_mm")
HU_INTERCEPT = -1024.0
"""Rescale intercept of the `rescaled` storage: stored = HU + 1024 (uint16), slope 1."""
LUNA_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
FALSE_CANDIDATES = 4
"""Non-nodule rows of `candidates.csv` per LUNA16-like volume."""
CANDIDATE_DIAMETER_MM = (8.0, 30.0)
CANDIDATE_MAX_HU = 400.0
"""What the phantom's candidate detector keeps: structures inside the lungs as large as a sphere of
a diameter in this range (the phantom's nodules are 8-25 mm, LUNA16's at most 30) whose brightest
voxel is below bone."""


def ras_to_lps_index(array_zyx: np.ndarray) -> np.ndarray:
    """A (z, y, x) array with axes towards S, A, R re-ordered so x runs towards L and y towards P."""
    return array_zyx[:, ::-1, ::-1]


def nifti_bytes(study: CTStudy, array_zyx: np.ndarray, *, intensity: bool) -> bytes:
    """A gzipped NIfTI-1 of `array_zyx` in the study site's orientation and (for intensities) storage,
    with gzip mtime 0 so the same study gives the same bytes."""
    acq = study.acquisition
    data = array_zyx.transpose(2, 1, 0)  # (x, y, z): NIfTI's voxel order
    affine = study.affine()
    if acq.orientation == "LPS":
        data = data[::-1, ::-1, :]
        affine = affine.copy()
        far = study.affine() @ np.array([data.shape[0] - 1, data.shape[1] - 1, 0, 1.0])
        affine[:3, :3] = np.diag([-study.spacing[0], -study.spacing[1], study.spacing[2]])
        affine[:3, 3] = far[:3]
    if intensity and acq.storage == "rescaled":
        stored = (data.astype(np.int32) - int(HU_INTERCEPT)).astype(np.uint16)
        image = nib.Nifti1Image(np.ascontiguousarray(stored), affine)
        image.header.set_slope_inter(1.0, HU_INTERCEPT)
    else:
        image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        image.header.set_slope_inter(np.nan, np.nan)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def truth_rows(key: str, study: CTStudy) -> tuple[Row, ...]:
    """One ground-truth row per lesion of the study."""
    rows = []
    for lesion in study.lesions:
        centre = [f"{v:.3f}" for v in lesion.centre_mm] if lesion.centre_mm else ["", "", ""]
        diameter = f"{lesion.diameter_mm:.1f}" if lesion.diameter_mm else ""
        rows.append((TRUTH_CSV, (key, lesion.name, " ".join(map(str, lesion.slices)), *centre, diameter)))
    return tuple(rows)


class CTLayoutWriter(abc.ABC):
    """Writes CT studies of one dataset under `dest`; the first half of the studies comes from the
    first of `sites`, the second half from the second, so every layout holds two acquisition chains."""

    folder: ClassVar[str]
    dataset: ClassVar[str]
    count_field: ClassVar[str]
    sites: ClassVar[tuple[str, str]]
    enrich: ClassVar[Mapping[str, float] | None] = None

    def __init__(self, cfg: PhantomConfig, dest: Path) -> None:
        self.cfg = cfg
        self.dest = Path(dest)

    def count(self) -> int:
        return int(getattr(self.cfg.ct, self.count_field))

    def site(self, index: int) -> str:
        return self.sites[0] if index < (self.count() + 1) // 2 else self.sites[1]

    @abc.abstractmethod
    def key(self, study: CTStudy) -> str:
        """The study's volume path under `dest` (POSIX), its key in ``phantom_findings.csv``."""

    @abc.abstractmethod
    def candidates(self, key: str) -> list[int]:
        """Indices of the studies that may be the one written under `key`, found without generating
        any: a study is generated again only to check that its :meth:`key` is `key`."""

    @abc.abstractmethod
    def write_study(self, study: CTStudy) -> StudyResult:
        """Write the study's files; return its table rows and manifest entry."""

    @abc.abstractmethod
    def write_tables(self, rows: Sequence[Row]) -> None:
        """Write the layout's index files from all rows, in study order."""

    def write_truth(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / TRUTH_CSV, TRUTH_COLUMNS, [cells for name, cells in rows if name == TRUTH_CSV])

    def entry(self, study: CTStudy, labels: Mapping[str, float]) -> ManifestEntry:
        return ManifestEntry("none", True, study.site, study.language, dict(labels))


def present_labels(study: CTStudy) -> list[str]:
    """PadChest-style English label names of the study's findings (the ground truth)."""
    return [PADCHEST_NAME[f.name] for f in study.findings]


class BimcvWriter(CTLayoutWriter):
    """BIMCV-COVID19+: BIDS sessions `sub-S<patient>/ses-E<session>/mod-ct/*_ct.nii.gz`,
    `participants.tsv`, and the Spanish reports with their labels in
    `derivatives/labels/labels_covid_posi.tsv` (PatientID, ReportID, Report, Labels)."""

    folder = "bimcv-covid19"
    dataset = "bimcv-covid19"
    count_field = "bimcv_studies"
    sites = ("valencia", "elche")

    def key(self, study: CTStudy) -> str:
        sub, ses = f"sub-S{study.patient_id}", f"ses-E{study.study_id}"
        return f"{sub}/{ses}/mod-ct/{sub}_{ses}_run-1_bp-chest_ct.nii.gz"

    def candidates(self, key: str) -> list[int]:
        found = re.search(r"/ses-E(\d+)/", key)
        return [int(found.group(1)) - STUDY_ID_BASE] if found else []

    def write_study(self, study: CTStudy) -> StudyResult:
        sub, ses = f"sub-S{study.patient_id}", f"ses-E{study.study_id}"
        rel = self.key(study)
        write_bytes(self.dest / rel, nifti_bytes(study, study.hu, intensity=True))
        labels = present_labels(study) or ["normal"]
        rows = (
            ("participants", (sub, "CT", str(study.age), study.sex)),
            ("labels", (sub, ses, study.reports["es"], str(labels))),
            *truth_rows(rel, study),
        )
        return StudyResult(rows, self.entry(study, {name: 1.0 for name in labels}))

    def write_tables(self, rows: Sequence[Row]) -> None:
        participants = sorted({cells for name, cells in rows if name == "participants"})
        self._tsv(self.dest / "participants.tsv", ("participant", "modality_dicom", "age", "gender"), participants)
        labels = [cells for name, cells in rows if name == "labels"]
        self._tsv(self.dest / "derivatives" / "labels" / "labels_covid_posi.tsv",
                  ("PatientID", "ReportID", "Report", "Labels"), labels)
        self.write_truth(rows)

    @staticmethod
    def _tsv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["\t".join(header)] + ["\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row)
                                       for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class CcciiWriter(CTLayoutWriter):
    """CC-CCII: `<class>/<patient_id>/<scan_id>/<nnnn>.png`, one 8-bit lung-windowed image per slice
    (0000 the most inferior; rows run anterior to posterior, columns patient right to left), and
    `unzip_filenames.csv` (zip_file, label, patient_id, scan_id, n_slice); classes balanced."""

    folder = "cc-ccii"
    dataset = "cc-ccii"
    count_field = "ccii_studies"
    sites = ("guangzhou", "wuhan")
    enrich = {"covid": 1 / 3, "pneumonia": 1 / 3}

    def scan(self, index: int) -> str:
        """The scan id of study `index`."""
        return str(stable_int("ccii-scan", self.cfg.seed, index) % 10**4)

    def key(self, study: CTStudy) -> str:
        return f"{study.ccii_class}/{study.patient_id}/{self.scan(study.index)}"

    def candidates(self, key: str) -> list[int]:
        scan = PurePosixPath(key).name
        return [index for index in range(self.count()) if self.scan(index) == scan]

    def write_study(self, study: CTStudy) -> StudyResult:
        scan, rel = self.scan(study.index), self.key(study)
        low, high = SLICE_WINDOW
        pixels = np.clip((study.hu.astype(np.float32) - low) / (high - low) * 255.0, 0, 255)
        pixels = np.rint(pixels).astype(np.uint8)[:, ::-1, ::-1]
        for k, plane in enumerate(pixels):
            path = self.dest / rel / f"{k:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(plane, mode="L").save(path, format="PNG", compress_level=1)
        line = (f"{study.ccii_class}-{study.patient_id}.zip", study.ccii_class, study.patient_id, scan,
                str(len(pixels)))
        rows = (("index", line), *truth_rows(rel, study))
        return StudyResult(rows, self.entry(study, {study.ccii_class: 1.0}))

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / "unzip_filenames.csv", ("zip_file", "label", "patient_id", "scan_id", "n_slice"),
                  [cells for name, cells in rows if name == "index"])
        self.write_truth(rows)


def false_candidates(study: CTStudy, count: int) -> list[tuple[float, float, float]]:
    """The (z, y, x) voxel centres of up to `count` false-positive nodule candidates, as a candidate
    detector finds them in the image alone (LUNA16's candidates come from such detectors, so most
    are vessels and other nodule-like structures): the lungs are the air (below -500 HU) not
    connected to the edge of an axial slice, each slice's lung holes filled; a structure is a
    connected part of those holes whose volume is that of a sphere with a diameter in
    CANDIDATE_DIAMETER_MM and whose brightest voxel is below CANDIDATE_MAX_HU, its centre at least
    a nodule's diameter from every nodule's centre. The `count` largest, the ones a detector is
    surest of: drawn at random among them, the negatives are mostly vessel cuts of 8-13 mm that
    size alone tells from the nodules (AUC 0.96 on the demo's 60 volumes; 0.71 for the largest)."""
    air = study.hu < -500
    parts, _ = ndimage.label(air)
    edge = np.unique(np.concatenate([parts[:, [0, -1], :].ravel(), parts[:, :, [0, -1]].ravel()]))
    lungs = air & ~np.isin(parts, edge)
    inside = np.stack([ndimage.binary_fill_holes(plane) for plane in lungs]) & ~lungs
    blobs, _ = ndimage.label(inside)
    diameters = np.cbrt(6 / np.pi * np.bincount(blobs.ravel()) * np.prod(study.spacing))  # [0]: background
    spacing = np.array(study.spacing[::-1])  # (z, y, x) mm
    nodules = [(np.array(lesion.centre_voxel), lesion.diameter_mm) for lesion in study.lesions
               if lesion.name == "nodule"]
    found = []
    low, high = CANDIDATE_DIAMETER_MM
    for label, box in enumerate(ndimage.find_objects(blobs), start=1):
        if not low <= diameters[label] <= high:
            continue
        member = blobs[box] == label
        if study.hu[box][member].max() >= CANDIDATE_MAX_HU:
            continue
        centre = np.argwhere(member).mean(axis=0) + [part.start for part in box]
        if all(np.linalg.norm((centre - voxel) * spacing) >= diameter for voxel, diameter in nodules):
            found.append((-float(diameters[label]), tuple(float(v) for v in centre)))
    return [centre for _, centre in sorted(found)[:count]]


class Luna16Writer(CTLayoutWriter):
    """LUNA16: `subset<k>/<seriesuid>.mhd` + `.raw` (int16 HU), `annotations.csv` (seriesuid,
    coordX, coordY, coordZ, diameter_mm; world millimetres in ITK's LPS frame) and
    `candidates.csv` (seriesuid, coordX, coordY, coordZ, class: every nodule, class 1, and
    FALSE_CANDIDATES false positives of a candidate detector per volume, class 0: see
    :func:`false_candidates`)."""

    folder = "luna16"
    dataset = "luna16"
    count_field = "luna_studies"
    sites = ("lidc_a", "lidc_b")
    enrich = {"nodule": 0.5}

    def uid(self, index: int) -> str:
        """The series instance UID of study `index`."""
        return LUNA_UID_ROOT + str(stable_int("luna-uid", self.cfg.seed, index))

    def key(self, study: CTStudy) -> str:
        subset = f"subset{stable_int('luna-subset', self.cfg.seed, study.patient_id) % 10}"
        return f"{subset}/{self.uid(study.index)}.mhd"

    def candidates(self, key: str) -> list[int]:
        uid = PurePosixPath(key).stem
        return [index for index in range(self.count()) if self.uid(index) == uid]

    def write_study(self, study: CTStudy) -> StudyResult:
        uid, rel = self.uid(study.index), self.key(study)
        ras = study.acquisition.orientation == "RAS"
        image = sitk.GetImageFromArray(study.hu if ras else ras_to_lps_index(study.hu))
        image.SetSpacing(study.spacing)
        far = study.affine() @ np.array([study.hu.shape[2] - 1, study.hu.shape[1] - 1, 0, 1.0])
        corner = study.origin if ras else far[:3]
        image.SetOrigin((-corner[0], -corner[1], corner[2]))
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1) if ras else (1, 0, 0, 0, 1, 0, 0, 0, 1))
        path = self.dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=False)
        rows: list[Row] = []
        nodules = [lesion for lesion in study.lesions if lesion.name == "nodule"]
        for lesion in nodules:
            x, y, z = lesion.centre_mm
            coords = (f"{-x:.4f}", f"{-y:.4f}", f"{z:.4f}")
            rows += [("annotations", (uid, *coords, f"{lesion.diameter_mm:.2f}")),
                     ("candidates", (uid, *coords, "1"))]
        for k, j, i in false_candidates(study, FALSE_CANDIDATES):
            x, y, z = (study.affine() @ np.array([i, j, k, 1.0]))[:3]
            rows.append(("candidates", (uid, f"{-x:.4f}", f"{-y:.4f}", f"{z:.4f}", "0")))
        rows += truth_rows(rel, study)
        return StudyResult(tuple(rows), self.entry(study, {"nodule": float(bool(nodules))}))

    def write_tables(self, rows: Sequence[Row]) -> None:
        write_csv(self.dest / "annotations.csv", ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"),
                  [cells for name, cells in rows if name == "annotations"])
        write_csv(self.dest / "candidates.csv", ("seriesuid", "coordX", "coordY", "coordZ", "class"),
                  [cells for name, cells in rows if name == "candidates"])
        self.write_truth(rows)


class BcvWriter(CTLayoutWriter):
    """BCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): `img/img<NNNN>.nii.gz` with
    `label/label<NNNN>.nii.gz` (uint8 organ labels, BCV numbering), upper-abdominal fields of view."""

    folder = "bcv"
    dataset = "bcv"
    count_field = "bcv_studies"
    sites = ("nashville", "memphis")

    def key(self, study: CTStudy) -> str:
        return f"img/img{study.index + 1:04d}.nii.gz"

    def candidates(self, key: str) -> list[int]:
        found = re.fullmatch(r"img/img(\d+)\.nii\.gz", key)
        return [int(found.group(1)) - 1] if found else []

    def write_study(self, study: CTStudy) -> StudyResult:
        number = f"{study.index + 1:04d}"
        write_bytes(self.dest / self.key(study), nifti_bytes(study, study.hu, intensity=True))
        write_bytes(self.dest / "label" / f"label{number}.nii.gz",
                    nifti_bytes(study, study.organs, intensity=False))
        present = {name: 1.0 for name, value in ORGANS.items() if (study.organs == value).any()}
        return StudyResult(truth_rows(self.key(study), study), self.entry(study, present))

    def write_tables(self, rows: Sequence[Row]) -> None:
        self.write_truth(rows)


CT_LAYOUTS: tuple[type[CTLayoutWriter], ...] = (BimcvWriter, CcciiWriter, Luna16Writer, BcvWriter)
