"""Fixtures of the cross-lingual text tests: a tiny locally saved BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from text_corpora import tiny_vocab
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-trained-like BERT folder (model + tokenizer), as a CXR-BERT download would look."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = BertTokenizerFast(vocab=tiny_vocab(), model_max_length=64)
    tokenizer.save_pretrained(str(path))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(str(path))
    return path
