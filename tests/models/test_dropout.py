"""The CPU dropout: torch's distribution (rate, scale, gradient) from a faster mask, seeded by
torch's generator; the text encoder's dropouts all use it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from unimed.models import text as text_module
from unimed.models.config import TextTowerConfig
from unimed.models.dropout import Dropout, dropout, keep_mask, use_fast_dropout
from unimed.models.text import create_text_encoder, packed_layers
from unimed.text.config import MLMConfig
from unimed.text.mlm import build_mlm_model


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_drop_rate_is_p_and_kept_elements_are_scaled_by_one_over_one_minus_p(p):
    n = 1_000_000
    out = dropout(torch.ones(n), p)
    dropped = float((out == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1.0 / (1.0 - p)))


def test_elements_are_dropped_independently():
    """Neighbours (one 64-bit draw holds two 32-bit words) and rows are uncorrelated."""
    keep = keep_mask((200_000, 2), 0.5).float()
    correlation = torch.corrcoef(keep.T)[0, 1]
    assert abs(float(correlation)) < 5 / math.sqrt(200_000)


def test_torch_seed_governs_the_mask_and_each_call_draws_a_new_one():
    torch.manual_seed(3)
    first, second = keep_mask((64, 64), 0.1), keep_mask((64, 64), 0.1)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.1), first)
    assert not torch.equal(first, second)


def test_the_gradient_is_masked_and_scaled_like_the_output():
    x = torch.randn(1000, requires_grad=True)
    out = dropout(x, 0.25)
    grad = torch.randn(1000)
    out.backward(grad)
    kept = out != 0
    torch.testing.assert_close(out.detach(), x.detach() * kept / 0.75)
    torch.testing.assert_close(x.grad, grad * kept / 0.75)
    assert torch.equal(x.grad == 0, ~kept)


def test_outside_training_or_at_zero_p_it_is_the_identity():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        keep_mask((3,), 1.0)


def test_use_fast_dropout_replaces_plain_dropouts_only():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.3), nn.Dropout2d(0.4)))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    use_fast_dropout(net)
    assert type(net[1]) is Dropout and net[1].p == 0.2 and type(net[2][0]) is Dropout and net[2][0].p == 0.3
    assert type(net[2][1]) is nn.Dropout2d
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_every_dropout_of_the_text_encoder_uses_it():
    encoder = create_text_encoder(None, TextTowerConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                        intermediate_size=64, dropout=0.1), vocab_size=50)
    dropouts = [m for m in encoder.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 2 * 3 and all(type(m) is Dropout and m.p == 0.1 for m in dropouts)


def test_packed_attention_drops_probabilities_with_the_cpu_mask(monkeypatch):
    """In train mode the packed layers' attention is softmax -> dropout -> values, the mask drawn
    by keep_mask: recomputed by hand from the same masks, the layer's output matches."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    encoder = BertModel(config, add_pooling_layer=False).train()
    hidden = torch.randn(2, 5, 16)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    masks = []
    monkeypatch.setattr(text_module, "masked_dropout",
                        lambda x, p: masks.append(keep_mask(x.shape, p)) or x * masks[-1] / (1 - p))
    out = packed_layers(encoder.encoder.layer, hidden, attention_mask)
    assert len(masks) == 1 and masks[0].shape == (2, 2, 5, 5)

    layer = encoder.encoder.layer[0]
    self_attention = layer.attention.self
    heads = lambda t: t.view(2, 5, 2, 8).transpose(1, 2)  # noqa: E731
    scores = heads(self_attention.query(hidden)) @ heads(self_attention.key(hidden)).transpose(-1, -2)
    scores = scores * self_attention.scaling + (attention_mask[:, None, None, :] - 1) * 1e9
    probs = scores.softmax(-1) * masks[0] / 0.7
    context = (probs @ heads(self_attention.value(hidden))).transpose(1, 2).reshape(2, 5, 16)
    expected = layer.output(layer.intermediate(layer.attention.output(context, hidden)),
                            layer.attention.output(context, hidden))
    real = attention_mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    assert float(out.detach()[~real].abs().max()) == 0.0



def test_every_dropout_of_the_mlm_model_uses_it(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    model = build_mlm_model(BertTokenizerFast(vocab=str(vocab)), MLMConfig(hidden_size=16, num_layers=1,
                                                                         num_heads=2, intermediate_size=32))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is Dropout for m in dropouts)
