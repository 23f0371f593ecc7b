"""A user's own records table through the evaluation: linear probe by AUC over its label columns,
zero-shot with its own class names."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import IMAGE_SIZE
from PIL import Image

from unimed.data.config import DataConfig
from unimed.eval import linear_probe, zero_shot
from unimed.eval.config import EvalConfig, LinearProbeConfig, ZeroShotConfig
from unimed.eval.data import EvalData
from unimed.eval.errors import EvalError
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext


def write_table(root: Path, labels: bool = True) -> Path:
    """40 PNG images of 20 patients; 'Effusion' and 'Nodule' 0/1 labels; splits carved."""
    folder = root / "mine"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        image = f"img/{i}.png"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)).save(
            folder / image)
        row = {"image": image, "report": f"finding number {i} here", "language": "en",
               "patient_id": f"p{i // 2}"}
        if labels:
            row |= {"Effusion": i % 2, "Nodule": (i // 2) % 2}
        rows.append(row)
    with (folder / "records.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _context(root: Path, tmp_path: Path, **cfg) -> TaskContext:
    data = EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=72, progress=False))
    return TaskContext(data, EvalConfig(min_train_images=4, fractions=(1.0,),
                                        bootstrap_resamples=20, **cfg), tmp_path / "out")


def test_linear_probe_scores_every_label_column_of_a_generic_table(tiny_encoder, tmp_path: Path):
    ctx = _context(write_table(tmp_path / "data"), tmp_path,
                   linear_probe=LinearProbeConfig(datasets=("mine",), epochs=2, patience=1))
    assert linear_probe.label_target(ctx.data.records("mine", "train"), "mine") == \
        linear_probe.ProbeTarget("auc", ("Effusion", "Nodule"))
    out = linear_probe.run(tiny_encoder, ctx)
    row = out["mine"]["fractions"]["100%"]
    assert out["mine"]["metric"] == "auc" and 0.0 <= row["value"] <= 1.0
    assert row["train_images"] == len(ctx.data.records("mine", "train"))


def test_linear_probe_of_a_table_without_labels_is_an_eval_error(tiny_encoder, tmp_path: Path):
    ctx = _context(write_table(tmp_path / "data", labels=False), tmp_path,
                   linear_probe=LinearProbeConfig(datasets=("mine",)))
    with pytest.raises(EvalError, match="no linear-probe target for 'mine': its records have no"):
        linear_probe.run(tiny_encoder, ctx)


def test_zero_shot_with_the_users_class_names(tiny_encoder, tmp_path: Path):
    ctx = _context(write_table(tmp_path / "data"), tmp_path,
                   zero_shot=ZeroShotConfig(datasets=("mine",), languages=("en", "es"),
                                            classes={"mine": ["Effusion", "Nodule"]}))
    out = zero_shot.run(tiny_encoder, ctx)
    test = ctx.data.records("mine", "test")
    for language in ("en", "es"):
        result = out["mine"][language]
        assert result["images"] == len(test) and set(result["per_class"]) == {"Effusion", "Nodule"}
        assert result["per_class"]["Effusion"]["positives"] == sum(r.labels["Effusion"] for r in test)


def test_a_table_of_volumes_in_a_2d_task_is_named(tiny_encoder, tmp_path: Path):
    import nibabel as nib

    folder = tmp_path / "data" / "ct"
    folder.mkdir(parents=True)
    hu = np.full((8, 8, 4), -1000, dtype=np.int16)
    rows = ["volume,patient_id,Covid"]
    for i in range(10):
        nib.save(nib.Nifti1Image(hu, np.eye(4)), str(folder / f"{i}.nii.gz"))
        rows.append(f"{i}.nii.gz,p{i},{i % 2}")
    (folder / "records.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ctx = _context(tmp_path / "data", tmp_path, linear_probe=LinearProbeConfig(datasets=("ct",)))
    with pytest.raises(EvalError, match=r"ct/train: .*\.nii\.gz is a volume; the 2D tasks need images"):
        linear_probe.run(tiny_encoder, ctx)


def test_unusable_zero_shot_labels_fail_before_any_task_runs(tiny_encoder, tmp_path: Path):
    root = write_table(tmp_path / "data")
    table = root / "mine" / "records.csv"
    lines = table.read_text(encoding="utf-8").splitlines()
    lines[1:] = [line[: line.rindex(",")] + "," for line in lines[1:]]  # every 'Nodule' blank
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ctx = _context(root, tmp_path, linear_probe=LinearProbeConfig(datasets=("mine",)),
                   zero_shot=ZeroShotConfig(datasets=("mine",), classes={"mine": ["Nodule"]}))
    with pytest.raises(EvalError, match=r"mine \(test\): none of the \d+ records scored states a label "
                                         r"'Nodule' \(the labels they state: Effusion\)$"):
        evaluate([tiny_encoder], ctx, ("linear_probe", "zero_shot"))
    assert ctx.data.splits_read() == []  # the linear probe never read an image
