"""The store of finished evaluation jobs: what keys a job, what makes a kept one stale, and a kept
job read back as it was written (the command-level resume: tests/test_pretrained.py)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unimed.data.config import DataConfig
from unimed.eval.data import EvalData
from unimed.eval.jobs import JobStore, context_identity, encoder_identity

METRICS = {"zero_shot": {"auc": 0.75, "ci": {"auc": [0.7, 0.8]}, "figures": {"curve": "zs/curve.png"}}}
SECONDS = {"zero_shot": 1.5}
REPLICATES = {"tiny/zero_shot/auc": np.linspace(0.6, 0.9, 7)}


class Records:
    """The part of EvalData a kept job is checked against: the datasets' fingerprints."""

    def __init__(self, **fingerprints: str) -> None:
        self.fingerprints = fingerprints

    def fingerprint(self, dataset: str) -> str:
        return self.fingerprints[dataset]


def _saved(tmp_path: Path) -> tuple[JobStore, Path]:
    figures = tmp_path / "eval"
    (figures / "zs").mkdir(parents=True)
    (figures / "zs" / "curve.png").write_bytes(b"a figure")
    store = JobStore(tmp_path / "jobs", context_identity({"seed": 0}))
    store.save("job", (METRICS, SECONDS, REPLICATES), [("cxp500", "test")], {"cxp500": "same"}, figures)
    shutil.rmtree(figures)
    return store, figures


def test_a_kept_job_reads_back_as_written_with_its_figures(tmp_path: Path) -> None:
    store, figures = _saved(tmp_path)
    (metrics, seconds, replicates), splits = store.load("job", Records(cxp500="same"), figures)
    assert metrics == METRICS and seconds == SECONDS and splits == [("cxp500", "test")]
    assert list(replicates) == list(REPLICATES)
    np.testing.assert_array_equal(replicates["tiny/zero_shot/auc"], REPLICATES["tiny/zero_shot/auc"])
    assert (figures / "zs" / "curve.png").read_bytes() == b"a figure"
    assert store.load("other", Records(cxp500="same"), figures) is None


def test_a_kept_job_whose_records_changed_or_that_cannot_be_read_runs_again(tmp_path: Path, caplog) -> None:
    store, figures = _saved(tmp_path)
    with caplog.at_level(logging.INFO):
        assert store.load("job", Records(cxp500="relabelled"), figures) is None
    assert "the records of cxp500 changed" in caplog.text
    (store.folder / "job" / "figures" / "zs" / "curve.png").unlink()
    with caplog.at_level(logging.WARNING):
        assert store.load("job", Records(cxp500="same"), figures) is None
    assert "cannot be read" in caplog.text and "curve.png" in caplog.text
    caplog.clear()
    (store.folder / "job" / "result.json").write_text('{"metrics": ')
    with caplog.at_level(logging.WARNING):
        assert store.load("job", Records(cxp500="same"), figures) is None
    assert "cannot be read" in caplog.text
    store.clear()
    assert not store.folder.exists()


@pytest.mark.parametrize("size", [0, 200])
def test_a_kept_job_whose_replicates_file_is_truncated_runs_again(tmp_path: Path, caplog, size: int) -> None:
    """A truncated replicates.npz raised numpy's BadZipFile / EOFError, a traceback on the rerun."""
    store, figures = _saved(tmp_path)
    path = store.folder / "job" / "replicates.npz"
    path.write_bytes(path.read_bytes()[:size])
    with caplog.at_level(logging.WARNING):
        assert store.load("job", Records(cxp500="same"), figures) is None
    assert f"the evaluation job kept in {store.folder / 'job'} cannot be read" in caplog.text


def test_an_unwritable_store_is_said_and_the_evaluation_goes_on(tmp_path: Path, caplog) -> None:
    (tmp_path / "jobs").write_text("a file where the store's folder goes")
    store = JobStore(tmp_path / "jobs", "context")
    with caplog.at_level(logging.WARNING):
        store.save("job", (METRICS, SECONDS, REPLICATES), [], {}, tmp_path)
    assert "cannot keep the finished evaluation job" in caplog.text


def test_the_key_follows_the_config_the_prompts_the_encoder_and_the_tasks(tmp_path: Path,
                                                                           tiny_encoder) -> None:
    prompts = tmp_path / "en.yaml"
    prompts.write_text("pleural effusion: [effusion]\n")
    context = context_identity({"seed": 0}, files=[prompts])
    assert context == context_identity({"seed": 0}, files=[prompts])
    assert context != context_identity({"seed": 1}, files=[prompts])
    prompts.write_text("pleural effusion: [pleural effusion]\n")
    assert context != context_identity({"seed": 0}, files=[prompts])
    store = JobStore(tmp_path, context)
    identity = encoder_identity(tiny_encoder)
    assert store.key(identity, ("zero_shot",)) != store.key(identity, ("retrieval", "bias"))
    assert JobStore(tmp_path, "another").key(identity, ("zero_shot",)) != store.key(identity, ("zero_shot",))
    changed = dataclasses.replace(tiny_encoder, model=copy.deepcopy(tiny_encoder.model))
    assert encoder_identity(changed) == identity
    with torch.no_grad():
        weight = next(changed.model.parameters())
        weight[(0,) * weight.dim()] += 1e-3
    assert encoder_identity(changed) != identity
    assert encoder_identity(dataclasses.replace(tiny_encoder, max_length=16)) != identity


def test_a_datasets_fingerprint_follows_its_records_and_files(tiny_world: Path, tmp_path: Path) -> None:
    root = tmp_path / "world"
    shutil.copytree(tiny_world / "cxp500", root / "cxp500")
    cfg = DataConfig(root=str(root), progress=False)
    first = EvalData(cfg).fingerprint("cxp500")
    assert EvalData(cfg).fingerprint("cxp500") == first
    table = root / "cxp500" / "test_labels.csv"
    rows = table.read_text().splitlines()
    row = rows[1].split(",")
    row[-1] = "1" if row[-1] == "0" else "0"  # Support Devices of the first image
    table.write_text("\n".join([rows[0], ",".join(row), *rows[2:]]) + "\n")
    relabelled = EvalData(cfg).fingerprint("cxp500")
    assert relabelled != first
    image = EvalData(cfg).records("cxp500")[0].image_path
    image.write_bytes(image.read_bytes() + b"\0")
    assert EvalData(cfg).fingerprint("cxp500") != relabelled


def test_the_datasets_a_block_asks_for_are_noted(eval_data: EvalData) -> None:
    with eval_data.asking() as outer:
        eval_data.records("cxp500", "test")
        with eval_data.asking() as inner:
            eval_data.records("pdc")
    assert outer == {"cxp500", "pdc"} and inner == {"pdc"}
    eval_data.records("rsna")
    assert "rsna" not in outer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_every_tensor_type_hashes(dtype, tiny_encoder) -> None:
    model = torch.nn.Module()
    model.register_buffer("values", torch.ones(3, 2).to(dtype))
    encoder = dataclasses.replace(tiny_encoder, model=model)
    assert len(encoder_identity(encoder)) == 64
