"""One phantom study from its key: latent findings -> image, mask, boxes, reports, labels.

`generate_study` is a pure function of (cfg.seed, dataset, index, site, language, frontal_only,
enrich) and of the packaged data files: the same inputs give identical arrays and strings in any process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from unimed.phantom.acquisition import expose
from unimed.phantom.anatomy import Geometry, draw_geometry, render_frontal, render_lateral
from unimed.phantom.config import PhantomConfig
from unimed.phantom.labels import chexpert_labels, covid_class, padchest_labels, pdc_labels
from unimed.phantom.latent import patient_of, report_flags, resolve_prevalence, sample_findings, seed_sequence
from unimed.phantom.lesions import Canvas, render_findings, render_lateral_findings
from unimed.phantom.reports import LANG_DIR, load_pack, render_reports
from unimed.phantom.sites import SITES_FILE, Site, get_site
from unimed.phantom.study import Box, Study

# Key namespaces inside one (seed, dataset): studies, patient blocks (latent.patient_of), patients.
_STUDY, _PATIENT = 0, 2


def lang_dir(cfg: PhantomConfig) -> Path:
    """The language-pack folder of a config."""
    return Path(cfg.lang_dir) if cfg.lang_dir else LANG_DIR


def site_of(cfg: PhantomConfig, name: str) -> Site:
    """The named site of a config's sites file; ValueError lists the valid ones."""
    return get_site(name, Path(cfg.sites_file) if cfg.sites_file else SITES_FILE)


def _patient(cfg: PhantomConfig, dataset: str, patient: int, site: Site) -> tuple[str, int, Geometry]:
    """Sex, age at first visit and habitus: shared by every study of the patient."""
    rng = np.random.default_rng(seed_sequence(cfg.seed, dataset, _PATIENT, patient))
    female = bool(rng.random() < site.female_fraction)
    age = int(rng.integers(site.age[0], site.age[1] - 2))
    return ("F" if female else "M"), age, draw_geometry(rng, female)


def _view(rng: np.random.Generator, cfg: PhantomConfig, site: Site, frontal_only: bool) -> str:
    if not frontal_only and rng.random() < cfg.lateral_fraction:
        return "LATERAL"
    return "AP" if rng.random() < site.acquisition.ap_fraction else "PA"


def render_image(
    cfg: PhantomConfig, site: Site, geometry: Geometry, view: str, present: dict[str, dict[str, str]],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, list[Box]]:
    """(image (S, S) float32 in [0, 1], pneumothorax mask or None, boxes) of one study."""
    lateral = view == "LATERAL"
    frame = render_lateral(cfg.image_size, geometry) if lateral else render_frontal(cfg.image_size, geometry, view)
    canvas = Canvas(frame, rng, contrast=1.0 / cfg.difficulty, scale=cfg.difficulty ** -0.3)
    if lateral:
        render_lateral_findings(canvas, present)
    else:
        render_findings(canvas, present)
    image = expose(frame.density, site.acquisition, rng, cfg.difficulty, view)
    if lateral:
        return image, None, []
    return image, canvas.pneumothorax, canvas.boxes


def study_language(site: Site, language: str | None) -> str:
    """The report language of a study at `site`: `language`, which the site must report in, or
    the site's only language when None; ValueError otherwise."""
    if language is None:
        if len(site.languages) > 1:
            raise ValueError(
                f"site '{site.name}' reports in {list(site.languages)}: name the study's language")
        return site.languages[0]
    if language not in site.languages:
        raise ValueError(
            f"site '{site.name}' does not report in '{language}'; its languages: {list(site.languages)}")
    return language


def generate_study(
    cfg: PhantomConfig, dataset: str, index: int, *, site: str, language: str | None = None,
    frontal_only: bool = False, enrich: Mapping[str, float] | None = None,
) -> Study:
    """Generate study `index` of `dataset` as acquired at `site` and reported in `language`
    (default: the site's only language).

    `enrich` overrides the site prevalence of named findings (e.g. {"pneumothorax": 0.5});
    unknown sites, languages or finding names raise ValueError listing the valid ones.
    """
    if index < 0:
        raise ValueError(f"study index must be >= 0, got {index}")
    where = site_of(cfg, site)
    language = study_language(where, language)
    prevalence = resolve_prevalence(where.prevalence, enrich)
    patient, visit = patient_of(cfg.seed, dataset, index)
    sex, age, geometry = _patient(cfg, dataset, patient, where)
    view_rng, finding_rng, render_rng, report_rng = (
        np.random.default_rng(s) for s in seed_sequence(cfg.seed, dataset, _STUDY, index).spawn(4)
    )
    view = _view(view_rng, cfg, where, frontal_only)
    present = sample_findings(finding_rng, prevalence, view)
    pack = load_pack(language, lang_dir(cfg))
    findings, negated = report_flags(finding_rng, present, pack.rates)
    image, mask, boxes = render_image(cfg, where, geometry, view, present, render_rng)
    reports = render_reports(
        tuple(cfg.languages), findings, negated, view=view, sex=sex,
        seed=int(report_rng.integers(2**62)), lang_dir=lang_dir(cfg),
    )
    return Study(
        index=index,
        patient_id=str(10_000_000 + patient),
        study_id=str(50_000_000 + index),
        image_id=str(90_000_000 + index),
        site=site,
        language=language,
        view=view,
        sex=sex,
        age=age + visit,
        findings=findings,
        image=image,
        pneumothorax_mask=mask,
        boxes=boxes,
        reports=reports,
        chexpert=chexpert_labels(findings, negated),
        pdc=pdc_labels(findings),
        covid_class=covid_class(findings),
        padchest_labels=padchest_labels(findings),
        negated=negated,
    )
