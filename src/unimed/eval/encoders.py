"""Encoders under evaluation: a trained checkpoint, or the model as pre-training starts it.

Every evaluation task talks to an :class:`Encoder`, never to a method's model class directly. The
encoder holds the ``model`` of a method (:mod:`unimed.methods`, built by name from the config) and
uses only its evaluation interface: ``encode_image`` / ``encode_text`` (projected, for zero-shot,
retrieval and Grad-CAM), ``pooled_image`` / ``pooled_text`` (pooled backbone features for linear
probes) and ``project_image`` / ``project_text`` (pooled -> projected, so both spaces come from one
pass of a tower), ``forward_intermediates`` (dense maps for segmentation and detection; the backbone
``visual`` describes their layout), ``temperature`` (the contrastive temperature it was trained
with) and, optionally, ``zero_shot_scores`` (a method's own zero-shot rule). Images go in as pixels
in [0, 1]: the model normalises them itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.layers import unfreeze_batch_norm_2d
from torch import nn
from transformers import AutoTokenizer

from unimed.methods import MethodConfig, create_method
from unimed.train.checkpoint import WEIGHTS_FILE, load_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoder:
    """A frozen image + text encoder pair with its tokenizer, on one device, in eval mode.

    `name` keys the encoder in metrics.json; `label` is what tables show; `temperature` is the
    contrastive temperature the model was trained with (its ``temperature``).
    """

    name: str
    label: str
    model: nn.Module
    tokenizer: object
    max_length: int = 128
    device: torch.device = torch.device("cpu")
    temperature: float = 0.07

    def __post_init__(self) -> None:
        # The batch norms that method.image.frozen_levels froze (timm's FrozenBatchNormAct2d,
        # torchvision's FrozenBatchNorm2d) compute x * scale + bias in separate eager ops; as
        # eval-mode batch norms over the same tensors they compute the same function in one fused
        # kernel, about three times faster on the CPU (a fifth of the demo encoder's forward).
        unfreeze_batch_norm_2d(self.model)
        # Channels-last convolution weights: oneDNN runs the frozen convolutional encoders about a
        # third faster on the CPU (tensors of other ranks are untouched).
        self.model.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)

    @property
    def visual(self) -> nn.Module:
        """The image backbone F_v (a timm model: pooled features, ``forward_intermediates``)."""
        return self.model.visual

    @torch.no_grad()
    def image_features(
        self, images: torch.Tensor, *, projected: bool = True, normalize: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D) on the CPU: P_v(F_v(x)) when `projected`, else pooled F_v(x)."""
        spaces = self.image_spaces(images, batch_size=batch_size)
        return _maybe_normalize(spaces["projected" if projected else "pooled"], normalize)

    @torch.no_grad()
    def text_features(
        self, texts: Sequence[str], *, projected: bool = True, normalize: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """N texts -> (N, D) on the CPU: P_l(pooled) when `projected`, else the pooled text state."""
        spaces = self.text_spaces(texts, batch_size=batch_size)
        return _maybe_normalize(spaces["projected" if projected else "pooled"], normalize)

    @torch.no_grad()
    def image_spaces(self, images: torch.Tensor, *, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """(N, 3, S, S) -> {"pooled": (N, D_v), "projected": (N, E)} unnormalised, on the CPU, from
        one pass of the image tower (the projection ``project_image`` applies to its pooled output)."""
        pooled, projected = [], []
        for start in range(0, len(images), batch_size):
            feats = self.model.pooled_image(images[start : start + batch_size].to(self.device))
            pooled.append(feats.float().cpu())
            projected.append(self.model.project_image(feats).float().cpu())
        return _spaces(pooled, projected)

    @torch.no_grad()
    def text_spaces(self, texts: Sequence[str], *, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """N texts -> {"pooled": (N, hidden), "projected": (N, E)} unnormalised, on the CPU, from one
        pass of the text tower (the projection ``project_text`` applies to its pooled output)."""
        pooled, projected = [], []
        for start in range(0, len(texts), batch_size):
            feats = self.model.pooled_text(*self.tokenize(texts[start : start + batch_size]))
            pooled.append(feats.float().cpu())
            projected.append(self.model.project_text(feats).float().cpu())
        return _spaces(pooled, projected)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, L) on the encoder's device, padded to the longest."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)


def _spaces(pooled: list[torch.Tensor], projected: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    if not pooled:
        return {"pooled": torch.empty(0), "projected": torch.empty(0)}
    return {"pooled": torch.cat(pooled), "projected": torch.cat(projected)}


def _maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_encoder(
    name: str,
    label: str,
    method_cfg: MethodConfig,
    *,
    text_encoder: str,
    tokenizer: str | None = None,
    weights: str | Path | None = None,
    seed: int = 0,
    max_length: int = 128,
    device: torch.device | None = None,
) -> Encoder:
    """The model of the method `method_cfg` names, with the tokenizer of the `tokenizer` folder
    (default: the `text_encoder` folder's own).

    With `weights` (a checkpoint folder or a model.safetensors file), every tensor of the method is
    loaded, strictly. Without, the model is what pre-training starts from: image encoder and
    projectors randomly initialised from `seed`, text encoder as loaded from `text_encoder` (the MLM
    stage's output for Med-UniC) -- the "random init" and "MLM-only" baselines in one model.
    """
    image = dataclasses.replace(method_cfg.image, compile=False)
    cfg = dataclasses.replace(method_cfg, image=image)
    tokenizer_ = AutoTokenizer.from_pretrained(tokenizer or text_encoder, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = create_method(cfg, vocab_size=len(tokenizer_), text_encoder=text_encoder)
    if weights is not None:
        weights = Path(weights)
        load_weights(method, weights / WEIGHTS_FILE if weights.is_dir() else weights)
        log.info("%s: loaded weights from %s", name, weights)
    model = method.model
    return Encoder(name, label, model, tokenizer_, max_length, device or default_device(),
                   float(model.temperature))
