"""The on-disk cache of prepared CT inputs: bit-identical items, one source read per volume and
preparation, no stale entries, damaged entries rebuilt, bad sources and folders named."""

import functools
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import unimed.data.volume_pretrain
from unimed.data.errors import DataError
from unimed.data.volume_cache import VolumeCache
from unimed.data.volume_pretrain import VolumePretrainDataset, cache_tag, load_volume_slices

from train_helpers import make_tokenizer, write_volume_records

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


def test_a_damaged_entry_is_prepared_again_with_a_warning(world, tmp_path, caplog):
    folder = tmp_path / "cache"
    first = _volumes(_dataset(world, folder))
    _, records = world
    entry = VolumeCache(folder, cache_tag(SHAPE, WINDOW)).entry(records[0].image_path)
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="unimed.data.volume_cache"):
        again = _dataset(world, folder)[0]["volume"]
    assert torch.equal(again, first[0])
    assert str(entry) in caplog.text and "unreadable" in caplog.text
    assert np.array_equal(np.load(entry), first[0][0].numpy())


def test_an_unreadable_source_names_itself_and_writes_nothing(world, tmp_path):
    folder = tmp_path / "cache"
    _, records = world
    records[1].image_path.write_bytes(b"not a NIfTI file")
    cache = VolumeCache(folder, cache_tag(SHAPE, WINDOW))
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
        VolumeCache(blocker / "cache", "t")
