"""PRIOR's pre-training data (Supp §2.1; spec §1): reports as sentences, a per-token sentence id.

Each report is split into sentences once (spaCy's sentencizer in the record's language), reports
with fewer than `min_sentences` are left out (PRIOR: 4), and on every access the sentence order is
shuffled with the sample's seed. Each sentence is tokenised on its own and the pieces are joined
between one [CLS] and one [SEP], so the sentence ids are exact and a long report loses its last
sentences, never its [SEP] (the public code tokenises the joined text, which can merge words at
sentence joins and drop [SEP]: spec §11-B12).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from unimed.data.pretrain import PretrainDataset, error_fields, sample_seed
from unimed.data.records import Record
from unimed.data.reports import split_sentences
from unimed.data.transforms import ImageTransform

log = logging.getLogger(__name__)

NO_SENTENCE = -1


def report_sentences(record: Record) -> list[str]:
    """The sentences of a record's report, split by the rules of its language."""
    return split_sentences(record.report or "", record.language or "en")


def filter_by_sentences(records: Sequence[Record], min_sentences: int) -> list[Record]:
    """The records whose report has at least `min_sentences` sentences (PRIOR keeps >= 4)."""
    kept = [r for r in records if len(report_sentences(r)) >= min_sentences]
    if not kept:
        raise ValueError(f"no report has at least {min_sentences} sentences "
                         f"({len(records)} records); lower the minimum")
    if len(kept) < len(records):
        log.info("PRIOR sentence filter: kept %d of %d reports with >= %d sentences",
                 len(kept), len(records), min_sentences)
    return kept


def tokenize_sentences(tokenizer: Any, sentences: Sequence[str], max_length: int
                       ) -> tuple[list[int], list[int]]:
    """[CLS] sentence 0 ... sentence T-1 [SEP], at most `max_length` tokens -> (token ids, sentence
    id per token: 0..T-1, -1 on [CLS] and [SEP]). Sentences that do not fit are dropped, the last
    one that partly fits is cut."""
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one token, [SEP]), got {max_length}")
    ids, index = [tokenizer.cls_token_id], [NO_SENTENCE]
    for number, sentence in enumerate(sentences):
        room = max_length - 1 - len(ids)
        if room <= 0:
            break
        pieces = tokenizer(sentence, add_special_tokens=False)["input_ids"][:room]
        ids += pieces
        index += [number] * len(pieces)
    return ids + [tokenizer.sep_token_id], index + [NO_SENTENCE]


class PriorPretrainDataset(PretrainDataset):
    """Image-report pairs for PRIOR: one image view, the report's sentences in a shuffled order.

    Items: image (3, S, S) in [0, 1], input_ids (L,), sentence_index (L,), language, site, index.
    Index it with `(index, seed)` (:class:`unimed.data.pretrain.PretrainSampler`); the seed fixes
    both the augmentation and the sentence order.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Any, *, max_length: int,
                 transform: ImageTransform, seed: int = 0, shuffle_sentences: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(records, tokenizer, max_length=max_length, transform=transform,
                         seed=seed, **kwargs)
        self.sentences = [report_sentences(r) for r in self.records]
        self.shuffle_sentences = shuffle_sentences

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, sample_seed(self.seed, 0, key))
        index, image, errors = self.readable(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            view = self.transform(image)
        sentences = list(self.sentences[index])
        if self.shuffle_sentences:
            order = np.random.default_rng(seed).permutation(len(sentences))
            sentences = [sentences[i] for i in order]
        ids, sentence_index = tokenize_sentences(self.tokenizer, sentences, self.max_length)
        return {
            "image": view,
            "input_ids": torch.as_tensor(ids, dtype=torch.long),
            "sentence_index": torch.as_tensor(sentence_index, dtype=torch.long),
            "language": self._language_id[index],
            "site": self._site_id[index],
            "index": index,
            **errors,
        }


class PriorCollator:
    """Stacks images; pads token ids (pad id), attention masks (0) and sentence ids (-1)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        return {
            "image": torch.stack([item["image"] for item in items]),  # (B, 3, S, S)
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True,
                                           padding_value=0),
            "sentence_index": pad_sequence([item["sentence_index"] for item in items],
                                           batch_first=True, padding_value=NO_SENTENCE),
            "language": torch.tensor([item["language"] for item in items], dtype=torch.long),
            "site": torch.tensor([item["site"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            **error_fields(items),
        }
