"""The CT generator: determinism, HU realism, findings in their own slices, reports from the truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unimed.data.labels import CCII_CLASSES
from unimed.phantom.ct.anatomy import HU, ORGANS
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.sites import load_ct_sites

SMALL = CTConfig(shape=(32, 64, 64))


def test_same_key_same_bytes_and_different_index_differs():
    a = generate_ct_study(SMALL, 3, "bimcv", 5, site="valencia")
    b = generate_ct_study(SMALL, 3, "bimcv", 5, site="valencia")
    c = generate_ct_study(SMALL, 3, "bimcv", 6, site="valencia")
    assert a.hu.tobytes() == b.hu.tobytes() and a.organs.tobytes() == b.organs.tobytes()
    assert a.reports == b.reports
    assert a.hu.tobytes() != c.hu.tobytes()


def test_tissues_have_realistic_hounsfield_units():
    study = generate_ct_study(CTConfig(), 0, "bcv", 0, site="nashville")
    hu = study.hu.astype(np.float32)
    assert hu.dtype == np.float32 and study.hu.dtype == np.int16
    assert np.median(hu[:, :3, :3]) == pytest.approx(HU["air"], abs=80)  # outside the body
    liver = hu[study.organs == ORGANS["liver"]]
    assert abs(np.median(liver) - HU["liver"]) < 25
    for organ in ("spleen", "right_kidney", "left_kidney", "stomach", "aorta"):
        assert (study.organs == ORGANS[organ]).sum() > 50, organ
    assert (hu > 500).sum() > 200  # bone
    chest = generate_ct_study(CTConfig(), 0, "bimcv", 1, site="valencia", enrich={
        "covid": 0.0, "pneumonia": 0.0, "nodule": 0.0, "pleural_effusion": 0.0, "pneumothorax": 0.0})
    lung_voxels = (chest.hu[20] > -950) & (chest.hu[20] < -700)  # aerated lung, not the air outside
    assert lung_voxels.mean() > 0.1 and abs(np.median(chest.hu[20][lung_voxels]) - HU["lung"]) < 30


def test_nodule_is_where_and_as_large_as_recorded():
    study = generate_ct_study(CTConfig(), 0, "luna16", 2, site="lidc_a", enrich={"nodule": 1.0})
    (nodule,) = [lesion for lesion in study.lesions if lesion.name == "nodule"]
    k, j, i = (int(round(v)) for v in nodule.centre_voxel)
    assert study.hu[k, j, i] > -300  # solid tissue at the centre, inside aerated lung
    assert k in nodule.slices
    world = study.affine() @ np.array([nodule.centre_voxel[2], nodule.centre_voxel[1], nodule.centre_voxel[0], 1.0])
    np.testing.assert_allclose(world[:3], nodule.centre_mm, atol=1e-4)
    size = next(f for f in study.findings if f.name == "nodule").attrs["size_mm"]
    assert nodule.diameter_mm == float(size)
    z = np.asarray(study.origin[2]) + np.arange(32) * study.spacing[2]
    assert all(abs(z[s] - nodule.centre_mm[2]) < nodule.diameter_mm / 2 + study.spacing[2] for s in nodule.slices)


@pytest.mark.parametrize("name", ["covid", "pneumonia", "pleural_effusion", "pneumothorax"])
def test_each_finding_changes_only_its_slices(name):
    off = {"covid": 0.0, "pneumonia": 0.0, "nodule": 0.0, "pleural_effusion": 0.0, "pneumothorax": 0.0}
    cfg = dataclasses.replace(SMALL, difficulty=1.0)
    sick = generate_ct_study(cfg, 1, "x", 4, site="guangzhou", enrich={**off, name: 1.0})
    (lesion,) = sick.lesions
    assert lesion.name == name and len(lesion.slices) >= 2
    label = sick.ccii_class
    assert label == {"covid": "NCP", "pneumonia": "CP"}.get(name, "Normal") and label in CCII_CLASSES


def test_reports_follow_the_latent_findings_in_both_languages():
    study = generate_ct_study(SMALL, 0, "bimcv", 0, site="valencia", enrich={"covid": 1.0})
    assert set(study.reports) == {"es", "en"}
    covid = next(f for f in study.findings if f.name == "covid")
    if covid.mentioned and not covid.hedged:
        assert "vidrio deslustrado" in study.reports["es"] and "ground-glass" in study.reports["en"]
    assert study.reports["es"].count("Hallazgos:") == 1 and "Conclusión:" in study.reports["es"]


def test_sites_differ_in_acquisition_and_bad_values_fail(tmp_path):
    sites = load_ct_sites()
    assert {s.acquisition.orientation for s in sites.values()} == {"RAS", "LPS"}
    assert {s.acquisition.storage for s in sites.values()} == {"hu", "rescaled"}
    assert {s.acquisition.kernel for s in sites.values()} == {"smooth", "sharp"}
    with pytest.raises(ValueError, match="unknown phantom CT site 'nowhere'"):
        generate_ct_study(SMALL, 0, "x", 0, site="nowhere")
    with pytest.raises(ValueError, match="difficulty"):
        generate_ct_study(dataclasses.replace(SMALL, difficulty=0.0), 0, "x", 0, site="valencia")
    bad = tmp_path / "sites.yaml"
    bad.write_text("s:\n  language: en\n  age: [1, 9]\n  female_fraction: 0.5\n  acquisition: {pixel_mm: 1, "
                   "slice_mm: 1, thickness_mm: 1, noise_hu: 1, kernel: blurry, orientation: RAS, storage: hu, "
                   "fov_z_mm: [0, 1]}\n  prevalence: {}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="kernel = 'blurry'"):
        load_ct_sites(bad)
