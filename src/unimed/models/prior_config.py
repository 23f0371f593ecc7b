"""PRIOR's own config section: towers, blocks, loss weights and the paper-vs-code switches.

Defaults follow the PRIOR supplement where it and the released code disagree (spec
shared/specs/PRIOR.md §9-10); each switch names the code's value in its comment.
"""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds
from unimed.models.config import ImageTowerConfig, TextTowerConfig

STAGES = (1, 2, 3)
STAGE_NAMES = ("alignment", "prototypes", "reconstruction")
WORD_POOLINGS = ("attention", "mean")
PROTOTYPE_INITS = ("l1", "gaussian")
GUMBEL_SCHEDULES = ("fixed", "linear", "exp")
BANK_EVAL_MODES = ("softmax", "argmax")


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The PRIOR model and objective (spec §2-7).

    Towers: any registered convolutional image encoder preset (paper: resnet50) fed grey images
    z-scored with PRIOR's statistics on every channel (a grey image copied to 3 channels through an
    RGB conv1 equals the code's 1-channel conv1 whose kernels are the RGB kernels summed); a BERT
    text encoder (fully fine-tuned: ``text.frozen_layers`` 0) on the project's cross-lingual
    tokenizer. `image_size` fixes the patch grid (image_size / the encoder's stride).
    `stage_epochs` are the epochs of stage 1 (alignment), 2 (+ prototype bank) and 3
    (+ reconstruction) (Supp: 20 / 30 / 50); `min_sentences` is the report filter (Supp: 4).
    """

    name: str = "prior"
    image: ImageTowerConfig = ImageTowerConfig(encoder="resnet50", mean=(0.4755,) * 3,
                                               std=(0.3011,) * 3)
    text: TextTowerConfig = TextTowerConfig(frozen_layers=0, hidden_size=768, num_layers=12,
                                            num_heads=12, intermediate_size=3072)
    image_size: int = 224
    stage_epochs: tuple[int, ...] = (20, 30, 50)
    min_sentences: int = 4
    embed_dim: int = 768
    pool_heads: int = 8
    word_pooling: str = "attention"  # code: "mean"
    temperature: float = 0.01  # initial global InfoNCE temperature (learnable, unclamped)
    local_temperature: float = 0.01  # initial sentence-level InfoNCE temperature (learnable)
    prototypes: int = 512
    # Supp: N(0, 1) + L1 normalisation; that makes every prototype entry ~1/D, the bank's output
    # ~0 for every sentence: on the phantom demo preset the global loss jumped to chance (ln 32)
    # at stage 2 and stayed there; with the code's plain N(0, 1) it stayed at its stage-1 level.
    prototype_init: str = "gaussian"
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
        if self.text.train_appended_rows:
            raise ValueError("method.text.train_appended_rows is a Med-UniC setting; this method "
                             "trains its text tower as method.text.frozen_layers says")
        if self.text.cache_frozen:
            raise ValueError("method.text.cache_frozen: PRIOR shuffles each report's sentences "
                             "every epoch, so a report's tokens do not repeat and nothing could "
                             "be reused; leave it false")
        weights = [f.name for f in dataclasses.fields(self) if f.name.endswith("_weight")]
        check_bounds("method", self,
                     positive=("image_size", "embed_dim", "pool_heads", "prototypes",
                               "decoder_layers", "decoder_heads", "decoder_queries", "max_sentences",
                               "min_sentences", "temperature", "local_temperature", "gumbel_start",
                               "gumbel_end"),
                     non_negative=weights)
        for key, allowed in (("word_pooling", WORD_POOLINGS), ("prototype_init", PROTOTYPE_INITS),
                             ("gumbel_schedule", GUMBEL_SCHEDULES), ("bank_eval", BANK_EVAL_MODES)):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"method.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        for key, heads in (("pool_heads", self.pool_heads), ("decoder_heads", self.decoder_heads)):
            if self.embed_dim % heads:
                raise ValueError(f"method.embed_dim ({self.embed_dim}) must be divisible by method.{key} ({heads})")
        if len(self.stage_epochs) != 3 or min(self.stage_epochs) < 0 or sum(self.stage_epochs) == 0:
            raise ValueError(f"method.stage_epochs needs 3 epoch counts >= 0 (stages 1-3), "
                             f"got {list(self.stage_epochs)}")
        if self.max_sentences > self.decoder_queries:
            raise ValueError(f"method.max_sentences ({self.max_sentences}) must not exceed "
                             f"method.decoder_queries ({self.decoder_queries})")
        if not 0.0 <= self.image_dropout < 1.0:
            raise ValueError(f"method.image_dropout must be in [0, 1), got {self.image_dropout}")
