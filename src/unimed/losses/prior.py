"""PRIOR's objectives (spec: shared/specs/PRIOR.md §3-6), one module per objective.

Every loss takes tensors and returns {"<name>_loss": scalar}; rank and world size are explicit and
the global losses gather negatives across ranks with gradient (conventions in
:mod:`unimed.losses.common`). Learnable scales (exp of a log-scale parameter) are inputs: the model
owns them. :class:`PriorLoss` sums the terms each training stage turns on (§6).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from unimed.losses.common import float32_forward, gather_features
from unimed.losses.contrastive import info_nce
from unimed.models.prior_config import STAGES, PriorConfig


class GlobalAlignmentLoss(nn.Module):
    """Global image-report InfoNCE (spec §3.1): ½[CE(s z_v Z_t^T) + CE(s z_t Z_v^T)].

    z are L2-normalised, Z the same features gathered from every rank with gradient, the positive
    of local row i is row rank * B + i (the *global* rank, unlike the code's local rank: §11-B1),
    and s = exp(logit_scale) is learnable. Also the stage-3 "gpa" term (predicted vs true report,
    §5.2), under the key ``f"{name}_loss"``.
    """

    def __init__(self, name: str = "global") -> None:
        super().__init__()
        self.key = f"{name}_loss"

    @float32_forward
    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, *,
                rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """(B, D) paired features, scalar log-scale -> {key: scalar}."""
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        temperature = torch.exp(-logit_scale)
        offset = rank * image.shape[0]
        i2t = info_nce(image, gather_features(text, rank, world_size), offset, temperature)
        t2i = info_nce(text, gather_features(image, rank, world_size), offset, temperature)
        return {self.key: (i2t + t2i) / 2}


class LocalSentenceLoss(nn.Module):
    """Local image-to-report loss (Supp §2.3; spec §3.3): per report, its sentences s and their
    image-attended versions s_hat (LAM) are positives; the *other sentences of the same report*
    are the negatives. L = ½[CE(s_l n(s_hat) n(s)^T) + CE(s_l n(s) n(s_hat)^T)], labels = arange(T),
    mean over the report's sentences, then over reports; s_l = exp(local_logit_scale)."""

    @float32_forward
    def forward(self, sentences: torch.Tensor, attended: torch.Tensor, mask: torch.Tensor,
                logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T, D) sentences and s_hat, (B, T) mask of real sentences -> {"local_sentence_loss"}."""
        s, s_hat = F.normalize(sentences, dim=-1), F.normalize(attended, dim=-1)
        mask = mask.bool()
        logits = torch.exp(logit_scale) * s_hat @ s.transpose(1, 2)  # (B, T, T)
        pair = mask.unsqueeze(2) & mask.unsqueeze(1)
        total = 0.0
        for scores in (logits, logits.transpose(1, 2)):
            scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)
            nll = -torch.diagonal(torch.log_softmax(scores, dim=-1), dim1=1, dim2=2)  # (B, T)
            total = total + _masked_row_mean(nll, mask)
        return {"local_sentence_loss": (total / 2).mean()}


def _masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values, (B, T) bool -> (B,) mean over each row's true entries."""
    weights = mask.to(values.dtype)
    return (values * weights).sum(-1) / weights.sum(-1).clamp_min(1)


class LocalPatchLoss(nn.Module):
    """Local report-to-image loss (spec §3.4), SimSiam without negatives (overlapping receptive
    fields): L = -½[cos(h(v), sg(v_hat)) + cos(h(v_hat), sg(v))], mean over patches and images.
    h is the model's shared predictor; its outputs come in as `patch_prediction` and
    `reconstructed_prediction`."""

    @float32_forward
    def forward(self, patches: torch.Tensor, reconstructed: torch.Tensor,
                patch_prediction: torch.Tensor, reconstructed_prediction: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """(B, P, D) v, v_hat, h(v), h(v_hat) -> {"local_patch_loss"}."""
        a = F.cosine_similarity(patch_prediction, reconstructed.detach(), dim=-1).mean()
        b = F.cosine_similarity(reconstructed_prediction, patches.detach(), dim=-1).mean()
        return {"local_patch_loss": -(a + b) / 2}


class PrototypeLoss(nn.Module):
    """SPB term (spec §4.2): mean |SPB(x) - x| over the real sentences; no stop-gradient."""

    @float32_forward
    def forward(self, sentences: torch.Tensor, prototype_sentences: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """(N, D) sentence vectors and their SPB outputs -> {"spb_loss"}."""
        return {"spb_loss": (prototype_sentences - sentences).abs().mean()}


class ImageReconstructionLoss(nn.Module):
    """CCR image term (spec §5.1): L1 to the z-scored input image (resized bilinearly only if the
    decoder's output size differs)."""

    @float32_forward
    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, S, S) decoder output and target -> {"image_rec_loss"}."""
        if target.shape[-2:] != prediction.shape[-2:]:
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear",
                                   align_corners=False)
        return {"image_rec_loss": F.l1_loss(prediction, target)}


def hungarian_permutation(cost: np.ndarray) -> np.ndarray:
    """(Q, Q) cost[i, j] of prediction i for target j -> perm with perm[j] = the prediction
    matched to target j by the minimum-cost assignment (scipy's linear_sum_assignment).

    The public code indexes predictions by ``col`` (spec §11-B3), which is right only when the
    assignment is its own inverse; pairing pred[row[i]] with target[col[i]] gives perm[col] = row.
    """
    row, col = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[1], dtype=np.int64)
    perm[col] = row
    return perm


def hungarian_align(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) predictions reordered so row j of each sample is the one matched to target j
    under the L1 cost (spec §5.2; padded target rows take part, as in the code). The matching is
    not differentiated; the gradient flows through the selected predictions."""
    cost = torch.cdist(prediction.detach().float(), target.detach().float(), p=1).cpu().numpy()
    perms = np.stack([hungarian_permutation(c) for c in cost])  # (B, Q)
    index = torch.as_tensor(perms, device=prediction.device)
    return torch.gather(prediction, 1, index.unsqueeze(-1).expand_as(prediction))


class ReportReconstructionLoss(nn.Module):
    """CCR report terms (spec §5.2) on Hungarian-aligned predictions.

    "spg_loss": L1 between the aligned predictions and the SPB targets (zero-padded to Q rows,
    padding included: unmatched queries are pushed to 0), mean over Q x D, then over the batch.
    "kl_loss": KL(softmax(x E^T) || softmax(s_hat E^T)) over the real sentences, batchmean over all
    of them: x E^T are the true sentences' bank logits, s_hat the matched predictions.
    """

    @float32_forward
    def forward(self, aligned: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                target_logits: torch.Tensor, prototypes: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, Q, D) aligned, (B, Q, D) target, (B, Q) mask, (B, Q, K) bank logits of the true
        sentences, (K, D) bank -> {"spg_loss", "kl_loss"}."""
        real = mask.bool()
        log_pred = torch.log_softmax(aligned[real] @ prototypes.T, dim=-1)  # (N, K)
        log_true = torch.log_softmax(target_logits[real], dim=-1)
        kl = F.kl_div(log_pred, log_true, reduction="batchmean", log_target=True)
        return {"spg_loss": F.l1_loss(aligned, target), "kl_loss": kl}


class PriorLoss(nn.Module):
    """PRIOR's total loss for one stage (spec §6): a weighted sum of the terms the stage uses.

    Stage 1: L_g + L_patch + L_sentence; stage 2 adds w_spb L_spb; stage 3 adds the CCR terms
    (image L1, spg, kl, gpa) and weighs L_g by `stage3_global_weight`. Returns each enabled term
    already weighted and their sum under "loss"; weight 0 drops a term and its key.
    """

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_loss = GlobalAlignmentLoss("global")
        self.gpa_loss = GlobalAlignmentLoss("gpa")
        self.sentence_loss = LocalSentenceLoss()
        self.patch_loss = LocalPatchLoss()
        self.spb_loss = PrototypeLoss()
        self.image_loss = ImageReconstructionLoss()
        self.report_loss = ReportReconstructionLoss()

    def weights(self, stage: int) -> dict[str, float]:
        """Term name -> weight in `stage` (terms of later stages are absent)."""
        if stage not in STAGES:
            raise ValueError(f"PRIOR stage must be one of {STAGES}, got {stage!r}")
        cfg = self.cfg
        out = {
            "global_loss": cfg.stage3_global_weight if stage == 3 else cfg.global_weight,
            "local_sentence_loss": cfg.local_sentence_weight,
            "local_patch_loss": cfg.local_patch_weight,
        }
        if stage >= 2:
            out["spb_loss"] = cfg.spb_weight
        if stage == 3:
            out.update(image_rec_loss=cfg.image_rec_weight, spg_loss=cfg.spg_weight,
                       kl_loss=cfg.kl_weight, gpa_loss=cfg.gpa_weight)
        return {k: w for k, w in out.items() if w > 0}

    def forward(self, outputs: dict[str, torch.Tensor], stage: int, *, rank: int = 0,
                world_size: int = 1) -> dict[str, torch.Tensor]:
        """The model's stage-`stage` outputs -> weighted terms and "loss"."""
        weights = self.weights(stage)
        if not weights:
            raise ValueError(f"every PRIOR loss weight of stage {stage} is 0: nothing to train")
        dist = {"rank": rank, "world_size": world_size}
        o = outputs
        terms = self.global_loss(o["image_global"], o["text_global"], o["logit_scale"], **dist)
        terms |= self.sentence_loss(o["sentences"], o["attended_sentences"], o["sentence_mask"],
                                    o["local_logit_scale"])
        terms |= self.patch_loss(o["patches"], o["reconstructed_patches"], o["patch_prediction"],
                                 o["reconstructed_prediction"])
        if "spb_loss" in weights:
            terms |= self.spb_loss(o["raw_sentences"], o["prototype_sentences"])
        if stage == 3:
            terms |= self.image_loss(o["image_reconstruction"], o["image_target"])
            terms |= self.report_loss(o["report_prediction"], o["report_target"],
                                      o["report_mask"], o["report_target_logits"], o["prototypes"])
            terms |= self.gpa_loss(o["predicted_text_global"], o["text_global"],
                                   o["logit_scale"], **dist)
        weighted = {k: weights[k] * v for k, v in terms.items() if k in weights}
        weighted["loss"] = torch.stack(list(weighted.values())).sum()
        return weighted
