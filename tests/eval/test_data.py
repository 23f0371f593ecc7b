"""Evaluation data: the published split files of the evaluated sets."""

from __future__ import annotations

import hashlib
from pathlib import Path

from eval_helpers import IMAGE_SIZE

from unimed.data.config import DataConfig
from unimed.eval.data import EvalData


def _data(root: Path) -> EvalData:
    return EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=72, progress=False))


def test_published_split_files_list_the_read_sets_with_their_hash(tiny_world: Path, tmp_path: Path):
    data = _data(tiny_world)
    data.images("cxp500", "test")
    data.images("cxp500", "test", "full")  # one set read in two geometries is published once
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
