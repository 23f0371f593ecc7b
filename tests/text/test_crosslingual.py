"""Sentence features for the MLM stage's guard and the line the main job prints for it."""

import pytest
import torch

from unimed.commands.train import mlm_check_line
from unimed.models.config import TextTowerConfig
from unimed.models.text import create_text_encoder, pool_text
from unimed.text.crosslingual import embed_texts


def test_embed_texts_are_unit_pooled_features_in_batches(tmp_path) -> None:
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "sin"]))
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    cfg = TextTowerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    encoder = create_text_encoder(None, cfg, vocab_size=len(tokenizer)).eval()
    texts = ["no pleural", "sin", "pleural pleural no"]
    got = embed_texts(encoder, tokenizer, texts, pooling="mean", batch_size=2)
    with torch.no_grad():
        expected = torch.cat([pool_text(encoder, b["input_ids"], b["attention_mask"], "mean")
                              for b in (tokenizer([t], return_tensors="pt") for t in texts)])
    torch.testing.assert_close(got, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)
    assert got.norm(dim=-1) == pytest.approx(torch.ones(3))


def test_check_line_says_pass_or_fail_with_the_numbers() -> None:
    worse = {"before": 0.034, "after": 0.014, "passed": False, "pairs": 147}
    assert mlm_check_line(worse) == ("FAIL: MLM made cross-lingual retrieval worse: cross-lingual R@1 "
                                     "3.4% before MLM, 1.4% after (147 parallel reports)")
    assert mlm_check_line({**worse, "after": 0.05, "passed": True}).startswith("PASS: MLM did not")


def test_the_check_counts_translations_found_first_each_way() -> None:
    import numpy as np

    from unimed.eval.retrieval import recall_hits, same_value

    english = np.eye(3)
    second = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows 0 and 1 swapped
    match = same_value(["a", "b", "c"])
    sims = english @ second.T
    assert [recall_hits(s, match, (1,))["R@1"].mean() for s in (sims, sims.T)] == pytest.approx([1 / 3] * 2)
