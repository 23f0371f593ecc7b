"""The combined Med-UniC objective: weights, switches and error messages."""

from __future__ import annotations

import pytest
import torch

from unimed.losses import CTRLoss, CVLLoss, MedUniCLoss, SSVLoss
from unimed.models.config import MedUniCLossConfig

KEYS = ("image_features", "image_aug_features", "text_features", "ctr_a", "ctr_b")


def _outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(6, 5, generator=gen, requires_grad=True) for k in KEYS}


def test_default_weights_sum_all_terms() -> None:
    out = _outputs()
    losses = MedUniCLoss(MedUniCLossConfig())(**out)
    cvl = CVLLoss(0.07)(out["image_features"], out["text_features"])["cvl_loss"]
    ssv = SSVLoss(0.07)(out["image_features"], out["image_aug_features"])["ssv_loss"]
    ctr = CTRLoss(5.1e-3)(out["ctr_a"], out["ctr_b"])
    torch.testing.assert_close(losses["cvl_loss"], cvl)
    torch.testing.assert_close(losses["ssv_loss"], ssv)
    torch.testing.assert_close(losses["tf_loss"], ctr["tf_loss"])
    torch.testing.assert_close(losses["loss"], cvl + ssv + ctr["tf_loss"] + ctr["tt_loss"])


def test_weights_scale_terms_and_zero_removes_them() -> None:
    out = _outputs(1)
    cfg = MedUniCLossConfig(cvl_weight=2.0, ssv_weight=0.0, ctr_weight=0.5, ssv_symmetric=True)
    losses = MedUniCLoss(cfg)(**out)
    assert set(losses) == {"cvl_loss", "tf_loss", "tt_loss", "loss"}
    plain = MedUniCLoss(MedUniCLossConfig())(**out)
    torch.testing.assert_close(losses["cvl_loss"], 2.0 * plain["cvl_loss"])
    torch.testing.assert_close(losses["tt_loss"], 0.5 * plain["tt_loss"])
    terms = [v for k, v in losses.items() if k.endswith("_loss")]
    torch.testing.assert_close(losses["loss"], sum(terms))
    losses["loss"].backward()
    assert out["image_aug_features"].grad is None
    assert torch.isfinite(out["ctr_a"].grad).all()


def test_switched_off_losses_need_no_outputs() -> None:
    out = _outputs(2)
    cvl_only = {k: out[k] for k in ("image_features", "text_features")}
    losses = MedUniCLoss(MedUniCLossConfig(ssv_weight=0.0, ctr_weight=0.0))(**cvl_only)
    assert set(losses) == {"cvl_loss", "loss"}


def test_missing_output_names_loss_and_key() -> None:
    out = _outputs()
    del out["ctr_b"]
    with pytest.raises(KeyError, match="CTR.*ctr_b"):
        MedUniCLoss(MedUniCLossConfig())(**out)


def test_all_weights_zero_is_an_error() -> None:
    with pytest.raises(ValueError, match="all 0"):
        MedUniCLoss(MedUniCLossConfig(cvl_weight=0.0, ssv_weight=0.0, ctr_weight=0.0))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="method.loss.ssv_weight"):
        MedUniCLossConfig(ssv_weight=-1.0)
    with pytest.raises(ValueError, match="method.loss.temperature"):
        MedUniCLossConfig(temperature=0.0)
