"""The phantom study generator: determinism, shapes, annotations, sites, enrichment, views."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from unimed.data.labels import CHEXPERT_LABELS, COVIDX_CLASSES, PDC_LABELS
from unimed.phantom.anatomy import draw_geometry, render_frontal
from unimed.phantom.catalogue import FINDING_NAMES
from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.lesions import RENDERERS, Canvas
from unimed.phantom.sites import SITES_FILE

CFG = PhantomConfig(image_size=64)


def _studies(n: int, cfg: PhantomConfig = CFG, **kw):
    site = kw.pop("site", "boston")
    return [generate_study(cfg, "test", i, site=site, **kw) for i in range(n)]


def test_same_key_gives_identical_bytes_and_text():
    a = generate_study(CFG, "mimic", 7, site="alicante")
    b = generate_study(CFG, "mimic", 7, site="alicante")
    assert a.image.tobytes() == b.image.tobytes()
    assert a.reports == b.reports and a.findings == b.findings and a.boxes == b.boxes


def test_seed_dataset_and_index_change_the_study():
    base = generate_study(CFG, "mimic", 7, site="boston")
    for other in (
        generate_study(dataclasses.replace(CFG, seed=1), "mimic", 7, site="boston"),
        generate_study(CFG, "padchest", 7, site="boston"),
        generate_study(CFG, "mimic", 8, site="boston"),
    ):
        assert other.image.tobytes() != base.image.tobytes()


def test_image_range_dtype_shape_and_label_sets():
    for s in _studies(20, site="alicante"):
        assert s.image.dtype == np.float32 and s.image.shape == (64, 64)
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0 and s.image.std() > 0.05
        assert s.view in ("PA", "AP", "LATERAL")
        assert set(s.chexpert) == set(CHEXPERT_LABELS)
        assert all(math.isnan(v) or v in (-1.0, 0.0, 1.0) for v in s.chexpert.values())
        assert set(s.pdc) == set(PDC_LABELS) and s.covid_class in COVIDX_CLASSES
        assert s.language == "es" and s.padchest_labels


def test_ids_are_numeric_unique_and_patients_have_repeat_studies():
    studies = _studies(60)
    assert len({s.study_id for s in studies}) == 60 and len({s.image_id for s in studies}) == 60
    assert all(s.patient_id.isdigit() and s.study_id.isdigit() for s in studies)
    per_patient = np.bincount(np.unique([s.patient_id for s in studies], return_inverse=True)[1])
    assert per_patient.max() in (2, 3) and per_patient.min() >= 1 and len(per_patient) < 45
    first = {}
    for s in studies:  # sex is a property of the patient, shared across visits
        assert first.setdefault(s.patient_id, s.sex) == s.sex


def test_no_finding_study_is_labelled_normal():
    s = _studies(1, enrich={name: 0.0 for name in FINDING_NAMES})[0]
    assert s.findings == [] and s.chexpert["No Finding"] == 1.0 and s.covid_class == "normal"
    assert sum(s.pdc.values()) == 0 and s.padchest_labels == ["normal"] and s.pneumothorax_mask is None


def test_pneumothorax_renderer_mask_lies_inside_the_lung():
    rng = np.random.default_rng(0)
    frame = render_frontal(96, draw_geometry(rng, female=False), "PA")
    before = frame.density.copy()
    canvas = Canvas(frame, rng, contrast=1.0, scale=1.0)
    RENDERERS.get("pneumothorax")(canvas, {"side": "left", "size": "large"})
    mask = canvas.pneumothorax
    assert mask.dtype == bool and mask.sum() > 20
    assert np.all(frame.lung_r["left"][mask] < 1.0)
    assert (frame.density - before)[mask].mean() < 0  # the collapsed rim is more lucent


def test_mask_exactly_when_frontal_pneumothorax():
    always = _studies(8, frontal_only=True, enrich={"pneumothorax": 1.0})
    assert all(s.pneumothorax_mask is not None and s.pneumothorax_mask.shape == (64, 64) for s in always)
    assert all(s.pneumothorax_mask.any() for s in always)
    never = _studies(8, frontal_only=True, enrich={"pneumothorax": 0.0})
    assert all(s.pneumothorax_mask is None for s in never)


def test_boxes_lie_inside_the_image():
    studies = _studies(10, frontal_only=True, enrich={"pneumonia": 1.0, "foreign_object": 1.0})
    labels = set()
    for s in studies:
        for b in s.boxes:
            assert 0 <= b.x0 < b.x1 <= 64 and 0 <= b.y0 < b.y1 <= 64
            assert b.shape in (0, 1, 2) and (len(b.polygon) >= 3) == (b.shape == 2)
            labels.add(b.label)
        assert any(b.label == "pneumonia" for b in s.boxes)
    assert labels == {"pneumonia", "foreign_object"}


def test_enrich_sets_prevalence_and_rejects_unknown_names():
    assert all(any(f.name == "covid" for f in s.findings) for s in _studies(5, enrich={"covid": 1.0}))
    with pytest.raises(ValueError, match="valid findings.*pneumothorax"):
        generate_study(CFG, "x", 0, site="boston", enrich={"pneumotorax": 0.5})
    with pytest.raises(ValueError, match="probability"):
        generate_study(CFG, "x", 0, site="boston", enrich={"pneumothorax": 1.5})


def test_unknown_site_lists_valid_sites():
    with pytest.raises(ValueError, match="alicante.*boston"):
        generate_study(CFG, "x", 0, site="paris")


@pytest.mark.parametrize(("value", "message"), [("[]", "a language code or a list"),
                                               ("[en, en]", "lists a language twice"),
                                               ("{en: 1}", "a language code or a list")])
def test_bad_site_language_names_file_and_site(tmp_path, value, message):
    text = (SITES_FILE.read_text(encoding="utf-8")
            .replace("miami:\n  language: [en, es]", f"miami:\n  language: {value}"))
    path = tmp_path / "sites.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = dataclasses.replace(CFG, sites_file=str(path))
    with pytest.raises(ValueError, match=f"{path}: site 'miami'.language .*{message}"):
        generate_study(cfg, "x", 0, site="boston")


def test_lateral_fraction_is_respected():
    cfg = dataclasses.replace(PhantomConfig(image_size=32), lateral_fraction=0.3)
    views = [s.view for s in _studies(300, cfg)]
    assert 0.22 < views.count("LATERAL") / 300 < 0.38  # ~4 binomial standard deviations
    assert all(s.view != "LATERAL" for s in _studies(60, cfg, frontal_only=True))


def test_sites_differ_in_prevalence_and_acquisition():
    cfg = PhantomConfig(image_size=64, lateral_fraction=0.0)
    boston, alicante = _studies(300, cfg, site="boston"), _studies(300, cfg, site="alicante")

    def rate(studies, name):
        return np.mean([any(f.name == name for f in s.findings) for s in studies])

    assert rate(boston, "support_devices") - rate(alicante, "support_devices") > 0.08
    assert rate(boston, "pleural_effusion") - rate(alicante, "pleural_effusion") > 0.05
    assert np.mean([s.view == "AP" for s in boston]) > np.mean([s.view == "AP" for s in alicante]) + 0.15
    # Alicante films have a bright collimation frame, Boston ones a dark one (or none over air).
    assert np.mean([s.image[0, 0] for s in alicante]) > 0.8 > 0.2 > np.mean([s.image[0, 0] for s in boston])
