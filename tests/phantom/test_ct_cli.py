"""`unimed phantom` with phantom.ct.enabled writes the four 3D layouts and reads them back."""

from __future__ import annotations

import yaml

from unimed.cli import main

TWO_D = {"image_size": 32, "mimic_studies": 2, "padchest_studies": 2, "chexpert_studies": 2, "cxp500_studies": 1,
         "rsna_studies": 1, "siim_studies": 1, "covidx_studies": 3, "object_cxr_studies": 1, "pdc_studies": 1,
         "control_studies": 1}


def test_phantom_command_writes_and_reads_back_the_ct_world(tmp_path, capsys):
    root = tmp_path / "world"
    preset = tmp_path / "ct.yaml"
    preset.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "runs")},
        "phantom": {**TWO_D, "root": str(root), "ct": {
            "enabled": True, "shape": [12, 48, 48], "bimcv_studies": 2, "ccii_studies": 3, "luna_studies": 2,
            "bcv_studies": 2}},
        "data": {"progress": False},
    }))
    assert main(["phantom", str(preset), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Phantom CT world" in out and out.count("matches") >= 4 and "differs" not in out
    assert (root / "manifest-ct.json").is_file() and (root / "splits" / "luna16.csv").is_file()
    assert "rows of luna16's table" in out and (root / "splits" / "luna16-candidates.csv").is_file()
    assert main(["phantom", str(preset), "--quiet", "phantom.ct.kernel=soft"]) == 2
    assert "unknown config key 'phantom.ct.kernel'" in capsys.readouterr().err
