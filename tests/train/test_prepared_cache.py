"""The on-disk cache of prepared inputs (CT volumes, decoded X-rays): bit-identical items, one
source read per file and preparation, no stale entries, damaged entries rebuilt, bad sources and
folders named."""

import dataclasses
import functools
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PIL import Image

import unimed.data.pretrain
import unimed.data.volume_pretrain
from unimed.data.config import DataConfig
from unimed.data.errors import DataError
from unimed.data.images import load_image
from unimed.data.prepared_cache import PreparedCache
from unimed.data.pretrain import CachedImageLoader, build_pretrain_dataset
from unimed.data.volume_pretrain import VolumePretrainDataset, cache_tag, load_volume_slices
from unimed.data.volumes import volume_files

from train_helpers import make_tokenizer, write_records, write_volume_records

SHAPE = (4, 8, 8)
WINDOW = (-1000.0, 400.0)


@pytest.fixture()
def world(tmp_path):
    return make_tokenizer(tmp_path), write_volume_records(tmp_path, 4)


@pytest.fixture()
def source_reads(monkeypatch):
    """Paths handed to the volume reader, in order."""
    reads = []
    real = unimed.data.volume_pretrain.read_volume

    def counted(path, **kwargs):
        reads.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(unimed.data.volume_pretrain, "read_volume", counted)
    return reads


def _dataset(world, cache, shape=SHAPE):
    tokenizer, records = world
    return VolumePretrainDataset(records, tokenizer, max_length=8, shape=shape, window=WINDOW,
                                 cache=cache)


def _volumes(dataset):
    return [dataset[i]["volume"] for i in range(len(dataset))]


def test_cached_items_equal_uncached_and_each_source_is_read_once(world, tmp_path, source_reads):
    plain = _volumes(_dataset(world, None))
    assert len(source_reads) == 4
    folder = tmp_path / "cache"
    first = _volumes(_dataset(world, folder))
    assert len(source_reads) == 8 and len(list(folder.glob("*.npy"))) == 4
    again = _volumes(_dataset(world, folder))  # a new dataset, as a new epoch's workers or run
    assert len(source_reads) == 8
    for a, b, c in zip(plain, first, again):
        assert a.dtype == torch.float32 and a.shape == (1, *SHAPE)
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not list(folder.glob("*.tmp"))


def test_another_preparation_or_a_changed_source_is_not_read_from_stale_entries(world, tmp_path,
                                                                               source_reads):
    folder = tmp_path / "cache"
    _volumes(_dataset(world, folder))
    larger = _volumes(_dataset(world, folder, shape=(4, 12, 12)))
    assert len(source_reads) == 8 and len(list(folder.glob("*.npy"))) == 8
    assert larger[0].shape == (1, 4, 12, 12)
    _, records = world
    path = records[0].image_path
    image = nib.load(str(path))
    changed = np.full(image.shape, -1000.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(changed, image.affine), str(path))
    os.utime(path, ns=(1, 1))  # a new modification time even on a coarse clock
    cached = _dataset(world, folder)
    volume = cached[0]["volume"]
    assert source_reads[-1] == path and len(source_reads) == 9
    assert torch.equal(volume, torch.zeros_like(volume))  # all air: 0 after the window


def test_a_file_rewritten_in_a_folder_source_is_not_read_from_a_stale_entry(tmp_path):
    """A folder source (a DICOM series, slice images) keeps its own modification time when a file
    in it is rewritten in place: the entry is keyed by its files'."""
    scan = tmp_path / "scan"
    scan.mkdir()
    for k in range(3):
        Image.fromarray(np.full((6, 6), 40 * k, dtype=np.uint8)).save(scan / f"{k:04d}.png")
    cache = PreparedCache(tmp_path / "cache", "t")
    first = cache.entry(scan)
    assert cache.entry(scan) == first
    folder_time = scan.stat().st_mtime_ns
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(scan / "0001.png")
    os.utime(scan / "0001.png", ns=(1, 1))  # a new modification time even on a coarse clock
    os.utime(scan, ns=(folder_time, folder_time))
    assert cache.entry(scan) != first


def test_a_metaimage_whose_data_file_is_rewritten_is_not_read_from_a_stale_entry(tmp_path):
    """A .mhd header names its voxels' .raw: the entry was keyed by the header alone, so a .raw
    written again (the header as it was) was served from the cache."""
    header = tmp_path / "ct.mhd"
    hu = np.full((4, 8, 8), -1000, np.int16)
    hu[:, 2:6, 2:6] = 40
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(header))
    cache = PreparedCache(tmp_path / "cache", cache_tag(SHAPE, WINDOW), files=volume_files)
    prepare = functools.partial(load_volume_slices, shape=SHAPE, window=WINDOW)
    first = cache.load(header, prepare)
    assert np.array_equal(cache.load(header, prepare), first)
    header_time = header.stat().st_mtime_ns
    hu[:, 2:6, 2:6] = 400
    (tmp_path / "ct.raw").write_bytes(hu.tobytes())
    os.utime(tmp_path / "ct.raw", ns=(1, 1))  # a new modification time even on a coarse clock
    assert header.stat().st_mtime_ns == header_time
    again = cache.load(header, prepare)
    assert not np.array_equal(again, first) and np.array_equal(again, prepare(header))


def test_a_damaged_entry_is_prepared_again_with_a_warning(world, tmp_path, caplog):
    folder = tmp_path / "cache"
    first = _volumes(_dataset(world, folder))
    _, records = world
    entry = PreparedCache(folder, cache_tag(SHAPE, WINDOW)).entry(records[0].image_path)
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="unimed.data.prepared_cache"):
        again = _dataset(world, folder)[0]["volume"]
    assert torch.equal(again, first[0])
    assert str(entry) in caplog.text and "unreadable" in caplog.text
    assert np.array_equal(np.load(entry), first[0][0].numpy())


@pytest.mark.parametrize("overwrite, said", [
    (np.zeros((2, 8, 8), np.float32), "a float32 array of shape (2, 8, 8), not float32 4 x 8 x 8"),
    (np.full(SHAPE, -1000.0, np.float32), "values -1000 .. -1000, outside 0 .. 1"),  # HU, not windowed
    (np.full(SHAPE, np.nan, np.float32), "values nan .. nan, outside 0 .. 1"),
])
def test_a_volume_cache_entry_overwritten_with_another_array_is_prepared_again(world, tmp_path, source_reads,
                                                                               caplog, overwrite, said):
    """A valid .npy of another shape or scale was trained on as the volume without a word (one of
    another shape stopped the batch in the collate, far from the entry)."""
    folder = tmp_path / "cache"
    first = _volumes(_dataset(world, folder))
    _, records = world
    entry = PreparedCache(folder, cache_tag(SHAPE, WINDOW)).entry(records[1].image_path)
    np.save(entry, overwrite)
    with caplog.at_level(logging.WARNING, logger="unimed.data.prepared_cache"):
        again = _volumes(_dataset(world, folder))
    assert f"volume cache entry {entry} of {records[1].image_path} is not what it was prepared as ({said})" \
        in caplog.text
    assert source_reads == [r.image_path for r in records] + [records[1].image_path]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert np.array_equal(np.load(entry), first[1][0].numpy())


def test_an_unreadable_source_names_itself_and_writes_nothing(world, tmp_path):
    folder = tmp_path / "cache"
    _, records = world
    records[1].image_path.write_bytes(b"not a NIfTI file")
    cache = PreparedCache(folder, cache_tag(SHAPE, WINDOW))
    prepare = functools.partial(load_volume_slices, shape=SHAPE, window=WINDOW)
    with pytest.raises(DataError, match=records[1].image_path.name):
        cache.load(records[1].image_path, prepare)
    with pytest.raises(DataError, match="missing.nii.gz"):
        cache.load(tmp_path / "missing.nii.gz", prepare)
    assert not list(folder.iterdir())


def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="a-file/cache.*data.volume_cache"):
        PreparedCache(blocker / "cache", "t")


@pytest.fixture()
def image_reads(monkeypatch):
    """Paths handed to the X-ray decoder of the pre-training loaders, in order."""
    reads = []
    real = unimed.data.pretrain.load_image

    def counted(path, min_side=None):
        reads.append(Path(path))
        return real(path, min_side)

    monkeypatch.setattr(unimed.data.pretrain, "load_image", counted)
    return reads


def _xray_records(tmp_path):
    """Two 8-bit JPEGs large enough for a reduced DCT scale, a 16-bit PNG, an 8-bit PNG."""
    records = write_records(tmp_path, 4)
    rng = np.random.default_rng(2)
    for i, rec in enumerate(records[:2]):
        records[i] = dataclasses.replace(rec, image_path=rec.image_path.with_suffix(".jpg"))
        Image.fromarray(rng.integers(0, 255, (200, 240), dtype=np.uint8)).save(
            records[i].image_path, quality=90)
    Image.fromarray(rng.integers(0, 65535, (30, 32), dtype=np.uint16)).save(records[2].image_path)
    return records


def _items(records, tmp_path, cache, resize=64):
    cfg = DataConfig(image_size=48, resize_size=resize, image_cache=cache)
    dataset = build_pretrain_dataset(records, make_tokenizer(tmp_path), cfg, seed=3)
    return [dataset[(i, 7)] for i in range(len(records))]


def test_cached_xrays_give_bit_identical_views_and_are_decoded_once(tmp_path, image_reads):
    records = _xray_records(tmp_path)
    plain = _items(records, tmp_path, None)
    assert len(image_reads) == 4
    folder = tmp_path / "images"
    first = _items(records, tmp_path, str(folder))
    again = _items(records, tmp_path, str(folder))  # a new dataset: a new epoch's workers or run
    assert len(image_reads) == 8
    for a, b, c in zip(plain, first, again):
        for key in ("image", "image_aug"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    loader = CachedImageLoader(folder, 64, 64)
    for rec in records:  # JPEG, 16-bit PNG and 8-bit PNG alike: stored as the views start
        entry = np.load(loader.cache.entry(rec.image_path))
        assert entry.dtype == np.float32 and entry.shape == (64, 64)
    assert not list(folder.glob("*.tmp"))


def test_another_decoding_or_size_is_not_read_from_stale_entries(tmp_path, image_reads):
    records = _xray_records(tmp_path)
    folder = str(tmp_path / "images")
    _items(records, tmp_path, folder, resize=64)
    larger = _items(records, tmp_path, folder, resize=128)
    assert len(image_reads) == 8 and len(list(Path(folder).glob("*.npy"))) == 8
    assert np.load(CachedImageLoader(folder, 128, 128).cache.entry(records[0].image_path)).shape == (128, 128)
    assert torch.equal(larger[0]["image"], _items(records, tmp_path, None, resize=128)[0]["image"])


@pytest.mark.parametrize("overwrite, said", [
    (np.zeros((10, 13), np.float32), "a float32 array of shape (10, 13), not float32 64 x 64"),
    (np.full((64, 64), 7, np.int64), "a int64 array of shape (64, 64)"),
    (np.full((64, 64), 1e6, np.float32), "values 1e+06 .. 1e+06, outside 0 .. 1"),
    (np.full((64, 64), np.nan, np.float32), "values nan .. nan, outside 0 .. 1"),
])
def test_an_image_cache_entry_overwritten_with_another_array_is_prepared_again(tmp_path, image_reads, caplog,
                                                                               overwrite, said):
    """A valid .npy of another shape, type or scale was trained on as the image without a word (a
    NaN one stopped training as "diverged", blaming the learning rate)."""
    records = _xray_records(tmp_path)
    folder = str(tmp_path / "images")
    first = _items(records, tmp_path, folder)
    entry = CachedImageLoader(folder, 64, 64).cache.entry(records[2].image_path)
    np.save(entry, overwrite)
    with caplog.at_level("WARNING"):
        again = _items(records, tmp_path, folder)
    assert f"image cache entry {entry} of {records[2].image_path} is not what it was prepared as ({said}" \
        in caplog.text
    assert len(image_reads) == 5  # that one read again, the others from the cache
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert np.load(entry).shape == (64, 64)  # and written back as prepared


def test_an_image_cache_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="a-file/cache.*data.image_cache"):
        _items(write_records(tmp_path, 2), tmp_path, str(blocker / "cache"))


def test_priors_loader_reads_its_xrays_through_the_image_cache(tmp_path, image_reads):
    from test_methods import TINY_METHODS
    from unimed.methods import create_method

    records = write_records(tmp_path, 4)
    tokenizer = make_tokenizer(tmp_path)
    method = create_method(TINY_METHODS["prior"], vocab_size=len(tokenizer))
    cfg = DataConfig(image_cache=str(tmp_path / "images"), max_length=16)
    for _ in range(2):  # two epochs' worth of loaders: the second reads the cache
        (loader,) = method.build_loaders(records, tokenizer, cfg, batch_size=2).values()
        assert isinstance(loader.dataset.image_loader, CachedImageLoader)
        items = [loader.dataset[(i, 0)]["image"] for i in range(4)]
    assert len(image_reads) == 4 and len(list((tmp_path / "images").glob("*.npy"))) == 4
    plain = create_method(TINY_METHODS["prior"], vocab_size=len(tokenizer)).build_loaders(
        records, tokenizer, DataConfig(max_length=16), batch_size=2)["train"].dataset
    assert all(torch.equal(plain[(i, 0)]["image"], items[i]) for i in range(4))


def test_priors_loader_decodes_a_jpeg_at_the_scale_evaluation_reads_it(tmp_path):
    """A 200 x 240 JPEG for PRIOR's 32-px view decodes at 1/4 scale (50 x 60), as `EvalData` and
    Med-UniC's loader read it, not at full size."""
    from test_methods import TINY_METHODS
    from unimed.methods import create_method

    records = _xray_records(tmp_path)
    method = create_method(TINY_METHODS["prior"], vocab_size=len(make_tokenizer(tmp_path)))
    dataset = method.build_loaders(records, make_tokenizer(tmp_path), DataConfig(max_length=16),
                                   batch_size=2)["train"].dataset
    got = dataset.image_loader(records[0].image_path)
    assert got.shape == (50, 60)
    assert np.array_equal(got, load_image(records[0].image_path, min_side=32))


def test_a_failed_write_is_said_once_and_the_process_stops_writing(tmp_path, monkeypatch, caplog):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = PreparedCache(tmp_path / "cache", "t", setting="data.image_cache", what="image")
    monkeypatch.setattr(np, "save", full_disk)
    calls = []
    with caplog.at_level(logging.WARNING, logger="unimed.data.prepared_cache"):
        for name in ("a", "b", "c"):
            (tmp_path / name).write_text(name)  # a source, which the cache keys by its stat
            array = cache.load(tmp_path / name, lambda path: calls.append(path) or np.ones(2))
            assert np.array_equal(array, np.ones(2))
    assert len(calls) == 3 and not cache.writing
    assert caplog.text.count("No space left on device") == 1 and "writes no more entries" in caplog.text
    assert not list((tmp_path / "cache").iterdir())
