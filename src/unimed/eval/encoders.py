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
from torch import nn
from transformers import AutoTokenizer

from unimed.eval.dense import Maps, slice_wise_maps
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

    @torch.no_grad()
    def volume_maps(self, volumes: torch.Tensor, *, batch_size: int = 64, min_stride: int = 2) -> Maps:
        """(N, D, 1, S, S) axial slices in [0, 1] (inferior to superior) -> frozen 3D feature maps,
        each (N, C_i, D_i, H_i, W_i) float16 on the CPU, shallow to deep: what 3D dense tasks read.

        A native 3D encoder gives its own: a model with ``volume_intermediates`` (the same input,
        the same output, e.g. a 3D ViT's token maps of a few blocks) is called on each batch.
        Every 2D encoder goes through the slice-wise adapter
        (:func:`unimed.eval.dense.slice_wise_maps`)."""
        native = getattr(self.model, "volume_intermediates", None)
        if native is None:
            return slice_wise_maps(self, volumes, batch_size, min_stride)
        chunks = [[m.half().cpu() for m in native(volumes[start : start + batch_size].to(self.device))]
                  for start in range(0, len(volumes), batch_size)]
        return [torch.cat(level) for level in zip(*chunks)]

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
