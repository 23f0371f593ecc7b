"""CTR (L_TF, L_TT) against loop implementations of Eq. 5-6 and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from unimed.losses import CTRLoss

EPS = 1e-5  # the loss's variance floor


def _standardise(values: list[float]) -> list[float]:
    """(x - mean) / (sqrt(n) * sigma): the paper's normalisation; a dot product is a correlation."""
    n = len(values)
    mean = sum(values) / n
    var = sum((x - mean) ** 2 for x in values) / n
    return [(x - mean) / (math.sqrt(n) * math.sqrt(var + EPS)) for x in values]


def _barlow(corr: list[list[float]], lambd: float) -> float:
    n = len(corr)
    on = sum((1 - corr[j][j]) ** 2 for j in range(n))
    off = sum(corr[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
    return on + lambd * off


def reference_tf(a: torch.Tensor, b: torch.Tensor, lambd: float) -> float:
    """Eq. 5: standardise each feature over the K samples, D' x D' correlation, divided by D'."""
    k, d = a.shape
    cols_a = [_standardise([a[i, j].item() for i in range(k)]) for j in range(d)]
    cols_b = [_standardise([b[i, j].item() for i in range(k)]) for j in range(d)]
    corr = [[sum(x * y for x, y in zip(cols_a[p], cols_b[q])) for q in range(d)] for p in range(d)]
    return _barlow(corr, lambd) / d


def reference_tt(a: torch.Tensor, b: torch.Tensor, lambd: float) -> float:
    """Eq. 6: standardise each sample over the D' features, K x K correlation, divided by K."""
    k = a.shape[0]
    rows_a = [_standardise(a[i].tolist()) for i in range(k)]
    rows_b = [_standardise(b[i].tolist()) for i in range(k)]
    corr = [[sum(x * y for x, y in zip(rows_a[p], rows_b[q])) for q in range(k)] for p in range(k)]
    return _barlow(corr, lambd) / k


@pytest.mark.parametrize("lambd", [5.1e-3, 0.5])
def test_ctr_matches_equation_loops(lambd: float) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    out = CTRLoss(lambd=lambd)(a, b)
    assert set(out) == {"tf_loss", "tt_loss"}
    assert out["tf_loss"].item() == pytest.approx(reference_tf(a, b, lambd), rel=1e-5)
    assert out["tt_loss"].item() == pytest.approx(reference_tt(a, b, lambd), rel=1e-5)


def test_tf_perfectly_correlated_views_have_no_invariance_term() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=gen)
    for b in (a, 2.0 * a + 3.0):
        assert CTRLoss(lambd=0.0)(a, b)["tf_loss"].item() == pytest.approx(0.0, abs=1e-6)
    # Anti-correlated features: every diagonal entry is -1, so each contributes (1 - (-1))^2 = 4.
    assert CTRLoss(lambd=0.0)(a, -a)["tf_loss"].item() == pytest.approx(4.0, rel=1e-4)


def test_hand_computed_swapped_features_and_samples() -> None:
    # Orthogonal +-1 patterns are already standardised (mean 0, variance 1).
    lambd = 0.1
    cols = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])  # K=4, D'=2
    ctr = CTRLoss(lambd=lambd)
    assert ctr(cols, cols)["tf_loss"].item() == pytest.approx(0.0, abs=1e-6)
    # Swapped features: C = [[0, 1], [1, 0]] -> (1 + 1 + lambda * 2) / D' = 1 + lambda.
    assert ctr(cols, cols.flip(1))["tf_loss"].item() == pytest.approx(1 + lambd, rel=1e-4)
    rows = cols.T.contiguous()  # K=2 samples, D'=4 features
    assert ctr(rows, rows)["tt_loss"].item() == pytest.approx(0.0, abs=1e-6)
    # Swapped samples: C = [[0, 1], [1, 0]] -> (2 + 2 * lambda) / K = 1 + lambda.
    assert ctr(rows, rows.flip(0))["tt_loss"].item() == pytest.approx(1 + lambd, rel=1e-4)


def test_gradients_finite_even_for_a_constant_feature() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=gen)
    a[:, 0] = 1.5  # zero variance over the batch
    a.requires_grad_(True)
    b = torch.randn(5, 4, generator=gen, requires_grad=True)
    out = CTRLoss()(a, b)
    (out["tf_loss"] + out["tt_loss"]).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert b.grad.abs().sum() > 0


def test_single_sample_is_rejected_for_tf() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        CTRLoss()(torch.randn(1, 3), torch.randn(1, 3))
