"""The Med-UniC objective L = w_cvl * L_CVL + w_ssv * L_SSV + w_ctr * (L_TF + L_TT) (Eq. 1, 7)."""

from __future__ import annotations

import torch
from torch import nn

from unimed.losses.contrastive import CVLLoss, SSVLoss
from unimed.losses.ctr import CTRLoss
from unimed.models.config import MedUniCLossConfig


class MedUniCLoss(nn.Module):
    """Weighted sum of the enabled Med-UniC losses; weight 0 switches a loss (and its key) off.

    Takes the model's output dict as keyword arguments plus explicit `rank` / `world_size`, and
    returns each enabled term *already multiplied by its weight* ("cvl_loss", "ssv_loss", "tf_loss",
    "tt_loss"), so that "loss" is exactly the sum of the returned ``*_loss`` entries. Per-rank
    values follow :mod:`unimed.losses.common`: their mean over ranks is the global loss.
    """

    def __init__(self, cfg: MedUniCLossConfig) -> None:
        super().__init__()
        if cfg.cvl_weight == 0 and cfg.ssv_weight == 0 and cfg.ctr_weight == 0:
            raise ValueError(
                "method.loss.cvl_weight, ssv_weight and ctr_weight are all 0: nothing to train"
            )
        self.cfg = cfg
        self.cvl = CVLLoss(cfg.temperature) if cfg.cvl_weight > 0 else None
        self.ssv = SSVLoss(cfg.ssv_temperature, cfg.ssv_symmetric) if cfg.ssv_weight > 0 else None
        self.ctr = CTRLoss(cfg.ctr_lambda) if cfg.ctr_weight > 0 else None

    def forward(
        self, *, rank: int = 0, world_size: int = 1, **outputs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Model outputs ("image_features", "image_aug_features", "text_features", "ctr_a",
        "ctr_b"; extra keys are ignored) -> weighted terms and their sum under "loss"."""
        dist = {"rank": rank, "world_size": world_size}
        terms: dict[str, torch.Tensor] = {}
        if self.cvl is not None:
            image, text = _take(outputs, "image_features", "text_features", loss="CVL")
            terms.update(_scaled(self.cvl(image, text, **dist), self.cfg.cvl_weight))
        if self.ssv is not None:
            view1, view2 = _take(outputs, "image_features", "image_aug_features", loss="SSV")
            terms.update(_scaled(self.ssv(view1, view2, **dist), self.cfg.ssv_weight))
        if self.ctr is not None:
            view_a, view_b = _take(outputs, "ctr_a", "ctr_b", loss="CTR")
            terms.update(_scaled(self.ctr(view_a, view_b, **dist), self.cfg.ctr_weight))
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms


def _take(outputs: dict[str, torch.Tensor], *keys: str, loss: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(
            f"{loss} loss needs model outputs {list(keys)}; missing {missing} "
            f"(got {sorted(outputs)}); is method.loss.{loss.lower()}_weight 0?"
        )
    return [outputs[k] for k in keys]


def _scaled(terms: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    return {name: weight * value for name, value in terms.items()}
