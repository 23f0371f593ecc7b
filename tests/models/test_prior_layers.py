"""PRIOR's blocks against per-sample loops written from the spec (shared/specs/PRIOR.md §2-5)."""

from __future__ import annotations

import math

import pytest
import torch

from unimed.models.prior_layers import (
    ImageDecoder,
    LocalAlignment,
    QueryAttentionPool,
    ReportDecoder,
    SentencePrototypeBank,
    WordPool,
    gumbel_temperature,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gumbel_schedules_cover_code_and_paper() -> None:
    assert gumbel_temperature(50, 100, "fixed") == 0.9  # the released code
    assert gumbel_temperature(0, 100, "exp") == pytest.approx(0.9)
    assert gumbel_temperature(100, 100, "exp") == pytest.approx(0.01)  # Supp: 0.9 -> 0.01
    assert gumbel_temperature(50, 100, "exp") == pytest.approx(math.sqrt(0.9 * 0.01))
    assert gumbel_temperature(500, 100, "exp") == pytest.approx(0.01)  # held past the end
    # The code's exp and linear strategies, which end at 0.09.
    assert gumbel_temperature(30, 100, "exp", end=0.09) == pytest.approx(0.9 * 0.1 ** 0.3)
    assert gumbel_temperature(30, 100, "linear", end=0.09) == pytest.approx(0.9 - 0.81 * 0.3)
    with pytest.raises(ValueError, match="one of fixed, linear, exp"):
        gumbel_temperature(0, 1, "cosine")


def test_prototype_bank_training_eval_and_init() -> None:
    torch.manual_seed(0)
    bank = SentencePrototypeBank(6, 4, init="l1")
    torch.testing.assert_close(bank.prototypes.abs().sum(-1), torch.ones(6))
    assert SentencePrototypeBank(6, 4, init="gaussian").prototypes.abs().sum(-1).max() > 1
    x = torch.randn(3, 4, generator=_gen(0))
    logits = x @ bank.prototypes.T
    bank.train()
    noisy = [bank(x)["prototype_sentences"] for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1])  # Gumbel noise in training
    bank.eval()
    bank.set_temperature(0.5)
    out = bank(x)
    torch.testing.assert_close(out["bank_logits"], logits)
    want = torch.softmax(logits / 0.5, -1) @ bank.prototypes
    torch.testing.assert_close(out["prototype_sentences"], want)
    torch.testing.assert_close(bank(x)["prototype_sentences"], want)  # deterministic
    hard = SentencePrototypeBank(6, 4, eval_mode="argmax").eval()
    got = hard(x)
    torch.testing.assert_close(got["prototype_sentences"], hard.prototypes[got["assignment"]])
    assert "temperature" in bank.state_dict()
    with pytest.raises(ValueError, match="> 0"):
        bank.set_temperature(0.0)


@pytest.mark.parametrize("training", [True, False])
def test_prototype_bank_runs_in_float32_under_autocast(training: bool) -> None:
    """At the annealed temperature (0.01) the Gumbel-softmax multiplies the logits by 100: the bank
    must give under autocast exactly what it gives in float32 (same noise, same weights)."""
    bank = SentencePrototypeBank(6, 16, temperature=0.01).train(training)
    x = (3 * torch.randn(5, 16, generator=torch.Generator().manual_seed(0))).bfloat16()
    torch.manual_seed(1)
    plain = bank(x.float())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = bank(x)  # a half-precision input, as a layer under autocast gives it
    for key in ("prototype_sentences", "bank_logits", "assignment"):
        assert torch.equal(mixed[key], plain[key]), key


def test_word_pool_mean_and_attention_match_loops() -> None:
    gen = _gen(1)
    tokens = torch.randn(2, 7, 8, generator=gen)
    index = torch.tensor([[-1, 0, 0, 1, 1, 1, -1], [-1, 0, 0, 0, -1, -1, -1]])
    mean = WordPool(8, "mean")
    got, mask = mean(tokens, index)
    assert mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(got[0, 1], tokens[0, 3:6].mean(0))
    torch.testing.assert_close(got[1, 1], torch.zeros(8))
    pool = WordPool(8, "attention")
    got, _ = pool(tokens, index)
    for b, t, members in ((0, 0, [1, 2]), (0, 1, [3, 4, 5]), (1, 0, [1, 2, 3])):
        x = tokens[b, members]
        key_sum = pool.key(x).sum(0)
        energy = torch.stack([pool.query(x[i]) @ key_sum for i in range(len(members))])
        want = (torch.softmax(energy, 0).unsqueeze(-1) * x).sum(0)
        torch.testing.assert_close(got[b, t], want)


def test_query_attention_pool_ignores_padding() -> None:
    torch.manual_seed(0)
    pool = QueryAttentionPool(8, 2)
    x = torch.randn(1, 3, 8, generator=_gen(2))
    padded = torch.cat([x, torch.full((1, 2, 8), 50.0)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(pool(padded, mask), pool(x))
    # The query is the mean token, which is also a key (CLIP's AttentionPool2d).
    q = x.mean(1, keepdim=True)
    want, _ = pool.attn(q, torch.cat([q, x], 1), torch.cat([q, x], 1))
    torch.testing.assert_close(pool(x), want[:, 0])


@pytest.mark.parametrize("positions, masked", [(9, False), (0, True)])
def test_query_attention_pool_is_torch_attention_of_the_mean_query(positions: int, masked: bool) -> None:
    """The pool's single-query form against ``nn.MultiheadAttention``'s own forward on the same
    parameters (every projection weight and bias random, the key bias included), values and
    gradients of the tokens and of every parameter."""
    torch.manual_seed(0)
    pool = QueryAttentionPool(32, 4, out_dim=16, num_positions=positions)
    with torch.no_grad():
        for parameter in pool.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=_gen(parameter.numel())) / 4)
    tokens = torch.randn(5, max(positions, 6), 32, generator=_gen(3), requires_grad=True)
    mask = torch.rand(5, tokens.shape[1], generator=_gen(4)) > 0.4 if masked else None

    def reference() -> torch.Tensor:
        if mask is None:
            mean = tokens.mean(1, keepdim=True)
        else:
            weights = mask.unsqueeze(-1).float()
            mean = (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        x = torch.cat([mean, tokens], 1) + (0 if pool.pos is None else pool.pos)
        padding = None if mask is None else ~torch.cat([torch.ones(5, 1, dtype=torch.bool), mask], 1)
        out, _ = pool.attn(x[:, :1], x, x, key_padding_mask=padding, need_weights=False)
        return pool.proj(out[:, 0])

    results = []
    for forward in (reference, lambda: pool(tokens, mask)):
        out = forward()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), [tokens, *pool.parameters()])
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    names = ["tokens", *(name for name, _ in pool.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_local_alignment_matches_per_sample_formulas() -> None:
    torch.manual_seed(0)
    lam = LocalAlignment(6)
    gen = _gen(3)
    patches = torch.randn(2, 4, 6, generator=gen)
    sentences = torch.randn(2, 3, 6, generator=gen)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = lam(patches, sentences, mask)
    for b, count in ((0, 3), (1, 2)):
        v, s = patches[b], sentences[b, :count]
        a_sv = torch.sigmoid(lam.q_txt(s) @ lam.k_img(v).T / math.sqrt(6))  # (T, P)
        a_vs = torch.sigmoid(lam.q_img(v) @ lam.k_txt(s).T / math.sqrt(6))  # (P, T)
        torch.testing.assert_close(out["attended_sentences"][b, :count], a_sv @ lam.v_img(v))
        torch.testing.assert_close(out["reconstructed_patches"][b], a_vs @ lam.v_txt(s))
        score = (a_sv.mean() + a_vs.mean()) / 2
        one = lam.mean_attention(v[None], s[:1])  # the local zero-shot score with sentence 0
        want = (torch.sigmoid(lam.q_txt(s[:1]) @ lam.k_img(v).T / math.sqrt(6)).mean()
                + torch.sigmoid(lam.q_img(v) @ lam.k_txt(s[:1]).T / math.sqrt(6)).mean()) / 2
        torch.testing.assert_close(one[0, 0], want)
        assert 0 < score < 1


def test_image_decoder_shapes_and_token_order() -> None:
    torch.manual_seed(0)
    decoder = ImageDecoder(16, grid=2, image_size=64, dropout=0.5)
    fmap = torch.randn(3, 16, 2, 2, generator=_gen(4))
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, P, D), row-major cells
    torch.testing.assert_close(decoder.to_map(tokens), fmap)
    assert decoder(tokens, tokens).shape == (3, 1, 64, 64)
    widths = [block.body[0].in_channels for block in decoder.blocks]
    assert widths == [32, 16, 8, 4, 2]  # 2D, then halving


@pytest.mark.parametrize("causal", [False, True])
def test_report_decoder_causal_switch(causal: bool) -> None:
    torch.manual_seed(0)
    decoder = ReportDecoder(8, layers=2, heads=2, queries=4, causal=causal, dropout=0.0).eval()
    patches = torch.randn(1, 3, 8, generator=_gen(5))
    before = decoder(patches)
    with torch.no_grad():
        decoder.queries[0, 3] += torch.randn(8, generator=_gen(6))  # LayerNorm hides a constant
    after = decoder(patches)
    changed_early = not torch.allclose(before[0, :3], after[0, :3])
    assert changed_early is not causal  # non-causal: every query sees the last one
    assert not torch.allclose(before[0, 3], after[0, 3])


def test_default_bank_keeps_sentences_apart() -> None:
    """At the paper's width the default bank maps different sentences to different vectors; the
    Supp's L1-normalised bank maps them all to nearly the same one (the stage-2 collapse)."""
    torch.manual_seed(0)
    x = torch.randn(64, 768, generator=_gen(1))  # sentence vectors of unit-variance entries

    def spread(bank: SentencePrototypeBank) -> float:
        with torch.no_grad():
            out = bank.eval()(x)["prototype_sentences"]
        return float(out.std(0).mean() / x.std(0).mean())

    assert spread(SentencePrototypeBank(512, 768)) > 0.5
    assert spread(SentencePrototypeBank(512, 768, init="l1")) < 0.01
