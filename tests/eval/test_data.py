"""Evaluation data: decoding on threads, the published split files of the evaluated sets."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from eval_helpers import IMAGE_SIZE

from unimed.data.config import DataConfig
from unimed.data.errors import DataError
from unimed.data.images import load_image
from unimed.data.transforms import eval_transform
from unimed.eval.data import EvalData
from unimed.eval.errors import EvalError


def _data(root: Path) -> EvalData:
    return EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=72, progress=False))


def test_published_split_files_list_the_read_sets_with_their_hash(tiny_world: Path, tmp_path: Path):
    data = _data(tiny_world)
    data.images("cxp500", "test")
    data.images("cxp500", "test", "full")  # one set read in two geometries is published once
    data.images("cxp500", "test", "full", size=2 * IMAGE_SIZE)  # ... and at two sizes
    data.images("rsna", "train")
    published = data.publish(tmp_path)
    assert list(published) == ["cxp500/test", "rsna/train"]
    entry = published["cxp500/test"]
    text = (tmp_path / entry["file"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(text).hexdigest()
    ids = text.decode().splitlines()
    records = data.records("cxp500", "test")
    assert entry["images"] == len(ids) == len(records)
    assert all(not Path(i).is_absolute() and (tiny_world / i) == Path(r.image_path)
               for i, r in zip(ids, records))
    again = _data(tiny_world)
    again.images("cxp500", "test")
    assert again.publish(tmp_path / "again")["cxp500/test"]["sha256"] == entry["sha256"]


def test_threaded_decoding_keeps_the_record_order_and_values(tiny_world: Path, monkeypatch):
    data = _data(tiny_world)
    records = data.records("cxp500", "test")
    transform = eval_transform(IMAGE_SIZE, 72)
    expected = torch.stack([transform(load_image(r.image_path, min_side=72))[:1] for r in records])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(data.images("cxp500", "test"), expected)


def test_an_unreadable_image_stops_decoding_with_its_name(tiny_world: Path, tmp_path: Path):
    records = _data(tiny_world).records("cxp500", "test")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records = [*records[:3], dataclasses.replace(records[3], image_path=broken), *records[4:]]
    with pytest.raises(DataError, match="broken.jpg") as err:
        _data(tiny_world).load(records, "crop")
    assert "data.on_error=skip" not in str(err.value)
    # Under data.on_error=skip the set is fixed when its dataset is read: the error says how to
    # leave such images out (the setting was silently not applied).
    skip = EvalData(DataConfig(root=str(tiny_world), image_size=IMAGE_SIZE, resize_size=72, progress=False,
                               on_error="skip"))
    with pytest.raises(DataError) as err:
        skip.load(records, "crop")
    assert str(err.value).startswith(f"{broken}: ") and str(err.value).endswith(
        "(data.on_error=skip leaves out the images found unreadable when a dataset is read; with "
        "data.check_images=true every image is read then)")


def test_a_large_jpeg_decodes_at_the_reduced_scale_pre_training_reads(tiny_world: Path, tmp_path: Path):
    """A 256-px JPEG resized to 72 decodes at half scale (Pillow's draft), as pre-training reads it."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    record = dataclasses.replace(_data(tiny_world).records("cxp500", "test")[0], image_path=path)
    transform = eval_transform(IMAGE_SIZE, 72)
    got = _data(tiny_world).load([record], "crop")[0]
    assert torch.equal(got, transform(load_image(path, min_side=72))[:1])
    assert not torch.equal(got, transform(load_image(path))[:1])


def test_the_full_geometry_reads_at_a_size_of_its_own(tiny_world: Path):
    data = _data(tiny_world)
    own = data.images("siim", "valid", "full", size=2 * IMAGE_SIZE)
    base = data.images("siim", "valid", "full")
    assert own.shape[-2:] == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE) and base.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    assert own.shape[0] == base.shape[0] == len(data.records("siim", "valid"))
    # the same pictures: averaging each 2 x 2 block of the large one comes close to the small one
    assert (torch.nn.functional.avg_pool2d(own, 2) - base).abs().mean() < 0.05
    with pytest.raises(EvalError, match="'full' geometry, not 'crop'"):
        data.images("siim", "valid", "crop", size=2 * IMAGE_SIZE)
