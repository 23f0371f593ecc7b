"""Mixed-language image-report dataset, its collate and its resumable sampler.

Each item is one image in two views (the one paired with the report for L_CVL, and an augmented
one for L_SSV) and its tokenised report.
Augmentations are seeded per (seed, epoch, index), so a sample looks the same whichever worker or
rank reads it and whether or not the run was resumed; the sampler hands those seeds to the dataset.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from unimed.data.config import DataConfig
from unimed.data.errors import EMPTY_REPORT, DataError, check_on_error
from unimed.data.images import load_image
from unimed.data.prepared_cache import PreparedCache, unit_array
from unimed.data.records import Record
from unimed.data.reports import split_sentences, warn_truncated
from unimed.data.transforms import (
    ImageTransform,
    cvl_transform,
    pretrain_transform,
    to_tensor_image,
)
from unimed.errors import ConfigError

UNKNOWN_SITE = "unknown"
SampleKey = int | tuple[int, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for the augmentation of sample `index` in `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def _check_records(records: Sequence[Record]) -> None:
    if len(records) == 0:
        raise ValueError("no records to pre-train on: the adapters returned an empty list")
    for i, rec in enumerate(records):
        if not rec.report or not rec.report.strip():
            raise DataError(f"record {i} ({rec.dataset}, study {rec.study_id}) has no report",
                            rec.image_path, reason=EMPTY_REPORT)
        if not rec.language:
            raise DataError(f"record {i} ({rec.dataset}, study {rec.study_id}) has no language",
                            rec.image_path)


class PretrainDataset(Dataset):
    """Image-report pairs from canonical records of any language and site.

    `transform` makes the view paired with the report, `aug_transform` the SSV view (default: a
    second draw of `transform`). `languages` / `sites` fix the integer ids (default: sorted names
    found in the records; a record without a site gets "unknown"). Items are dicts: image,
    image_aug (3, S, S), input_ids (L,), language, site, index. Index it with `(index, seed)` (what
    :class:`PretrainSampler` yields) or with a plain index (seeded by the index alone).

    An image that cannot be read never fails inside a loader worker: the pair is replaced by the next
    record of the same community whose image reads (so the batch keeps its size and composition),
    and the item carries the error: under "data_errors" with ``on_error="raise"`` (the training
    loop raises it, one line naming the file), under "skipped" with ``on_error="skip"`` (the loop
    counts and logs it).

    `sentence_keep` below 1 pairs the image with a random subset of its report's sentences instead
    of the whole report: each sentence is kept with that probability, in the report's order, at
    least one (drawn from the sample's seed, so anew every epoch and the same on a resumed run).
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        *,
        max_length: int,
        transform: ImageTransform,
        aug_transform: ImageTransform | None = None,
        seed: int = 0,
        languages: Sequence[str] | None = None,
        sites: Sequence[str] | None = None,
        image_loader: Callable[[Path], np.ndarray] = load_image,
        on_error: str = "raise",
        sentence_keep: float = 1.0,
    ) -> None:
        _check_records(records)
        self.on_error = check_on_error(on_error)
        self.records = list(records)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.transform = transform
        self.aug_transform = aug_transform or transform
        self.seed = seed
        self.image_loader = image_loader
        self.languages = tuple(languages or sorted({r.language for r in self.records}))
        self.sites = tuple(sites or sorted({r.site or UNKNOWN_SITE for r in self.records}))
        self._language_id = _ids(self.languages, [r.language for r in self.records], "language")
        self._site_id = _ids(self.sites, [r.site or UNKNOWN_SITE for r in self.records], "site")
        self._community = self.communities
        if not 0.0 < sentence_keep <= 1.0:
            raise ValueError(f"sentence_keep must be in (0, 1], got {sentence_keep}")
        self.sentence_keep = sentence_keep
        self._sentences = ([split_sentences(r.report, r.language) for r in self.records]
                           if sentence_keep < 1.0 else None)
        reports: dict[str, list[str]] = {}
        for record in self.records:
            reports.setdefault(record.dataset, []).append(record.report)
        warn_truncated(reports, tokenizer, max_length, "data.max_length")

    @property
    def communities(self) -> list[int]:
        """Per record, the id of its community: one (site, language) pair."""
        pairs = list(zip(self._site_id, self._language_id))
        table = {pair: i for i, pair in enumerate(sorted(set(pairs)))}
        return [table[pair] for pair in pairs]

    def __len__(self) -> int:
        return len(self.records)

    def readable(self, index: int) -> tuple[int, np.ndarray, dict[str, list[DataError]]]:
        """(index of the record used, its (H, W) image in [0, 1], the error fields of the item):
        `index` itself, or when its image cannot be read the next record of its community whose
        image can (see the class docstring); of any community when none of its own can be read."""
        try:
            return index, self.image_loader(self.records[index].image_path), {}
        except DataError as err:
            errors = [err]
        community = self._community[index]
        n = len(self.records)
        order = [(index + step) % n for step in range(1, n)]
        same = [i for i in order if self._community[i] == community]
        for candidate in same + [i for i in order if self._community[i] != community]:
            try:
                image = self.image_loader(self.records[candidate].image_path)
            except DataError as err:
                errors.append(err)
                continue
            # The replaced pair's own error only: a stand-in tried before, unreadable too, is
            # reported when its own pair comes (it was counted as a second replaced sample).
            return candidate, image, {"data_errors" if self.on_error == "raise" else "skipped": errors[:1]}
        raise errors[0]

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, sample_seed(self.seed, 0, key))
        index, image, errors = self.readable(index)  # (H, W) in [0, 1]
        rec = self.records[index]
        # A private RNG stream, so augmenting never moves the global one that dropout uses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            view, view_aug = self.transform(image), self.aug_transform(image)
        ids = self.tokenizer(self.report_text(index, seed), truncation=True,
                             max_length=self.max_length)["input_ids"]
        return {
            "image": view,
            "image_aug": view_aug,
            "input_ids": torch.as_tensor(ids, dtype=torch.long),
            "language": self._language_id[index],
            "site": self._site_id[index],
            "index": index,
            **errors,
        }

    def report_text(self, index: int, seed: int) -> str:
        """The text paired with record `index`'s image in the sample seeded by `seed`: the whole
        report, or with `sentence_keep` below 1 the subset of its sentences that `seed` draws."""
        if self._sentences is None:
            return self.records[index].report
        sentences = self._sentences[index]
        if len(sentences) < 2:
            return self.records[index].report
        rng = np.random.default_rng(seed)
        keep = rng.random(len(sentences)) < self.sentence_keep
        if not keep.any():
            keep[rng.integers(len(sentences))] = True
        return " ".join(s for s, k in zip(sentences, keep) if k)


def error_fields(items: list[dict[str, Any]]) -> dict[str, list[DataError]]:
    """The items' "data_errors" and "skipped" lists joined for the batch (absent when empty)."""
    fields: dict[str, list[DataError]] = {}
    for item in items:
        for key in ("data_errors", "skipped"):
            if key in item:
                fields.setdefault(key, []).extend(item[key])
    return fields


def _ids(names: Sequence[str], values: Sequence[str], what: str) -> list[int]:
    table = {name: i for i, name in enumerate(names)}
    missing = sorted(set(values) - set(table))
    if missing:
        raise ValueError(f"records have {what}s {missing} outside the given {what}s {list(names)}")
    return [table[v] for v in values]


class PretrainCollator:
    """Stacks images and pads token ids to the longest report in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        masks = [torch.ones_like(x) for x in ids]
        return {
            "image": torch.stack([item["image"] for item in items]),  # (B, 3, S, S)
            "image_aug": torch.stack([item["image_aug"] for item in items]),  # (B, 3, S, S)
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),  # (B, L)
            "attention_mask": pad_sequence(masks, batch_first=True, padding_value=0),  # (B, L)
            "language": torch.tensor([item["language"] for item in items], dtype=torch.long),
            "site": torch.tensor([item["site"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            **error_fields(items),
        }


class PretrainSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle, `set_epoch`, one shard per rank; world size 1 is
    a plain seeded shuffle) that yields `(index, augmentation seed)` and can start mid-epoch."""

    def __init__(self, dataset: Dataset, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self._start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's shard on the next pass only (resume)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside this rank's {self.num_samples} samples")
        self._start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        indices = list(super().__iter__())
        for index in indices[start:]:
            yield index, sample_seed(self.seed, self.epoch, index)


class CommunitySampler(PretrainSampler):
    """A :class:`PretrainSampler` whose every global batch holds one community only.

    Each epoch, every community's indices are shuffled and cut into global batches of
    `batch_size * world_size` (the remainder is dropped), the batches of all communities are
    shuffled together, and rank r takes the r-th slice of `batch_size` of each. Seeded by
    (seed, epoch), identical on every rank.
    """

    def __init__(self, dataset: Dataset, communities: Sequence[int], *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        super().__init__(dataset, rank=rank, world_size=world_size, seed=seed)
        if len(communities) != len(dataset):
            raise ValueError(f"{len(communities)} community ids for {len(dataset)} samples")
        self.batch_size = batch_size
        self.communities = np.asarray(communities)
        global_batch = batch_size * world_size
        batches = sum(int(np.sum(self.communities == c)) // global_batch
                      for c in np.unique(self.communities))
        self.num_samples = batches * batch_size
        self.total_size = self.num_samples * world_size

    def _global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        global_batch = self.batch_size * self.num_replicas
        batches: list[np.ndarray] = []
        for community in np.unique(self.communities):
            members = rng.permutation(np.flatnonzero(self.communities == community))
            whole = len(members) // global_batch
            batches += list(members[: whole * global_batch].reshape(whole, global_batch))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        indices = [int(i) for batch in self._global_batches() for i in batch[mine]]
        for index in indices[start:]:
            yield index, sample_seed(self.seed, self.epoch, index)


class CachedImageLoader:
    """An X-ray as a pre-training loader's views start from it, read once per file: decoded by
    :func:`~unimed.data.images.load_image` for `min_side`, then resized to `size` x `size` by the
    antialiased resize that every view's transform begins with (torchvision leaves an image that
    is already that size as it is, so the views are bit-identical to those of a fresh read), kept
    as float32 in a :class:`PreparedCache` under `folder` (``data.image_cache``). The decode is
    what a loader worker spends its time on: about 9 ms for a MIMIC-CXR-sized JPEG at its reduced
    DCT scale, far more for a 16-bit PadChest PNG, which has none; an entry is 256 KB at 256 px
    (about 140 GB for MIMIC-CXR and PadChest together) and reads back in a fraction of a ms."""

    def __init__(self, folder: str | Path, min_side: int | None, size: int) -> None:
        self.min_side = min_side
        self.resize = v2.Resize((size, size), antialias=True)
        self.cache = PreparedCache(
            folder, "grey image (DICOM through its VOI LUT or window, a float TIFF as its values) "
                    f"decoded for a side of {min_side}, resized to {size}x{size}",
            setting="data.image_cache", what="image", check=unit_array((size, size)))

    def __call__(self, path: str | Path) -> np.ndarray:
        return self.cache.load(path, self._prepare)

    def _prepare(self, path: Path) -> np.ndarray:
        return self.resize(to_tensor_image(load_image(path, self.min_side)))[0].numpy()


def image_loader(cfg: DataConfig, min_side: int | None, size: int) -> Callable[[Path], np.ndarray]:
    """How a pre-training loader whose views start by resizing to `size` x `size` reads its
    X-rays: decoded for `min_side` (a JPEG at its smallest DCT scale that still covers it), through
    ``data.image_cache`` when one is set (:class:`CachedImageLoader`)."""
    if cfg.image_cache is not None:
        return CachedImageLoader(cfg.image_cache, min_side, size)
    return functools.partial(load_image, min_side=min_side)


def build_pretrain_dataset(
    records: Sequence[Record], tokenizer: Any, cfg: DataConfig, *, seed: int = 0
) -> PretrainDataset:
    """The dataset at the config's sizes: `data.cvl_view` for the view paired with the report, the
    paper's augmentations (and `data.ssv_jitter`) for the SSV view. JPEGs are decoded at the
    smallest DCT scale that still covers `data.resize_size` (both views start by resizing to it),
    through ``data.image_cache`` when set (:func:`image_loader`)."""
    transform = cvl_transform(cfg.cvl_view, cfg.image_size, cfg.resize_size, rotation=cfg.rotation)
    aug = pretrain_transform(cfg.image_size, cfg.resize_size, rotation=cfg.rotation,
                             jitter=cfg.ssv_jitter)
    return PretrainDataset(records, tokenizer, max_length=cfg.max_length, transform=transform,
                           aug_transform=aug, seed=seed, on_error=cfg.on_error,
                           image_loader=image_loader(cfg, cfg.resize_size, cfg.resize_size),
                           sentence_keep=cfg.sentence_keep)


def build_pretrain_loader(
    dataset: PretrainDataset,
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    setting: str = "train.batch_size",
) -> DataLoader:
    """A DataLoader over this rank's shard: full batches only, workers from `cfg.num_workers`
    (persistent, prefetching), pinned memory when asked (on CUDA).

    The loader gets its own generator so iterating it never draws from the global RNG. The
    default `collate_fn` is :class:`PretrainCollator`. A batch of one pair, or a shard smaller
    than one batch, is a ConfigError naming `setting`, the option that set `batch_size`.
    """
    if batch_size < 2:
        raise ConfigError(f"{setting}={batch_size}: a pre-training batch needs at least 2 pairs in "
                          "every process (each pair is contrasted with the others, and the "
                          "projection heads' batch norms need two samples)")
    pad_id = dataset.tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    if cfg.batch_composition == "community":
        sampler: PretrainSampler = CommunitySampler(
            dataset, dataset.communities, batch_size=batch_size, rank=rank,
            world_size=world_size, seed=seed,
        )
    else:
        sampler = PretrainSampler(dataset, rank=rank, world_size=world_size, seed=seed)
    if len(sampler) < batch_size:
        largest = (f" (data.batch_composition=community: every batch holds one community, and the "
                   f"largest has {np.bincount(dataset.communities).max()} pairs)"
                   if cfg.batch_composition == "community" else "")
        raise ConfigError(f"{setting}={batch_size}: of the {len(dataset)} pre-training pairs, process "
                          f"{rank} of {world_size} gets {len(sampler)}{largest}, fewer than one batch; "
                          f"lower {setting}")
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn or PretrainCollator(pad_id),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
