"""PRIOR's sentence data: exact per-token sentence ids, the sentence filter, shuffling, collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from unimed.data.prior import (
    PriorCollator,
    PriorPretrainDataset,
    filter_by_sentences,
    tokenize_sentences,
)
from unimed.data.records import Record
from unimed.data.transforms import prior_transform
WORDS = ["no", "pleural", "effusion", "cardiomegaly", "derram", "izquierd", "."]


@pytest.fixture()
def tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})


def write_records(root: Path, n: int) -> list[Record]:
    """`n` tiny grey PNGs, English reports (two sentences) on even, Spanish (one) on odd rows."""
    out = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(np.full((24, 28), 10 * i, dtype=np.uint8)).save(path)
        english = i % 2 == 0
        out.append(Record("mimic-cxr" if english else "padchest", path, str(i), f"s{i}", "train",
                          report="no pleural effusion. cardiomegaly" if english
                          else "derram izquierd.", language="en" if english else "es"))
    return out


def test_tokenize_sentences_ids_and_truncation(tokenizer) -> None:
    sentences = ["no pleural effusion .", "cardiomegaly .", "derram izquierd ."]
    ids, index = tokenize_sentences(tokenizer, sentences, max_length=64)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert index == [-1, 0, 0, 0, 0, 1, 1, 2, 2, 2, -1]
    for number, sentence in enumerate(sentences):
        alone = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        assert [i for i, s in zip(ids, index) if s == number] == alone
    ids, index = tokenize_sentences(tokenizer, sentences, max_length=7)
    assert len(ids) == 7 and ids[-1] == tokenizer.sep_token_id  # [SEP] survives truncation
    assert index == [-1, 0, 0, 0, 0, 1, -1]


def test_filter_by_sentences(tmp_path: Path) -> None:
    records = [Record("mimic-cxr", tmp_path / "a.png", "1", "s1", "train",
                      report="No effusion. Heart normal. Lungs clear.", language="en"),
               Record("padchest", tmp_path / "b.png", "2", "s2", "train",
                      report="derram pleural izquierd.", language="es")]
    assert [r.study_id for r in filter_by_sentences(records, 2)] == ["s1"]
    with pytest.raises(ValueError, match="at least 4 sentences"):
        filter_by_sentences(records, 4)


def test_dataset_shuffles_sentences_per_seed_and_collates(tmp_path: Path, tokenizer) -> None:
    records = write_records(tmp_path, n=4)
    data = PriorPretrainDataset(records, tokenizer, max_length=32, transform=prior_transform(16))
    english = data[(0, 1)]
    assert english["image"].shape == (3, 16, 16)
    assert data.sentences[0] == ["no pleural effusion.", "cardiomegaly"]
    orders = {tuple(data[(0, seed)]["input_ids"].tolist()) for seed in range(8)}
    assert len(orders) == 2  # both orders of the two sentences occur
    torch.testing.assert_close(data[(0, 3)]["input_ids"], data[(0, 3)]["input_ids"])
    batch = PriorCollator(tokenizer.pad_token_id)([data[(i, i)] for i in range(4)])
    assert batch["input_ids"].shape == batch["sentence_index"].shape
    assert (batch["sentence_index"][batch["attention_mask"] == 0] == -1).all()
    assert batch["sentence_index"].max() == 1
