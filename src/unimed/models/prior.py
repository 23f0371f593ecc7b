"""PRIOR (ICCV 2023): global + local image-report alignment, a sentence prototype bank and
cross-modality conditional reconstruction (spec: shared/specs/PRIOR.md).

The towers come from the framework's builders (any image encoder preset, the cross-lingual BERT),
so PRIOR trains on both languages. ``forward(batch, stage)`` returns the tensors
:class:`unimed.losses.prior.PriorLoss` consumes for that stage; the batch carries, besides "image",
"input_ids" and "attention_mask", a per-token "sentence_index" (0-based sentence id, -1 for [CLS],
[SEP] and padding). Patch tokens are ``flatten(2).transpose(1, 2)`` of the last feature map
(row-major cells; the public code's ``view`` scrambles them, spec §11-B2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel

from unimed.losses.prior import hungarian_align
from unimed.models.prior_config import STAGES, PriorConfig
from unimed.models.prior_layers import (
    ImageDecoder,
    LocalAlignment,
    QueryAttentionPool,
    ReportDecoder,
    SentencePrototypeBank,
    WordPool,
)
from unimed.models.text import token_states


PRIOR_MEAN = (0.4755,) * 3  # Supp §2.1: grey intensities in [0, 1], z-scored
PRIOR_STD = (0.3011,) * 3


def combine_scores(global_scores: torch.Tensor, local_scores: torch.Tensor,
                   local_weight: float = 1.0) -> torch.Tensor:
    """PRIOR's zero-shot rule (Supp §3.2): softmax(global) + local_weight * softmax(local), both
    over the last axis (the candidates). The Supp adds them (weight 1), the released code uses 0.5."""
    return torch.softmax(global_scores, dim=-1) + local_weight * torch.softmax(local_scores, dim=-1)


class Prior(nn.Module):
    """The PRIOR model. ``stage`` (a checkpointed buffer, 1-3) says which parts have been trained:
    from stage 2 on, sentences pass through the prototype bank wherever they are used, at
    evaluation too (deterministically)."""

    zero_shot_prompt = "observed"  # the prompt template evaluation uses: "{X} is observed"

    def __init__(self, cfg: PriorConfig, image_encoder: nn.Module, text_encoder: BertModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = image_encoder
        self.text = text_encoder
        mean, std = cfg.image.mean or PRIOR_MEAN, cfg.image.std or PRIOR_STD
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("stage", torch.tensor(1))
        stride = int(image_encoder.feature_info[-1]["reduction"])
        if cfg.image_size % stride:
            raise ValueError(f"method.image_size {cfg.image_size} is not a multiple of the "
                             f"{cfg.image.encoder} encoder's stride {stride}")
        self.grid = cfg.image_size // stride
        width, dim = int(image_encoder.num_features), cfg.embed_dim
        self.image_pool = QueryAttentionPool(width, cfg.pool_heads, num_positions=self.grid**2)
        self.global_image_proj = nn.Linear(width, dim)
        self.local_image_proj = nn.Linear(width, dim)
        self.local_text_proj = nn.Linear(int(text_encoder.config.hidden_size), dim)
        self.word_pool = WordPool(dim, cfg.word_pooling)
        self.sentence_pool = QueryAttentionPool(dim, cfg.pool_heads)
        self.predictor = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(inplace=True),
                                       nn.Linear(dim // 2, dim))
        self.lam = LocalAlignment(dim)
        self.bank = SentencePrototypeBank(cfg.prototypes, dim, init=cfg.prototype_init,
                                          temperature=cfg.gumbel_start, eval_mode=cfg.bank_eval)
        self.image_decoder = ImageDecoder(dim, self.grid, cfg.image_size, dropout=cfg.image_dropout)
        self.report_decoder = ReportDecoder(dim, layers=cfg.decoder_layers, heads=cfg.decoder_heads,
                                            queries=cfg.decoder_queries, causal=cfg.decoder_causal)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
        self.local_logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.local_temperature)))

    def set_stage(self, stage: int) -> None:
        """Enter training stage 1 (alignment), 2 (+ prototype bank) or 3 (+ reconstruction)."""
        if stage not in STAGES:
            raise ValueError(f"PRIOR stage must be one of {STAGES}, got {stage!r}")
        self.stage.fill_(stage)

    @property
    def temperature(self) -> float:
        """The global InfoNCE temperature as learned (1 / exp(logit_scale))."""
        return float(torch.exp(-self.logit_scale.detach()))

    # ----------------------------------------------------------------------------- image side
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) grey pixels in [0, 1] -> PRIOR's z-score (mean 0.4755, std 0.3011)."""
        return (image - self.pixel_mean) / self.pixel_std

    def _image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> ((B, P, width) cell tokens, (B, width) attention-pooled global)."""
        fmap = self.visual.forward_features(self.preprocess(image))  # (B, W, g, g)
        if fmap.dim() != 4:
            raise ValueError(f"PRIOR needs a convolutional image encoder (a feature map), "
                             f"{self.cfg.image.encoder} gives shape {tuple(fmap.shape)}")
        if fmap.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"image of size {tuple(image.shape[-2:])} gives a "
                             f"{tuple(fmap.shape[-2:])} grid; the model was built for "
                             f"method.image_size={self.cfg.image_size}")
        cells = fmap.flatten(2).transpose(1, 2)  # (B, P, W)
        return cells, self.image_pool(cells)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, embed_dim) global image embedding z_v."""
        features = self.project_image(self._image_features(image)[1])
        return F.normalize(features, dim=-1) if normalize else features

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, width) attention-pooled image features -> (B, embed_dim) z_v."""
        return self.global_image_proj(pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """The identity: PRIOR's pooled report feature is already its embedding z_t."""
        return pooled

    def image_patches(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, P, embed_dim) projected patch tokens v."""
        return self.local_image_proj(self._image_features(image)[0])

    def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width) attention-pooled backbone features (linear probes)."""
        return self._image_features(image)[1]

    def forward_intermediates(self, image: torch.Tensor,
                              indices: int | list[int] | None = None) -> list[torch.Tensor]:
        """Dense feature maps of the image backbone, shallow to deep (timm's indices)."""
        return self.visual.forward_intermediates(self.preprocess(image), indices=indices,
                                                 intermediates_only=True)

    # ------------------------------------------------------------------------------ text side
    def sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  sentence_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> ((B, T, D) sentence vectors, (B, T) mask): local text projection of every
        token, then word pooling per sentence id. Without `sentence_index` the whole text between
        [CLS] and [SEP] is one sentence (prompts)."""
        if sentence_index is None:
            sentence_index = single_sentence_index(attention_mask)
        text = self.cfg.text
        hidden = token_states(self.text, input_ids, attention_mask,
                              shared_layers=0 if text.frozen_dropout else text.frozen_layers)
        return self.word_pool(self.local_text_proj(hidden), sentence_index)

    def use_bank(self) -> bool:
        """True from stage 2 on: sentences are replaced by their prototypes."""
        return int(self.stage) >= 2

    def through_bank(self, sentences: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """SPB on the real rows of (B, T, D) -> (B, T, D) "prototype_sentences" and (B, T, K)
        "bank_logits", zero on padding."""
        out = self.bank(sentences[mask])
        return {key: _scatter_rows(out[key], mask) for key in ("prototype_sentences", "bank_logits")}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = False, sentence_index: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, L) tokens -> (B, embed_dim) global report embedding z_t (sentences, prototypes from
        stage 2 on, sentence attention pool)."""
        sentences, mask = self.sentences(input_ids, attention_mask, sentence_index)
        if self.use_bank():
            sentences = self.through_bank(sentences, mask)["prototype_sentences"]
        features = self.sentence_pool(sentences, mask)
        return F.normalize(features, dim=-1) if normalize else features

    def pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, embed_dim) global report embedding (PRIOR has no other pooling)."""
        return self.encode_text(input_ids, attention_mask)

    def lock_image(self) -> None:
        """Freeze the image backbone and its pool and projections."""
        for module in (self.visual, self.image_pool, self.global_image_proj, self.local_image_proj):
            module.requires_grad_(False)

    def lock_text(self) -> None:
        """Freeze the text encoder, its projection and pools."""
        for module in (self.text, self.local_text_proj, self.word_pool, self.sentence_pool):
            module.requires_grad_(False)

    # ------------------------------------------------------------------------------- zero-shot
    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """C one-sentence prompts -> "global" (C, D) normalised z_prompt and "sentence" (C, D) the
        prompt's sentence vector (the LAM's text side), encoded deterministically (no Gumbel
        noise). Encode them once and score any number of image batches with :meth:`prompt_scores`."""
        sentences, mask = self.sentences(input_ids, attention_mask)
        if self.use_bank():
            sentences = self.through_bank(sentences, mask)["prototype_sentences"]
        return {"global": F.normalize(self.sentence_pool(sentences, mask), dim=-1),
                "sentence": sentences[:, 0]}

    @torch.no_grad()
    def prompt_scores(self, image: torch.Tensor,
                      prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """N images, C prompts from :meth:`encode_prompts` -> "global" (N, C) s * cos(z_v,
        z_prompt) and "local" (N, C) ½[mean A_vs + mean A_sv], the mean sigmoid LAM weights
        between the patches and the prompt sentence (spec §7)."""
        cells, pooled = self._image_features(image)
        z_v = F.normalize(self.global_image_proj(pooled), dim=-1)  # (N, D)
        global_scores = self.logit_scale.exp() * z_v @ prompts["global"].T
        local_scores = self.lam.mean_attention(self.local_image_proj(cells), prompts["sentence"])
        return {"global": global_scores, "local": local_scores}

    @torch.no_grad()
    def zero_shot_prompts(self, positive: tuple[torch.Tensor, torch.Tensor],
                          negative: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The C positive and C negative prompts ((ids, mask) of shape (C, L) each) encoded for
        :meth:`zero_shot_scores`: the positives' rows first."""
        width = max(positive[0].shape[1], negative[0].shape[1])
        ids = torch.cat([F.pad(positive[0], (0, width - positive[0].shape[1])),
                         F.pad(negative[0], (0, width - negative[0].shape[1]))])
        mask = torch.cat([F.pad(positive[1], (0, width - positive[1].shape[1])),
                          F.pad(negative[1], (0, width - negative[1].shape[1]))])
        return self.encode_prompts(ids, mask)

    @torch.no_grad()
    def zero_shot_scores(self, image: torch.Tensor, prompts: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) multi-label scores against :meth:`zero_shot_prompts`: per class, the observed
        prompt and the negative prompt are the two candidates of :func:`combine_scores`; the score
        is the first's combined score minus the second's (> 0: present)."""
        raw = self.prompt_scores(image, prompts)
        c = prompts["global"].shape[0] // 2
        pairs = [torch.stack([s[:, :c], s[:, c:]], dim=-1) for s in (raw["global"], raw["local"])]
        combined = combine_scores(*pairs, self.cfg.zero_shot_local_weight)  # (N, C, 2)
        return combined[..., 0] - combined[..., 1]

    # ---------------------------------------------------------------------------------- train
    def forward(self, batch: dict[str, Any], stage: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of `stage` (default: the model's) for :class:`PriorLoss`."""
        stage = int(self.stage) if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"PRIOR stage must be one of {STAGES}, got {stage!r}")
        image = _require(batch, "image")
        cells, pooled = self._image_features(image)
        patches = self.local_image_proj(cells)  # (B, P, D)
        raw, mask = self.sentences(_require(batch, "input_ids"), _require(batch, "attention_mask"),
                                   _require(batch, "sentence_index"))
        if stage == 3:  # CCR predicts at most `max_sentences` per report
            raw, mask = raw[:, : self.cfg.max_sentences], mask[:, : self.cfg.max_sentences]
        out = {"image_global": self.global_image_proj(pooled), "patches": patches,
               "sentence_mask": mask, "logit_scale": self.logit_scale,
               "local_logit_scale": self.local_logit_scale}
        sentences = raw
        if stage >= 2:
            bank = self.through_bank(raw, mask)
            sentences = bank["prototype_sentences"]
            out |= {"raw_sentences": raw[mask], "prototype_sentences": sentences[mask],
                    "bank_logits": bank["bank_logits"]}
        out["sentences"] = sentences
        out["text_global"] = self.sentence_pool(sentences, mask)
        lam = self.lam(patches, sentences, mask)
        out |= {"attended_sentences": lam["attended_sentences"],
                "reconstructed_patches": lam["reconstructed_patches"],
                "patch_prediction": self.predictor(patches),
                "reconstructed_prediction": self.predictor(lam["reconstructed_patches"])}
        if stage == 3:
            out |= self._reconstruction(image, patches, out)
        return out

    def _reconstruction(self, image: torch.Tensor, patches: torch.Tensor,
                        out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CCR (spec §5): the image from [masked v; v_hat], the report's prototypes from v."""
        queries = self.cfg.decoder_queries
        mask = _pad_rows(out["sentence_mask"], queries)  # (B, Q)
        target = _pad_rows(out["sentences"], queries)  # (B, Q, D)
        aligned = hungarian_align(self.report_decoder(patches), target)
        predicted = self.through_bank(aligned, mask)["prototype_sentences"]
        return {
            "image_reconstruction": self.image_decoder(patches, out["reconstructed_patches"]),
            "image_target": self.preprocess(image).mean(1, keepdim=True),
            "report_prediction": aligned,
            "report_target": target,
            "report_mask": mask,
            "report_target_logits": _pad_rows(out["bank_logits"], queries),
            "prototypes": self.bank.prototypes,
            "predicted_text_global": self.sentence_pool(predicted, mask),
        }


def single_sentence_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask of [CLS] text [SEP] padding -> (B, L) sentence ids: 0 on the text tokens, -1 on
    [CLS], the last real token ([SEP]) and padding (the code averages [SEP] in: spec §11-B8)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    length = attention_mask.sum(1, keepdim=True)
    inside = (positions > 0) & (positions < length - 1)
    return torch.where(inside, 0, -1)


def _scatter_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, X) rows for the true entries of a (B, T) mask -> (B, T, X), zero elsewhere."""
    out = rows.new_zeros(*mask.shape, rows.shape[-1])
    return out.index_put((mask,), rows)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, T, ...) -> (B, rows, ...) zero- (or False-) padded, T <= rows."""
    out = x.new_zeros(x.shape[0], rows, *x.shape[2:])
    out[:, : x.shape[1]] = x
    return out


def _require(batch: dict[str, Any], key: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"PRIOR needs batch['{key}']; batch keys: {sorted(batch)}")
    return batch[key]
