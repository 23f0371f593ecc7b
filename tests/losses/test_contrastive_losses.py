"""CVL and SSV against loop implementations of the paper's Eq. 2-4 and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from unimed.losses import CVLLoss, SSVLoss


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]


def _nce_row(query: list[float], keys: list[list[float]], positive: int, tau: float) -> float:
    """-log(exp(s_ii / tau) / sum_j exp(s_ij / tau)) for one query, plain Python floats."""
    sims = [sum(q * k for q, k in zip(query, key)) / tau for key in keys]
    return -(sims[positive] - math.log(sum(math.exp(s) for s in sims)))


def reference_cvl(image: torch.Tensor, text: torch.Tensor, tau: float) -> float:
    """Eq. 2-3: (1 / 2K) sum_i (L_i^v2l + L_i^l2v)."""
    v, l = _unit(image.tolist()), _unit(text.tolist())
    k = len(v)
    total = sum(_nce_row(v[i], l, i, tau) + _nce_row(l[i], v, i, tau) for i in range(k))
    return total / (2 * k)


def reference_ssv(view1: torch.Tensor, view2: torch.Tensor, tau: float) -> float:
    """Eq. 4: (1 / K) sum_i -log softmax_j(s_ij^{v v'} / tau)[i]."""
    v, w = _unit(view1.tolist()), _unit(view2.tolist())
    return sum(_nce_row(v[i], w, i, tau) for i in range(len(v))) / len(v)


def test_cvl_matches_equation_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    got = CVLLoss(temperature=0.07)(image, text)["cvl_loss"]
    assert got.item() == pytest.approx(reference_cvl(image, text, 0.07), rel=1e-5)


def test_cvl_hand_computed_orthogonal_pairs() -> None:
    # Matched pairs identical, pairs orthogonal: every row's logits are (1/tau, 0).
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    got = CVLLoss(temperature=0.5)(features, features)["cvl_loss"]
    assert got.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_cvl_scale_invariant_and_finite_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(4, 6, generator=gen, requires_grad=True)
    text = torch.randn(4, 6, generator=gen, requires_grad=True)
    loss = CVLLoss()(image, text)["cvl_loss"]
    scaled = CVLLoss()(image * 7.0, text * 0.1)["cvl_loss"]
    torch.testing.assert_close(loss, scaled)
    loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert image.grad.abs().sum() > 0


def test_ssv_is_one_directional_eq4() -> None:
    gen = torch.Generator().manual_seed(2)
    view1, view2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    got = SSVLoss(temperature=0.07)(view1, view2)["ssv_loss"]
    assert got.item() == pytest.approx(reference_ssv(view1, view2, 0.07), rel=1e-5)
    assert got.item() != pytest.approx(reference_ssv(view2, view1, 0.07), rel=1e-3)


def test_ssv_symmetric_option_averages_both_directions() -> None:
    gen = torch.Generator().manual_seed(3)
    view1, view2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    got = SSVLoss(temperature=0.1, symmetric=True)(view1, view2)["ssv_loss"]
    expected = (reference_ssv(view1, view2, 0.1) + reference_ssv(view2, view1, 0.1)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_losses_run_in_float32_from_half_inputs() -> None:
    gen = torch.Generator().manual_seed(4)
    image, text = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    loss = CVLLoss()(image.half(), text.half())["cvl_loss"]
    assert loss.dtype == torch.float32
    expected = reference_cvl(image.half().float(), text.half().float(), 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
