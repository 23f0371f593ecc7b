"""One CT study from its key: latent findings -> HU volume, organ labels, lesion slices, reports.

`generate_ct_study` is a pure function of (seed, dataset, index, site, language, enrich) and of the
packaged data files: the same inputs give identical arrays and strings in any process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage

from unimed.phantom.ct.anatomy import Grid, Habitus, draw_habitus, render_anatomy
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.lesions import Lesion, render_lesions
from unimed.phantom.ct.sites import CT_FINDINGS, CT_SITES_FILE, CTAcquisition, CTSite, get_ct_site
from unimed.phantom.latent import finding_attrs, patient_of, report_flags, resolve_prevalence, seed_sequence
from unimed.phantom.reports import LANG_DIR, load_pack, render_reports
from unimed.phantom.study import Finding

CT_LANG_DIR = LANG_DIR / "ct"
HU_RANGE = (-1024, 3071)
_STUDY, _PATIENT = 10, 12  # key namespaces, apart from the 2D generator's
PATIENT_ID_BASE, STUDY_ID_BASE = 20_000_000, 60_000_000
"""Patient and study ids are these plus the patient and study numbers."""


@dataclasses.dataclass
class CTStudy:
    """Everything generated for one CT study; all fields derive from the same latent findings.

    `hu` is (D, H, W) int16 in Hounsfield units, axes increasing towards S, A and R; `organs` the
    matching BCV-numbered labels. `origin` is the world (x, y, z) mm of voxel (0, 0, 0) and
    `spacing` the voxel size (x, y, z) mm, both RAS.
    """

    index: int
    patient_id: str
    study_id: str
    site: str
    language: str
    sex: str
    age: int
    acquisition: CTAcquisition
    findings: list[Finding]
    negated: tuple[str, ...]
    lesions: list[Lesion]
    hu: np.ndarray
    organs: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    reports: dict[str, str]
    ccii_class: str

    def affine(self) -> np.ndarray:
        """4x4 voxel (i=x, j=y, k=z) -> RAS world mm."""
        out = np.diag([*self.spacing, 1.0])
        out[:3, 3] = self.origin
        return out


def ct_lang_dir(cfg: CTConfig) -> Path:
    return Path(cfg.lang_dir) if cfg.lang_dir else CT_LANG_DIR


def ct_site_of(cfg: CTConfig, name: str) -> CTSite:
    return get_ct_site(name, Path(cfg.sites_file) if cfg.sites_file else CT_SITES_FILE)


def sample_ct_findings(rng: np.random.Generator, prevalence: Mapping[str, float]) -> dict[str, dict[str, str]]:
    """Present CT findings -> attributes; covid and pneumonia are one categorical draw."""
    present = {name for name, u in zip(CT_FINDINGS, rng.random(len(CT_FINDINGS)))
               if name not in ("covid", "pneumonia") and u < prevalence[name]}
    u = rng.random()
    if u < prevalence["covid"]:
        present.add("covid")
    elif u < prevalence["covid"] + prevalence["pneumonia"]:
        present.add("pneumonia")
    return {name: finding_attrs(name, rng) for name in CT_FINDINGS if name in present}


def ccii_class(present: Mapping[str, object]) -> str:
    """The CC-CCII class of a study's findings."""
    return "NCP" if "covid" in present else "CP" if "pneumonia" in present else "Normal"


def acquire(hu: np.ndarray, acq: CTAcquisition, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    """Slice-thickness blur, reconstruction kernel and noise; int16 HU clipped to the scanner range."""
    sigma_z = 0.42 * max(acq.thickness_mm / acq.slice_mm - 0.6, 0.0)
    if acq.kernel == "smooth":
        out = ndimage.gaussian_filter(hu, (sigma_z, 0.7, 0.7))
    else:
        blurred = ndimage.gaussian_filter(hu, (sigma_z, 1.0, 1.0))
        out = ndimage.gaussian_filter(hu, (sigma_z, 0.0, 0.0)) * 1.6 - 0.6 * blurred
    out += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(acq.noise_hu * difficulty)
    return np.clip(np.rint(out), *HU_RANGE).astype(np.int16)


def _patient(cfg_seed: int, dataset: str, patient: int, site: CTSite) -> tuple[str, int, Habitus]:
    rng = np.random.default_rng(seed_sequence(cfg_seed, dataset, _PATIENT, patient))
    female = bool(rng.random() < site.female_fraction)
    age = int(rng.integers(site.age[0], site.age[1] - 2))
    return ("F" if female else "M"), age, draw_habitus(rng, female)


def generate_ct_study(
    cfg: CTConfig, seed: int, dataset: str, index: int, *, site: str, language: str | None = None,
    enrich: Mapping[str, float] | None = None,
) -> CTStudy:
    """Generate CT study `index` of `dataset` as acquired at `site`, reported in `language`
    (default: the site's first language) and in every language of `cfg.languages`."""
    if index < 0:
        raise ValueError(f"study index must be >= 0, got {index}")
    where = ct_site_of(cfg, site)
    language = language or where.languages[0]
    if language not in where.languages:
        raise ValueError(f"CT site '{site}' does not report in '{language}'; its languages: {list(where.languages)}")
    prevalence = resolve_prevalence(where.prevalence, enrich)
    patient, visit = patient_of(seed, dataset, index)
    sex, age, habitus = _patient(seed, dataset, patient, where)
    finding_rng, anatomy_rng, lesion_rng, noise_rng, report_rng = (
        np.random.default_rng(s) for s in seed_sequence(seed, dataset, _STUDY, index).spawn(5)
    )
    present = sample_ct_findings(finding_rng, prevalence)
    pack = load_pack(language, ct_lang_dir(cfg), CT_FINDINGS, CT_FINDINGS)
    findings, negated = report_flags(finding_rng, present, pack.rates, CT_FINDINGS)
    acq = where.acquisition
    shape = tuple(int(s) for s in cfg.shape)
    fov_low, fov_high = acq.fov_z_mm
    slice_mm = acq.slice_mm if shape[0] == 32 else (fov_high - fov_low) / (shape[0] - 1)
    grid = Grid(shape, acq.pixel_mm * 128 / shape[2], slice_mm, fov_low)
    anatomy = render_anatomy(grid, habitus, anatomy_rng)
    lesions = render_lesions(anatomy.hu, anatomy, grid, present, lesion_rng, 1.0 / cfg.difficulty)
    hu = acquire(anatomy.hu, acq, noise_rng, cfg.difficulty)
    reports = render_reports(
        tuple(cfg.languages), findings, negated, view="CT", sex=sex, seed=int(report_rng.integers(2**62)),
        lang_dir=ct_lang_dir(cfg), names=CT_FINDINGS, negatable=CT_FINDINGS,
    )
    return CTStudy(
        index=index,
        patient_id=str(PATIENT_ID_BASE + patient),
        study_id=str(STUDY_ID_BASE + index),
        site=site,
        language=language,
        sex=sex,
        age=age + visit,
        acquisition=acq,
        findings=findings,
        negated=negated,
        lesions=lesions,
        hu=hu,
        organs=anatomy.organs,
        origin=grid.origin,
        spacing=grid.spacing,
        reports=reports,
        ccii_class=ccii_class(present),
    )
