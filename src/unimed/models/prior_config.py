"""PRIOR's own config section: towers, blocks, loss weights and the paper-vs-code switches.

Defaults follow the PRIOR supplement where it and the released code disagree (spec
shared/specs/PRIOR.md §9-10); each switch names the code's value in its comment.
"""

from __future__ import annotations

import dataclasses

from unimed.models.prior_layers import (
    BANK_EVAL_MODES,
    GUMBEL_SCHEDULES,
    PROTOTYPE_INITS,
    WORD_POOLINGS,
)

STAGES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The PRIOR model and objective (spec §2-7).

    Towers: any registered image encoder preset (paper: resnet50) fed grey images z-scored with
    `image_mean` / `image_std` on every channel (a grey image copied to 3 channels through an RGB
    conv1 equals the code's 1-channel conv1 whose kernels are the RGB kernels summed); a BERT text
    encoder from a local folder or fresh of the ``text_*`` sizes, on the project's cross-lingual
    tokenizer. `image_size` fixes the patch grid (image_size / the encoder's stride).
    """

    name: str = "prior"
    image_encoder: str = "resnet50"
    image_weights: str | None = None
    image_size: int = 224
    image_mean: float = 0.4755
    image_std: float = 0.3011
    text_encoder: str | None = None
    tokenizer: str | None = None
    frozen_text_layers: int = 0
    text_dropout: float = 0.1
    text_hidden_size: int = 768
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    embed_dim: int = 768
    pool_heads: int = 8
    word_pooling: str = "attention"  # code: "mean"
    temperature: float = 0.01  # initial global InfoNCE temperature (learnable, unclamped)
    local_temperature: float = 0.01  # initial sentence-level InfoNCE temperature (learnable)
    prototypes: int = 512
    prototype_init: str = "l1"  # code: "gaussian" (no L1 normalisation)
    gumbel_schedule: str = "exp"  # code: "fixed" (0.9 throughout)
    gumbel_start: float = 0.9
    gumbel_end: float = 0.01  # code's linear / exp schedules end at 0.09
    bank_eval: str = "softmax"  # no Gumbel noise at evaluation (code: noisy)
    image_dropout: float = 0.5
    decoder_layers: int = 6  # code: 8
    decoder_heads: int = 12
    decoder_causal: bool = False  # code: True (HF's decoder mask)
    decoder_queries: int = 16
    max_sentences: int = 16  # stage 3 keeps each report's first sentences
    global_weight: float = 1.0
    stage3_global_weight: float = 10.0  # the code's hard-coded x10 on L_g in stage 3
    local_sentence_weight: float = 1.0
    local_patch_weight: float = 1.0
    spb_weight: float = 10.0
    image_rec_weight: float = 1.0
    spg_weight: float = 10.0
    kl_weight: float = 1.0
    gpa_weight: float = 1.0
    zero_shot_local_weight: float = 1.0  # code: 0.5

    def __post_init__(self) -> None:
        for key in ("image_size", "embed_dim", "pool_heads", "prototypes", "decoder_layers",
                    "decoder_heads", "decoder_queries", "max_sentences", "text_hidden_size",
                    "text_num_layers", "text_num_heads", "text_intermediate_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"prior.{key} must be > 0, got {getattr(self, key)}")
        for key in ("temperature", "local_temperature", "gumbel_start", "gumbel_end", "image_std"):
            if getattr(self, key) <= 0:
                raise ValueError(f"prior.{key} must be > 0, got {getattr(self, key)}")
        weights = [f.name for f in dataclasses.fields(self) if f.name.endswith("_weight")]
        for key in (*weights, "frozen_text_layers"):
            if getattr(self, key) < 0:
                raise ValueError(f"prior.{key} must be >= 0, got {getattr(self, key)}")
        for key, allowed in (("word_pooling", WORD_POOLINGS), ("prototype_init", PROTOTYPE_INITS),
                             ("gumbel_schedule", GUMBEL_SCHEDULES), ("bank_eval", BANK_EVAL_MODES)):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"prior.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        for key, heads in (("pool_heads", self.pool_heads), ("decoder_heads", self.decoder_heads)):
            if self.embed_dim % heads:
                raise ValueError(f"prior.embed_dim ({self.embed_dim}) must be divisible by prior.{key} ({heads})")
        if self.text_hidden_size % self.text_num_heads:
            raise ValueError(
                f"prior.text_hidden_size ({self.text_hidden_size}) must be divisible by "
                f"prior.text_num_heads ({self.text_num_heads})"
            )
        if self.max_sentences > self.decoder_queries:
            raise ValueError(f"prior.max_sentences ({self.max_sentences}) must not exceed "
                             f"prior.decoder_queries ({self.decoder_queries})")
        if not 0.0 <= self.image_dropout < 1.0 or not 0.0 <= self.text_dropout < 1.0:
            raise ValueError("prior.image_dropout and prior.text_dropout must be in [0, 1)")
