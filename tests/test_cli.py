"""End-to-end: the `unimed` command line on a tiny phantom world, every Med-UniC stage."""

import json
from pathlib import Path

import pytest
import yaml

from unimed.cli import main

TINY = {
    "run": {"name": "tiny", "seed": 0},
    "phantom": {
        "image_size": 64, "mimic_studies": 40, "padchest_studies": 40, "chexpert_studies": 30,
        "cxp500_studies": 16, "rsna_studies": 40, "siim_studies": 40, "covidx_studies": 30,
        "object_cxr_studies": 40, "pdc_studies": 16, "control_studies": 12,
    },
    "data": {"image_size": 64, "resize_size": 72, "max_length": 48, "progress": False},
    "vocab": {"english_vocab_size": 300, "new_terms": 40},
    "mlm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
            "epochs": 1, "batch_size": 16, "max_length": 48},
    "model": {"image_encoder": "vit_tiny_patch8_64", "frozen_text_layers": 1, "embed_dim": 32,
              "ctr_dim": 64, "projector_hidden_dim": 64},
    "train": {"epochs": 1, "batch_size": 8, "max_steps": 2, "log_every": 1, "tensorboard": False},
    "eval": {
        "fractions": [1.0], "min_train_images": 4,
        "linear_probe": {"epochs": 2, "patience": 1},
        "segmentation": {"epochs": 1, "patience": 1},
        "detection": {"epochs": 1, "patience": 1},
        "bias": {"samples_per_group": 12, "folds": 2, "knn_k": 3},
        "gradcam": {"classes": ["pleural effusion"]},
    },
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

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["encoders"]) == {"medunic", "init"}
    assert set(metrics["encoders"]["medunic"]["tasks"]) == {
        "zero_shot", "linear_probe", "segmentation", "detection", "retrieval", "bias", "gradcam"}
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Quality checks" in out

    assert main(["pretrain", str(preset), "train.max_steps=3", "--resume", "--quiet"]) == 0
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log][-1] == 3


def _tiny_english_bert(path: Path) -> Path:
    """A tiny English BERT folder standing in for the packaged MiniLM (the row without MLM needs one)."""
    import string

    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits,
              *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(str(path))
    return path


def test_evaluate_and_ablate(preset: Path, tmp_path: Path, capsys):
    base = f"vocab.base_model={_tiny_english_bert(tmp_path / 'english_bert')}"
    for stage in ("phantom", "vocab", "mlm", "pretrain"):
        assert main([stage, str(preset), base, "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    checkpoint = next((run / "pretrain" / "checkpoints").glob("step_*"))
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["encoders"]) == ["medunic"]
    assert set(metrics["encoders"]["medunic"]["tasks"]) == {"zero_shot"}
    assert metrics["checkpoint"] == str(checkpoint)
    assert "CXP500" in capsys.readouterr().out

    capsys.readouterr()
    assert main(["ablate", str(preset), base, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Table 4: Ablation" in out and "Quality checks" not in out
    ablation = json.loads((run / "ablation.json").read_text())
    assert [row["name"] for row in ablation["rows"]] == [
        "CVL + MLM", "SSV + CVL + MLM", "SSV + CVL + CTR", "SSV + CVL + CTR + MLM"]
    assert all(set(row["metrics"]) == {"zero_shot", "linear_probe", "segmentation"}
               for row in ablation["rows"])
    assert (run / "ablation" / "ssv_cvl_ctr" / "pretrain" / "checkpoints" / "latest").is_file()
    assert json.loads((run / "metrics.json").read_text())["ablation"] == ablation
    assert main(["ablate", str(preset), base, "train.lr=1e-3", "--quiet"]) == 2
    assert "was pre-trained with another config" in capsys.readouterr().err

    assert main(["evaluate", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--tasks", "zero_shot,telepathy", "--quiet"]) == 2
    assert "unknown task(s) ['telepathy']" in capsys.readouterr().err


def test_unknown_key_is_a_clean_error(preset: Path, capsys):
    assert main(["phantom", str(preset), "phantom.studies=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'phantom.studies'" in err and "mimic_studies" in err


def test_overrides_may_follow_options_but_stray_words_fail(preset: Path, capsys):
    assert main(["phantom", str(preset), "--quiet", "phantom.studies=5"]) == 2
    assert "unknown config key 'phantom.studies'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["phantom", str(preset), "--quiet", "stray", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: stray --bogus" in capsys.readouterr().err


def test_pretrain_without_text_encoder_explains(preset: Path, capsys):
    assert main(["pretrain", str(preset), "--quiet"]) == 2
    assert "run `unimed mlm` first" in capsys.readouterr().err


def test_every_preset_loads():
    from unimed.config import load_config

    presets = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)
