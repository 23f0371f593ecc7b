"""A written CT study generated again from manifest-ct.json: the same volume under the same key,
with the lesion masks whose slices the ground truth lists."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from unimed.data.volumes import SLICE_WINDOW, read_volume
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.world import CT_MANIFEST, regenerate_ct_study, write_ct_world
from unimed.phantom.ct.writers import CT_LAYOUTS, TRUTH_CSV


def test_every_written_study_regenerates_to_its_file_and_its_lesion_masks(tmp_path):
    cfg = PhantomConfig(root=str(tmp_path), seed=2, ct=CTConfig(
        enabled=True, shape=(12, 24, 24), bimcv_studies=4, ccii_studies=6, luna_studies=6, bcv_studies=3))
    write_ct_world(cfg, tmp_path, progress=False)
    low, high = SLICE_WINDOW
    for layout in CT_LAYOUTS:
        folder = tmp_path / layout.folder
        rows = [line.split(",") for line in (folder / TRUTH_CSV).read_text().splitlines()[1:]]
        files = [p for pattern in ("**/*.nii.gz", "**/*.mhd") for p in folder.glob(pattern)
                 if "label" not in p.parts]
        volumes = {p.relative_to(folder).as_posix() for p in files}
        volumes |= {p.parent.relative_to(folder).as_posix() for p in folder.glob("*/*/*/0000.png")}
        assert len(volumes) == layout(cfg, folder).count()
        for key in sorted(volumes):
            study = regenerate_ct_study(tmp_path, layout.folder, key)
            hu = study.hu.transpose(2, 1, 0).astype(np.float32)
            disk = read_volume(folder / key).array
            if layout.folder == "cc-ccii":  # 8-bit windowed slices: compare what the file holds
                hu, disk = (np.rint(np.clip((a - low) / (high - low) * 255, 0, 255)) for a in (hu, disk))
            np.testing.assert_array_equal(hu, disk)
            truth = {(r[1], r[2]) for r in rows if r[0] == key}
            masks = {(lesion.name, " ".join(map(str, np.flatnonzero(lesion.mask.any(axis=(1, 2))))))
                     for lesion in study.lesions}
            assert masks == truth
    assert regenerate_ct_study(tmp_path, "luna16", "subset0/1.2.3.mhd") is None
    assert regenerate_ct_study(tmp_path, "bcv", "img/img0099.nii.gz") is None
    assert regenerate_ct_study(tmp_path, "mimic-cxr", "files/p10/s1.jpg") is None


def test_regenerating_without_a_manifest_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / CT_MANIFEST))):
        regenerate_ct_study(tmp_path, "luna16", "subset0/1.2.3.mhd")
    (tmp_path / CT_MANIFEST).write_text(json.dumps({"seed": 0}))
    with pytest.raises(ValueError, match="malformed CT phantom manifest"):
        regenerate_ct_study(tmp_path, "luna16", "subset0/1.2.3.mhd")
