"""A user's own data on the command line: `unimed check-data` on a root of generic tables, and a
folder of images + a report table through vocab -> mlm -> pretrain -> evaluate, no invented layout."""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import multiprocessing
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unimed.cli import main

REPORTS = {
    "en": ["Small left pleural effusion. No pneumothorax.", "Heart size is normal. Lungs are clear."],
    "es": ["Derrame pleural izquierdo pequeño. Sin neumotórax.", "Corazón normal. Pulmones claros."],
}


def write_images_and_table(folder: Path, n: int = 24) -> Path:
    """`n` PNG/JPEG images of n/2 patients with English and Spanish reports, an 'Effusion' label
    that the report states, and the site of each row."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = f"scans/{i}.{'png' if i % 2 else 'jpg'}"
        (folder / "scans").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / image)
        language, effusion = ("es" if i % 3 == 0 else "en"), i % 2
        rows.append({"image": image, "report": REPORTS[language][1 - effusion], "language": language,
                     "patient_id": f"P{i // 2:03d}", "site": f"hospital-{'ab'[i % 2]}",
                     "Effusion": effusion})
    with (folder / "records.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_check_data_names_every_problem_and_passes_once_fixed(tmp_path: Path, capsys):
    root = tmp_path / "data"
    table = write_images_and_table(root / "mine") / "records.csv"
    good = table.read_text(encoding="utf-8")
    lines = good.splitlines()
    lines[3] = lines[3].replace("scans/2.jpg", "scans/missing.jpg")
    lines[5] = lines[5][: lines[5].rindex(",")]  # a short row
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes").mkdir()
    (root / "notes" / "records.csv").write_text(
        "report,language,patient_id\nDerrame pleural.,es,P1\n,es,P2\n", encoding="utf-8")

    assert main(["check-data", "--root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "mine" in out and "notes (text-only)" in out
    assert f"{table}, line 4: image file not found" in out
    assert f"{table}, line 6: expected 6 fields, found 5" in out
    assert f"{root / 'notes' / 'records.csv'}, line 3, column 'report': empty report" in out
    assert "3 problem(s)" in out

    table.write_text(good, encoding="utf-8")
    (root / "notes" / "records.csv").write_text(
        "report,language,patient_id\nDerrame pleural.,es,P1\n", encoding="utf-8")
    assert main(["check-data", "--root", str(root), "--datasets", "mine,notes", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "OK: every row read" in out and "hospital-a=12" in out
    for empty in ("", ",", " , "):  # checked every dataset, or said the root held none
        assert main(["check-data", "--root", str(root), "--datasets", empty, "--quiet"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"unimed: config error: --datasets {empty!r} names no dataset: give names separated by commas, "
            "or leave the option out to check every dataset under the root")


def test_check_data_says_a_table_saved_in_windows_1252_or_with_semicolons_as_such(tmp_path: Path, capsys):
    """Excel's "CSV" on a Western Windows: Windows-1252 bytes, and with some locales ';' between
    fields. The first is one problem of every accented row (three shown), not three problems."""
    root = tmp_path / "data"
    table = write_images_and_table(root / "mine") / "records.csv"
    good = table.read_text(encoding="utf-8")
    table.write_bytes(good.encode("cp1252"))
    assert main(["check-data", "--root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out.splitlines()
    problem = out.index("mine: 8 x non-UTF-8 text, e.g.")
    assert out[problem + 1:] == [
        *(f"  {table}, line {line}: not UTF-8 text (byte {byte}, {char!r} in Windows-1252; save the table "
          "as UTF-8)" for line, byte, char in ((2, "0xf3", "ó"), (5, "0xf1", "ñ"), (8, "0xf3", "ó"))),
        # the defaults: a root of one's own data trains with data.pretrain_datasets=[mine]
        f"NOTE: data.pretrain_datasets names mimic-cxr, padchest, not under {root}: the stages that read "
        "them would stop there",
        "1 problem(s); fix them, or set data.on_error=skip to train without the rows skipped here"]

    table.write_text(good.replace(",", ";"), encoding="utf-8")
    assert main(["check-data", "--root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "(the table is separated by ';'; it must be comma-separated)" in out
    assert out.endswith("\n1 problem(s); fix them\n")  # skipping rows does not mend a table


def test_check_data_reads_the_split_files_the_stages_read_and_writes_none(tmp_path: Path, capsys):
    """With data.split_dir, the stages read a dataset's split file: check-data reads it too, so a
    file the table no longer matches (a split column added since) is named here, not first by the
    training; where there is no file it carves as the stages would, and writes nothing."""
    root, splits = tmp_path / "data", tmp_path / "splits"
    table = write_images_and_table(root / "mine") / "records.csv"
    split_dir = f"data.split_dir={splits}"
    assert main(["check-data", "--root", str(root), split_dir, "--quiet"]) == 0
    assert not splits.exists()
    assert main(["vocab", split_dir, f"data.root={root}", "data.pretrain_datasets=[mine]",
                 "vocab.new_terms=5", f"run.output_dir={tmp_path / 'runs'}", "--quiet"]) == 0
    written = {row["key"]: row["split"] for row in csv.DictReader((splits / "mine.csv").open())}
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    moved = next(i for i, row in enumerate(rows) if written[row["image"]] != "test")
    for i, row in enumerate(rows):
        row["split"] = "test" if i == moved else written[row["image"]]
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    assert main(["check-data", "--root", str(root), split_dir, "--quiet"]) == 1
    assert (f"mine: {splits / 'mine.csv'}: record '{rows[moved]['image']}' is in split 'test' in the data "
            f"and '{written[rows[moved]['image']]}' in the split file") in capsys.readouterr().out

def test_check_data_says_a_dataset_the_config_trains_on_is_not_there(tmp_path: Path, capsys):
    """"OK: every row read" with exit 0 where data.pretrain_datasets named a folder that is not
    under the root (or a symbolic link to nowhere): pre-training then stopped on it."""
    root = tmp_path / "data"
    write_images_and_table(root / "mine")
    (root / "padchest").symlink_to(tmp_path / "nowhere")
    argv = ["check-data", "--root", str(root), "data.pretrain_datasets=[mine,padchest]", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"NOTE: data.pretrain_datasets names padchest, not under {root}: the stages that "
                        "read it would stop there", "OK: every row read"]
    assert main([*argv, "--datasets", "padchest"]) == 1
    assert (f"padchest: {root / 'padchest'}: dataset folder of 'padchest' not found (a symbolic link to "
            f"{tmp_path / 'nowhere'}, which is not there)") in capsys.readouterr().out


def test_a_relative_data_root_not_found_says_where_it_was_looked_for(tmp_path: Path, capsys, monkeypatch):
    """`data.root: ph` in a preset is read from the working folder, not the preset's."""
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "--root", "ph", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"unimed: config error: data root not found: ph (data.root or "
                                               f"--root, {tmp_path / 'ph'} from the working folder)")


def test_check_data_on_a_root_without_datasets_is_one_config_error(tmp_path: Path, capsys):
    assert main(["check-data", "--root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unimed: config error: no dataset under {tmp_path}: no official layout folder "
                   "and no sub-folder with a records.csv / records.jsonl (see docs/LAYOUTS.md)"]


@pytest.fixture()
def user_preset(tmp_path: Path) -> Path:
    write_images_and_table(tmp_path / "data" / "mine")
    preset = {
        "run": {"name": "mine", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"root": str(tmp_path / "data"), "pretrain_datasets": ["mine"], "image_size": 64,
                 "resize_size": 72, "max_length": 32, "progress": False,
                 "text_splits": ["train", "valid", "test"]},
        "vocab": {"english_vocab_size": 200, "new_terms": 10},
        "mlm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                "epochs": 1, "batch_size": 8, "max_length": 32},
        "method": {"name": "medunic", "image": {"encoder": "resnet10t"}, "text": {"frozen_layers": 1},
                   "projector": {"embed_dim": 16, "ctr_dim": 16, "hidden_dim": 32}},
        "train": {"epochs": 1, "batch_size": 4, "max_steps": 2, "log_every": 1,
                  "tensorboard": False},
        "eval": {"tasks": ["zero_shot", "linear_probe"], "baselines": [], "fractions": [1.0],
                 "min_train_images": 4, "bootstrap_resamples": 20,
                 "zero_shot": {"datasets": ["mine"], "classes": {"mine": ["Effusion"]}},
                 "linear_probe": {"datasets": ["mine"], "epochs": 2, "patience": 1}},
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    return path


def test_own_images_and_report_table_train_and_evaluate(user_preset: Path, tmp_path: Path, capsys, caplog):
    for stage in ("vocab", "mlm", "pretrain"):
        assert main([stage, str(user_preset), "--quiet"]) == 0, stage
    run = tmp_path / "runs" / "mine"
    assert main(["evaluate", str(run), "--quiet"]) == 0
    metrics = json.loads(next(run.rglob("metrics.json")).read_text(encoding="utf-8"))
    scored = metrics["encoders"]["medunic"]["tasks"]["zero_shot"]["mine"]["en"]
    images = scored["images"]
    assert scored["per_class"]["Effusion"]["labelled"] == images > 0
    assert 0.0 <= scored["auc"] <= 1.0 and metrics["encoders"]["medunic"]["tasks"]["linear_probe"]["mine"]

    # Labels from a report labeller: blank or uncertain for some rows. The protocol's default
    # stops naming the first; missing_labels=exclude scores the class on the others alone.
    from unimed.config import load_config
    from unimed.eval.data import EvalData

    table = tmp_path / "data" / "mine" / "records.csv"
    test = EvalData(load_config(str(user_preset)).data).records("mine", "test")
    assert images == len(test) >= 2
    uncertain = test[0].image_path.relative_to(table.parent).as_posix()
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    for i, row in enumerate(rows):
        if row["image"] == uncertain or i == 0:  # one test row uncertain, and a blank in any split
            row["Effusion"] = "-1" if row["image"] == uncertain else ""
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    test = EvalData(load_config(str(user_preset)).data).records("mine", "test")
    labelled = sum(r.labels["Effusion"] in (0.0, 1.0) for r in test)
    assert 0 < labelled < images == len(test)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--tasks", "zero_shot", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"(the first, {test[0].image_path}, is -1 (uncertain))" in err[0]
    assert err[0].endswith("(eval.zero_shot.missing_labels=exclude leaves such records out of the "
                           "class's scores)")
    assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.zero_shot.missing_labels=exclude",
                 "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    scored = metrics["encoders"]["medunic"]["tasks"]["zero_shot"]["mine"]["en"]
    assert (scored["per_class"]["Effusion"]["labelled"], scored["images"]) == (labelled, images)

    # Label columns the test split cannot score (never stated; positive in training only) are said
    # to be left out of the probe's macro AUC, not dropped from it without a word.
    in_test = {r.image_path for r in test}
    for i, row in enumerate(rows):  # Effusion as written first (both classes in the test split)
        row["Effusion"], row["Nodule"] = str(i % 2), ""
        row["Mass"] = str(int(table.parent / row["image"] not in in_test and i % 4 == 0))
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unimed.eval.linear_probe"):
        assert main(["evaluate", str(run), "--tasks", "linear_probe", "--quiet"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "unimed.eval.linear_probe"] == [
        f"linear probe mine: one class only (no positive, or no negative) in the {len(test)} test rows for "
        "Nodule, Mass: left out of the macro AUC, which covers Effusion"]


def test_a_text_or_pretraining_dataset_without_reports_is_said_to_add_nothing(user_preset: Path,
                                                                               tmp_path: Path, caplog):
    """A labelled set named among the pre-training datasets was passed over without a word."""
    from unimed.commands.train import pretrain_records
    from unimed.config import load_config
    from unimed.data.adapters import load_texts

    labels = tmp_path / "data" / "labels"
    (labels / "scans").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(labels / "scans" / "a.png")
    (labels / "records.csv").write_text("image,patient_id,Effusion\nscans/a.png,P1,1\n", encoding="utf-8")
    cfg = load_config(user_preset, ["data.pretrain_datasets=[mine,labels]"])
    with caplog.at_level(logging.WARNING, logger="unimed.data.adapters"):
        records = pretrain_records(cfg)
        texts = load_texts(cfg.data)
    assert records and {r.dataset for r in records} == {r.dataset for r in texts} == {"mine"}
    said = ("labels: none of its 1 records has a report, so it adds no reports and no pre-training pairs "
            "(a labelled set is read by the evaluation: eval.<task>.datasets)")
    assert [r.getMessage() for r in caplog.records if r.name == "unimed.data.adapters"
            and r.levelno == logging.WARNING] == [said, said]


def test_a_vocabulary_without_second_language_reports_says_what_to_do(user_preset: Path, capsys):
    assert main(["vocab", str(user_preset), "vocab.language=fr", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "unimed: config error: no fr reports (vocab.language) in mine (their languages: en, es); ")
    assert "set vocab.language to one your reports are in" in err[0]


def test_reports_in_a_third_language_are_said_to_add_no_vocabulary(user_preset: Path, tmp_path: Path, caplog):
    """The vocabulary is English plus vocab.language: French reports beside them were passed over
    without a word."""
    notes = tmp_path / "data" / "notes"
    notes.mkdir()
    reports = [("en", "Small left effusion."), ("es", "Derrame pleural izquierdo."),
               ("fr", "Petit épanchement pleural."), ("fr", "Les poumons sont clairs."),
               ("de", "Kleiner Erguss links.")]
    rows = [f"{text},{language},P{i}" for i, (language, text) in enumerate(reports * 4)]
    table = "report,language,patient_id\n" + "\n".join(rows) + "\n"
    (notes / "records.csv").write_text(table, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="unimed.commands.train"):
        assert main(["vocab", str(user_preset), "data.text_datasets=[notes]", "--quiet"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "unimed.commands.train"] == [
        "4 de report(s), 8 fr report(s) in notes add no terms: the vocabulary is English and one second "
        "language (vocab.language=es); mlm and pretrain still train on them, in the English and es pieces"]


def write_ct_table(folder: Path, n: int = 40) -> Path:
    """`n` small NIfTI CT volumes of n/2 patients with English and Spanish reports and a 'Covid'
    label that the report states (a bright patch in the lungs when it is 1)."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        covid = i % 2
        hu = np.full((16, 16, 6), -1000.0) + rng.normal(0, 20, (16, 16, 6))
        hu[4:12, 4:12] = 40.0 if not covid else -300.0
        volume = f"ct/{i}.nii.gz"
        (folder / "ct").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([2.0, 2.0, 5.0, 1.0])), str(folder / volume))
        language = "es" if i % 3 == 0 else "en"
        rows.append({"volume": volume, "report": REPORTS[language][1 - covid], "language": language,
                     "patient_id": f"C{i // 2:03d}", "Covid": covid})
    with (folder / "records.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_own_ct_volumes_train_unimedi_and_feed_the_3d_tasks_and_nothing_else(
        user_preset: Path, tmp_path: Path, capsys, caplog):
    """A table with a `volume` column: UniMedI pre-trains on its volumes and reports, the 3D probe
    reads its label column; a 2D method given it stops with one line naming the dataset."""
    from test_cli import TINY_UNIMEDI

    write_ct_table(tmp_path / "data" / "mine_ct")
    assert main(["check-data", "--root", str(tmp_path / "data"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "│ mine_ct " in out and "text-only" not in out  # its volumes are read and checked
    for stage in ("vocab", "mlm"):
        assert main([stage, str(user_preset), "--quiet"]) == 0, stage
    both = "data.pretrain_datasets=[mine,mine_ct]"
    assert main(["pretrain", str(user_preset), both, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"unimed: config error: data.pretrain_datasets: mine_ct holds CT volumes ({tmp_path}/data/mine_ct/ct/")
    assert err[0].endswith("method medunic pre-trains on 2D images (UniMedI reads volumes)")

    preset = yaml.safe_load(user_preset.read_text(encoding="utf-8"))
    preset["method"] = TINY_UNIMEDI["method"]
    preset["train"] |= {"epoch_steps": 2}
    unimedi = tmp_path / "mine_unimedi.yaml"
    unimedi.write_text(yaml.safe_dump(preset), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="unimed.methods.unimedi"):
        assert main(["pretrain", str(unimedi), "data.pretrain_datasets=[mine_ct]", "--quiet"]) == 0
    assert "UniMedI pre-trains on CT volumes only" in caplog.text
    run = tmp_path / "runs" / "mine"
    log = [json.loads(line) for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(math.isfinite(row["loss"]) for row in log)
    assert main(["evaluate", str(run), "--tasks", "volume_probe,volume_retrieval",
                 "eval.volume.probe_datasets=[mine_ct]", "eval.volume.retrieval_datasets=[mine_ct]",
                 "--quiet"]) == 0
    tasks = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["encoders"]["unimedi"]["tasks"]
    probe = tasks["volume_probe"]["mine_ct"]
    assert probe["metric"] == "auc" and sum(probe["volumes"].values()) == 40
    assert "mine_ct" in tasks["volume_retrieval"]


def test_unreadable_image_met_in_training_is_one_line_or_a_counted_skip(
    user_preset: Path, tmp_path: Path, capsys, caplog
):
    """A JPEG cut short after the adapters read the table (no image check): with two loader
    workers, `on_error=raise` stops pre-training with one line naming the file, and
    `on_error=skip` trains on, naming the file and counting it."""
    from unimed.commands.train import pretrain_records
    from unimed.config import load_config

    for stage in ("vocab", "mlm"):
        assert main([stage, str(user_preset), "--quiet"]) == 0, stage
    cfg = load_config(str(user_preset), [])
    broken = next(r.image_path for r in pretrain_records(cfg) if r.image_path.suffix == ".jpg")
    broken.write_bytes(broken.read_bytes()[:200])
    every_pair = ["train.max_steps=null", "data.num_workers=2", "--quiet"]
    capsys.readouterr()
    gc.disable()  # the error's reference cycles stay uncollected, as they may until a process exits
    try:
        assert main(["pretrain", str(user_preset), *every_pair]) == 2
    finally:
        gc.enable()
    # The loader's workers ended with training: Python's exit would wait for them forever (they
    # ignore the SIGTERM it sends), so the command would print its line and never return.
    assert not multiprocessing.active_children()
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unimed:")]
    assert len(ours) == 1 and ours[0].startswith(f"unimed: data error: {broken}: cannot read image")
    assert "Traceback" not in err
    shutil.rmtree(tmp_path / "runs" / "mine" / "pretrain")
    caplog.clear()
    assert main(["pretrain", str(user_preset), "data.on_error=skip", *every_pair]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped in training" in r.getMessage()]
    assert len(skipped) == 1 and str(broken) in skipped[0]  # named once, whatever the epochs
    summary = [r.getMessage() for r in caplog.records if "could not be read and were" in r.getMessage()]
    assert len(summary) == 1 and re.fullmatch(r"\d+ sample\(s\) could not be read and were replaced in "
                                              r"training \(data\.on_error=skip\): 1 file\(s\), each "
                                              r"named above", summary[0]), summary
