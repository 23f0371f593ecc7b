"""End-to-end: the `unimed` command line on a tiny phantom world, every Med-UniC stage."""

import json
from pathlib import Path

import pytest
import yaml

from unimed.cli import main

TINY = {
    "run": {"name": "tiny", "seed": 0},
    "phantom": {
        "image_size": 64, "mimic_studies": 40, "padchest_studies": 40, "chexpert_studies": 12,
        "cxp500_studies": 8, "rsna_studies": 12, "siim_studies": 12, "covidx_studies": 12,
        "object_cxr_studies": 12, "pdc_studies": 8,
    },
    "data": {"image_size": 64, "resize_size": 72, "max_length": 48, "progress": False},
    "vocab": {"english_vocab_size": 300, "new_terms": 40},
    "mlm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
            "epochs": 1, "batch_size": 16, "max_length": 48},
    "model": {"image_encoder": "vit_tiny_patch8_64", "frozen_text_layers": 1, "embed_dim": 32,
              "ctr_dim": 64, "projector_hidden_dim": 64},
    "train": {"epochs": 1, "batch_size": 8, "max_steps": 2, "log_every": 1, "tensorboard": False},
}


@pytest.fixture()
def preset(tmp_path: Path) -> Path:
    cfg = dict(TINY)
    cfg["run"] = {**TINY["run"], "output_dir": str(tmp_path / "runs")}
    cfg["phantom"] = {**TINY["phantom"], "root": str(tmp_path / "world")}
    cfg["data"] = {**TINY["data"], "root": str(tmp_path / "world")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_runs_every_stage(preset: Path, tmp_path: Path, capsys):
    assert main(["demo", str(preset), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "read back through the adapters" in out and "Pre-training losses over 2 steps" in out
    run = tmp_path / "runs" / "tiny"
    assert (run / "config.yaml").is_file() and (run / "phantom_preview.png").is_file()
    assert (run / "vocab" / "added_terms.txt").is_file()
    assert (run / "mlm" / "config.json").is_file()
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all(row["cvl_loss"] > 0 and row["ssv_loss"] > 0 for row in log)
    assert (run / "pretrain" / "checkpoints" / "latest").exists()
    saved = yaml.safe_load((run / "pretrain" / "config.yaml").read_text())
    assert saved["model"]["image_encoder"] == "vit_tiny_patch8_64"

    assert main(["pretrain", str(preset), "train.max_steps=3", "--resume", "--quiet"]) == 0
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log][-1] == 3


def test_unknown_key_is_a_clean_error(preset: Path, capsys):
    assert main(["phantom", str(preset), "phantom.studies=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'phantom.studies'" in err and "mimic_studies" in err


def test_pretrain_without_text_encoder_explains(preset: Path, capsys):
    assert main(["pretrain", str(preset), "--quiet"]) == 2
    assert "run `unimed mlm` first" in capsys.readouterr().err


def test_every_preset_loads():
    from unimed.config import load_config

    presets = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)
