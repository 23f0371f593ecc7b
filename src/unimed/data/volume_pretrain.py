"""CT volume-report pairs for 3D pre-training (UniMedI).

Each item is one volume (a record with ``ndim == 3``: NIfTI, MetaImage or a folder of slices),
read in RAS HU, resized to (depth, side, side) axial slices inferior to superior in the radiological
convention (:func:`unimed.data.volumes.axial_slices`, the same view the 3D evaluation gives every
encoder), HU-windowed to [0, 1], with its tokenised report. A volume that cannot be read is replaced
like an unreadable X-ray (:class:`unimed.data.pretrain.PretrainDataset`: the next readable record of
its community, the error carried in the item). With a cache folder (``data.volume_cache``) each
prepared input is read from the source once and from :class:`unimed.data.prepared_cache.PreparedCache`
after that.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from unimed.data.errors import DataError, UNREADABLE_IMAGE
from unimed.data.pretrain import PretrainDataset, SampleKey, error_fields
from unimed.data.records import Record
from unimed.data.prepared_cache import PreparedCache, unit_array
from unimed.data.volumes import axial_slices, read_volume, volume_files


def load_volume_slices(path: Path, *, shape: Sequence[int], window: tuple[float, float]
                       ) -> np.ndarray:
    """(depth, side, side) float32 axial slices in [0, 1] of the volume at `path`."""
    depth, rows, columns = shape
    if rows != columns:
        raise DataError(f"volume input {rows}x{columns} is not square", path,
                        reason=UNREADABLE_IMAGE)
    return axial_slices(read_volume(path), size=rows, slices=depth, window=window).numpy()


def cache_tag(shape: Sequence[int], window: tuple[float, float]) -> str:
    """What a cached input of :func:`load_volume_slices` was prepared with ("averaged down": the
    resize since :func:`unimed.data.resize.resize_volume`, so an entry the trilinear resize alone
    wrote is prepared again)."""
    return f"axial slices {'x'.join(map(str, shape))} averaged down, HU window {window[0]:g}..{window[1]:g}"


class VolumePretrainDataset(PretrainDataset):
    """Volume-report pairs; items are dicts: volume (1, D, H, W) in [0, 1], input_ids, language,
    site, index (and the error fields). No augmentation (the paper states none for CT). `cache`: a
    folder of prepared inputs (:class:`~unimed.data.prepared_cache.PreparedCache`), or None."""

    def __init__(self, records: Sequence[Record], tokenizer: Any, *, max_length: int,
                 shape: Sequence[int], window: tuple[float, float], seed: int = 0,
                 on_error: str = "raise", cache: str | Path | None = None) -> None:
        loader = functools.partial(load_volume_slices, shape=tuple(shape), window=tuple(window))
        if cache is not None:
            prepared = PreparedCache(cache, cache_tag(shape, window), check=unit_array(tuple(shape)),
                                     files=volume_files)
            loader = functools.partial(prepared.load, prepare=loader)
        super().__init__(records, tokenizer, max_length=max_length, transform=torch.as_tensor,
                         seed=seed, image_loader=loader, on_error=on_error)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        index, volume, errors = self.readable(index)
        rec = self.records[index]
        ids = self.tokenizer(rec.report, truncation=True, max_length=self.max_length)["input_ids"]
        return {
            "volume": torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None],
            "input_ids": torch.as_tensor(ids, dtype=torch.long),
            "language": self._language_id[index],
            "site": self._site_id[index],
            "index": index,
            **errors,
        }


class VolumeCollator:
    """Stacks volumes and pads token ids to the longest report in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        return {
            "volume": torch.stack([item["volume"] for item in items]),  # (B, 1, D, H, W)
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True,
                                           padding_value=0),
            "language": torch.tensor([item["language"] for item in items], dtype=torch.long),
            "site": torch.tensor([item["site"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            **error_fields(items),
        }
