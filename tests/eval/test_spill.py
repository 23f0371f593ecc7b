"""Splits too large to hold go to disk (``EvalData.spill_dir``): slice stacks and 2D images are
written once, memory-mapped back, equal to the held ones, shared by a second process of the run, and
the tasks score a spilled split as a held one (the 3D tasks that need a split whole: fine-tuning,
slice localisation, slice selection; the 2D feature tasks)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from benchmark_scripts import benchmark_script
from eval_helpers import IMAGE_SIZE, short_config

from unimed.data.config import DataConfig
from unimed.data.volumes import read_volume
from unimed.eval import data as data_module
from unimed.eval import segmentation, volume_finetune, volumes
from unimed.eval.config import (
    EvalConfig,
    LinearProbeConfig,
    VolumeConfig,
    VolumeFinetuneConfig,
    VolumeSegmentationConfig,
)
from unimed.eval.data import EvalData
from unimed.eval.dense import dense_features
from unimed.eval.errors import EvalError
from unimed.eval.features import FeatureCache
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.world import write_ct_world

WINDOW = (-1000.0, 400.0)
SLICES = 4
PER_RECORD = SLICES * IMAGE_SIZE**2 * 4  # bytes of one record's float32 stack


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("ct_world")
    cfg = PhantomConfig(root=str(root), seed=5, ct=CTConfig(
        enabled=True, shape=(16, 32, 32), bimcv_studies=16, ccii_studies=30, luna_studies=30, bcv_studies=8))
    write_ct_world(cfg, root, progress=False)
    return DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, progress=False)


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path` (/proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The volume files read from now on, in order."""
    read: list[Path] = []

    def counted(path, *args, **kwargs):
        read.append(Path(path))
        return read_volume(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "read_volume", counted)
    return read


def test_stacks_larger_than_half_the_memory_are_mapped_from_one_file_written_once(world, tmp_path, monkeypatch):
    held_data = EvalData(world)
    held = held_data.slice_stacks("luna16-candidates", "train", SLICES, WINDOW)
    depths = held_data.native_depths("luna16-candidates", "train")
    spill = tmp_path / "spill"
    monkeypatch.setattr(data_module, "available_memory", lambda: len(held) * PER_RECORD * 2 - 1)
    monkeypatch.setattr(data_module, "STREAM_PIECE_BYTES", 5 * PER_RECORD)  # several pieces
    read = counting_reads(monkeypatch)
    data = EvalData(world, spill_dir=spill)
    stacks = data.slice_stacks("luna16-candidates", "train", SLICES, WINDOW)
    [file] = spill.glob("*.npy")
    assert mapped_from(stacks, file) and not mapped_from(held, file)
    torch.testing.assert_close(stacks, held, rtol=0, atol=0)
    series = {r.image_path for r in data.require("luna16-candidates", "train")}
    assert sorted(read) == sorted(series)  # each series read once, for all its candidates
    assert data.native_depths("luna16-candidates", "train") == depths
    assert sorted(p.name for p in spill.iterdir() if not p.name.startswith(".")) == sorted(
        [file.name, file.stem + ".depths.json"])  # and a lock file (hidden): nothing half-written
    read.clear()
    other = EvalData(world, spill_dir=spill)  # another worker process of the run
    torch.testing.assert_close(other.slice_stacks("luna16-candidates", "train", SLICES, WINDOW), held,
                               rtol=0, atol=0)
    assert read == [] and other.native_depths("luna16-candidates", "train") == depths


def test_stacks_at_another_side_spill_to_a_file_of_their_own(world, tmp_path, monkeypatch):
    """A native 3D model's stacks (its own side, ``Encoder.volume_grid``) and the adapter's
    stacks of the same split and depth are two files, each read back at its own side."""
    side = IMAGE_SIZE // 2
    held = EvalData(world).slice_stacks("cc-ccii", "train", SLICES, WINDOW)
    held_small = EvalData(world).slice_stacks("cc-ccii", "train", SLICES, WINDOW, side)
    monkeypatch.setattr(data_module, "available_memory", lambda: 1)  # every split spills
    data = EvalData(world, spill_dir=tmp_path)
    small = data.slice_stacks("cc-ccii", "train", SLICES, WINDOW, side)
    large = data.slice_stacks("cc-ccii", "train", SLICES, WINDOW)
    assert small.shape[-2:] == (side, side) and large.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2 and {mapped_from(small, f) for f in files} == {True, False}
    torch.testing.assert_close(small, held_small, rtol=0, atol=0)
    torch.testing.assert_close(large, held, rtol=0, atol=0)
    again = EvalData(world, spill_dir=tmp_path)  # another worker of the run reads both back
    torch.testing.assert_close(again.slice_stacks("cc-ccii", "train", SLICES, WINDOW, side), held_small,
                               rtol=0, atol=0)


def test_two_workers_that_need_the_same_split_decode_it_once(world, tmp_path, monkeypatch):
    """The second waits for the first's file (a lock beside it) instead of decoding the split too."""
    held = EvalData(world).slice_stacks("cc-ccii", "train", SLICES, WINDOW)
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * PER_RECORD)
    read = counting_reads(monkeypatch)
    counted = data_module.read_volume

    def slow(path, *args, **kwargs):
        time.sleep(0.02)  # both workers would be decoding at once without the lock
        return counted(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "read_volume", slow)
    start = threading.Barrier(2)
    results: list[torch.Tensor] = []

    def worker() -> None:
        data = EvalData(world, spill_dir=tmp_path)
        start.wait()
        results.append(data.slice_stacks("cc-ccii", "train", SLICES, WINDOW))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and len(read) == len(held)  # one volume per record, read once
    for stacks in results:
        torch.testing.assert_close(stacks, held, rtol=0, atol=0)


def test_pieces_and_embeddings_of_a_spilled_split_equal_the_held_ones(world, tiny_encoder, tmp_path, monkeypatch):
    held_data = EvalData(world)
    held = held_data.slice_stacks("luna16-candidates", "train", SLICES, WINDOW)
    expected = FeatureCache().volumes(tiny_encoder, held_data, "luna16-candidates", "train", space="pooled",
                                      slices=SLICES, window=WINDOW, batch_size=16)
    monkeypatch.setattr(data_module, "available_memory", lambda: len(held) * PER_RECORD)
    monkeypatch.setattr(data_module, "STREAM_PIECE_BYTES", 5 * PER_RECORD)
    data = EvalData(world, spill_dir=tmp_path)
    pieces = list(data.stack_pieces("luna16-candidates", "train", SLICES, WINDOW))
    assert len(pieces) > 2 and sorted(i for indices, _ in pieces for i in indices) == list(range(len(held)))
    [file] = tmp_path.glob("*.npy")
    for indices, stacks in pieces:
        assert not mapped_from(stacks, file)  # a copy of one piece, not the mapping
        torch.testing.assert_close(stacks, held[indices], rtol=0, atol=0)
    read = counting_reads(monkeypatch)
    spilled = FeatureCache().volumes(tiny_encoder, data, "luna16-candidates", "train", space="pooled",
                                     slices=SLICES, window=WINDOW, batch_size=16)
    assert read == []  # the file, not the volumes again
    torch.testing.assert_close(spilled, expected)


def test_native_slices_beyond_half_the_memory_go_to_disk_one_file_per_volume(world, tmp_path, monkeypatch):
    held = EvalData(world).native_slices("bimcv-covid19", "test", WINDOW)
    budget = sum(s.nbytes for s in held[:2])
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * budget)
    spilled = EvalData(world, spill_dir=tmp_path).native_slices("bimcv-covid19", "test", WINDOW)
    files = sorted(tmp_path.glob("*.npy"))
    assert 0 < len(files) == len(held) - 2  # two volumes fit the budget (which two: whichever came first)
    mapped = [any(mapped_from(s, f) for f in files) for s in spilled]
    assert sum(mapped) == len(files)
    for stack, expected in zip(spilled, held):
        torch.testing.assert_close(stack, expected, rtol=0, atol=0)


def test_fine_tuning_localisation_and_selection_score_a_spilled_split_as_a_held_one(
        world, tiny_encoder, tmp_path, monkeypatch):
    eval_cfg = EvalConfig(tasks=("volume_finetune", "slice_localisation"), bootstrap_resamples=20,
                          volume=VolumeConfig(slices=SLICES),
                          volume_finetune=VolumeFinetuneConfig(slices=2, epochs=2, patience=2, batch_size=4))

    def tasks(data: EvalData) -> dict:
        out = evaluate([tiny_encoder], TaskContext(data, eval_cfg, tmp_path / "eval"), eval_cfg.tasks)
        return json.loads(json.dumps(out["encoders"]["tiny"]["tasks"]))

    held = tasks(EvalData(world))
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * PER_RECORD)  # nothing fits
    spill = tmp_path / "spill"
    whole_splits = []  # per fine-tuning on a whole training split: whether it trained on the mapping
    fine_tune = volume_finetune.fine_tune

    def spy(encoder, train, *args, **kwargs):
        if len(train[1]) == len(data.require(kwargs["desc"].split()[0], "train")):
            whole_splits.append(any(mapped_from(train[0], f) for f in spill.glob("*-train-*.npy")))
        return fine_tune(encoder, train, *args, **kwargs)

    monkeypatch.setattr(volume_finetune, "fine_tune", spy)
    data = EvalData(world, spill_dir=spill)
    spilled = tasks(data)
    assert spilled == held and held["volume_finetune"]["cc-ccii"]["fractions"]["100%"]["train_images"] > 0
    assert whole_splits and all(whole_splits)  # the training splits themselves, not copies
    assert len(list(spill.glob("*.npy"))) >= 6  # CC-CCII's and LUNA16's three splits, BIMCV's slices
    stacks = torch.from_numpy(np.load(next(spill.glob("cc-ccii-test-*.npy"))))
    rows = [3, 0, 5, 4]
    model = torch.nn.Module()
    model.selection_k = 2
    model.slice_attention = lambda v: v.mean((2, 3, 4)) + torch.arange(v.shape[1]) * 1e-3
    encoder = type("Stub", (), {"model": model, "device": torch.device("cpu"), "name": "stub"})()
    assert (volumes.model_selection(encoder, stacks, 2, 0, rows)
            == volumes.model_selection(encoder, stacks[rows], 2, 0))


def test_an_unwritable_spill_folder_is_one_error_naming_the_file(world, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * PER_RECORD)
    data = EvalData(world, spill_dir=blocker / "spill")
    with pytest.raises(EvalError,
                       match=rf"cc-ccii/test: \d+ volumes x {SLICES} slices of {IMAGE_SIZE} px: cannot write "
                             rf"{blocker}/spill/cc-ccii-test-"):
        data.slice_stacks("cc-ccii", "test", SLICES, WINDOW)


def test_a_spill_the_disk_cannot_hold_is_one_error_before_any_reading(world, tmp_path, monkeypatch):
    records = len(EvalData(world).require("cc-ccii", "train"))
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * PER_RECORD)
    monkeypatch.setattr(data_module.shutil, "disk_usage",
                        lambda path: SimpleNamespace(free=records * PER_RECORD - 1))
    read = counting_reads(monkeypatch)
    with pytest.raises(EvalError, match=rf"cc-ccii/train: {records} volumes x {SLICES} slices of {IMAGE_SIZE} px "
                                        r"take 0.0 GB, more than half the memory available and more than the "
                                        rf"0.0 GB free on the disk of {tmp_path / 'spill'}; evaluate on a subset"):
        EvalData(world, spill_dir=tmp_path / "spill").slice_stacks("cc-ccii", "train", SLICES, WINDOW)
    assert read == [] and not list((tmp_path / "spill").glob("*.npy"))


def test_2d_images_larger_than_half_the_memory_are_mapped_from_disk_and_score_as_held(
        eval_data, tiny_encoder, tmp_path, monkeypatch):
    cfg = EvalConfig(tasks=("zero_shot", "linear_probe", "retrieval"), min_train_images=8, bootstrap_resamples=20,
                     fractions=(0.1, 1.0), linear_probe=LinearProbeConfig(epochs=3, patience=2))

    def tasks(data: EvalData) -> dict:
        out = evaluate([tiny_encoder], TaskContext(data, cfg, tmp_path / "eval"), cfg.tasks)
        return json.loads(json.dumps(out["encoders"]["tiny"]["tasks"]))

    held_data = EvalData(eval_data.cfg)
    held = tasks(held_data)
    held_images = held_data.images("chexpert", "train")
    monkeypatch.setattr(data_module, "available_memory", lambda: IMAGE_SIZE**2 * 4)  # not one image
    spill = tmp_path / "spill"
    data = EvalData(eval_data.cfg, spill_dir=spill)
    assert tasks(data) == held
    images = data.images("chexpert", "train")
    [file] = spill.glob("chexpert-train-*.npy")
    assert mapped_from(images, file)
    torch.testing.assert_close(images, held_images, rtol=0, atol=0)
    monkeypatch.setattr(data_module, "load_image", None)  # another worker reads the file, not the images
    torch.testing.assert_close(EvalData(eval_data.cfg, spill_dir=spill).images("chexpert", "train"), held_images,
                               rtol=0, atol=0)


def test_dense_maps_larger_than_half_the_memory_are_mapped_from_disk_and_score_as_held(
        eval_data, tiny_encoder, tmp_path, monkeypatch):
    base = EvalConfig(tasks=("segmentation", "detection"), bootstrap_resamples=20)
    cfg = short_config(TaskContext(eval_data, base, tmp_path))

    def tasks(data: EvalData) -> dict:
        out = evaluate([tiny_encoder], TaskContext(data, cfg, tmp_path / "eval"), cfg.tasks)
        return json.loads(json.dumps(out["encoders"]["tiny"]["tasks"]))

    held = tasks(EvalData(eval_data.cfg))
    monkeypatch.setattr(data_module, "available_memory", lambda: IMAGE_SIZE**2 * 4)
    spill = tmp_path / "spill"
    whole_splits = []  # per head trained on all of RSNA's training maps: whether on the mapped files
    fit_decoder = segmentation.fit_decoder

    def spy(train, *args, **kwargs):
        if len(train[1]) == len(eval_data.records("rsna", "train")):
            files = list(spill.glob("tiny-rsna-*.npy"))
            whole_splits.append(all(any(mapped_from(m, f) for f in files) for m in train[0]))
        return fit_decoder(train, *args, **kwargs)

    monkeypatch.setattr(segmentation, "fit_decoder", spy)
    assert tasks(EvalData(eval_data.cfg, spill_dir=spill)) == held
    assert whole_splits == [True]  # the 100 % row; the 50 % row trains on a copy of its half
    assert len(list(spill.glob("tiny-rsna-*.npy"))) >= 3 * 2  # two or more levels of each split


def test_maps_larger_than_the_memory_without_a_spill_folder_are_one_error(eval_data, tiny_encoder, monkeypatch):
    images = EvalData(eval_data.cfg).images("rsna", "valid", "full")
    monkeypatch.setattr(data_module, "available_memory", lambda: 1024)
    allocate = EvalData(eval_data.cfg).allocator("tiny", "rsna", "valid", what="tiny's maps of rsna/valid")
    with pytest.raises(EvalError, match=rf"tiny's maps of rsna/valid \({len(images)}, \d+, \d+, \d+\) take 0.0 GB in "
                                        "memory, more than the 0.0 GB available"):
        dense_features(tiny_encoder, images, batch_size=16, allocate=allocate)


def test_bcv_volumes_labels_and_maps_larger_than_half_the_memory_go_to_disk_and_score_as_held(
        world, tiny_encoder, tmp_path, monkeypatch):
    section = VolumeSegmentationConfig(depth=4, feature_size=4, epochs=1, patience=1, min_epoch_steps=1,
                                       fractions=(0.5, 1.0))
    cfg = EvalConfig(tasks=("volume_segmentation",), bootstrap_resamples=20, volume_segmentation=section)

    def tasks(data: EvalData) -> dict:
        out = evaluate([tiny_encoder], TaskContext(data, cfg, tmp_path / "eval"), cfg.tasks)
        return json.loads(json.dumps(out["encoders"]["tiny"]["tasks"]))

    held = tasks(EvalData(world))
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * PER_RECORD)
    spill = tmp_path / "spill"
    data = EvalData(world, spill_dir=spill)
    assert tasks(data) == held and held["volume_segmentation"]["bcv"]["fractions"]["100%"]["value"] is not None
    volumes, labels = data.labelled_volumes("bcv", "train", 4, section.window)
    files = list(spill.glob("bcv-train-*.npy"))
    assert any(mapped_from(volumes, f) for f in files) and any(mapped_from(labels, f) for f in files)
    assert list(spill.glob("tiny-bcv-*.npy")) and list(spill.glob("bcv-test-*.npy"))  # maps, class maps


def test_the_memory_benchmark_measures_a_held_and_a_spilled_run_whose_metrics_agree(
        eval_data, tiny_encoder, monkeypatch):
    monkeypatch.setattr(data_module, "available_memory", data_module.available_memory)  # restored after
    cfg = SimpleNamespace(data=eval_data.cfg, eval=EvalConfig(bootstrap_resamples=20))
    with benchmark_script("eval_memory") as script:
        held = script.measure([tiny_encoder], cfg, ("zero_shot",), None)
        spilled = script.measure([tiny_encoder], cfg, ("zero_shot",), IMAGE_SIZE**2 * 4)
    assert held["files"] == 0 < spilled["files"] and spilled["spilled"] > 0
    assert json.dumps(held["tasks"], sort_keys=True) == json.dumps(spilled["tasks"], sort_keys=True)
    assert held["wall"] > 0 and 0 < held["anon"] <= held["maxrss"]
