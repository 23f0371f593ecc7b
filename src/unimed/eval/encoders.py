"""Encoders under evaluation: a trained checkpoint, or the model as pre-training starts it.

Every evaluation task talks to an :class:`Encoder`, never to a method's model class directly: it
needs ``encode_image`` / ``encode_text`` (projected, for zero-shot, retrieval and Grad-CAM),
``pooled_image`` (pooled backbone features for linear probes), ``forward_intermediates`` (dense maps
for segmentation and detection; the backbone ``visual`` describes their layout) and the text
backbone ``text`` with its tokenizer. Images go in as pixels in [0, 1]: the model normalises them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from unimed.config import CONFIG_FILE
from unimed.models import create_model
from unimed.models.config import ModelConfig
from unimed.train.checkpoint import (
    LATEST_FILE,
    WEIGHTS_FILE,
    latest_checkpoint,
    load_weights,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoder:
    """A frozen image + text encoder pair with its tokenizer, on one device, in eval mode.

    `name` keys the encoder in metrics.json; `label` is what tables show; `temperature` is the
    contrastive temperature the model was trained with (``model.temperature``).
    """

    name: str
    label: str
    model: nn.Module
    tokenizer: object
    max_length: int = 128
    device: torch.device = torch.device("cpu")
    temperature: float = 0.07

    def __post_init__(self) -> None:
        self.model.to(self.device).eval().requires_grad_(False)

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
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            feats = self.model.encode_image(x) if projected else self.model.pooled_image(x)
            out.append(_maybe_normalize(feats, normalize).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def text_features(
        self, texts: Sequence[str], *, projected: bool = True, normalize: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """N texts -> (N, D) on the CPU: P_l(pooled) when `projected`, else the pooled text state."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[start : start + batch_size])
            if projected:
                feats = self.model.encode_text(ids, mask)
            else:
                feats = self.model.pooled_text(ids, mask)
            out.append(_maybe_normalize(feats, normalize).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, L) on the encoder's device, padded to the longest."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)


def _maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder (holding model.safetensors) that `path` names.

    `path` may be the checkpoint folder itself, a `checkpoints/` folder (its `latest`), a
    pre-training output folder (`pretrain/`) or a run folder (`runs/<name>`).
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    for folder in (path, path / "checkpoints", path / "pretrain" / "checkpoints"):
        if (folder / LATEST_FILE).is_file():
            found = latest_checkpoint(folder)
            if found is not None:
                return found
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a folder with {WEIGHTS_FILE}, a checkpoints folder "
        f"with a '{LATEST_FILE}' file, or a run folder holding pretrain/checkpoints"
    )


def checkpoint_config(checkpoint: str | Path) -> Path:
    """The resolved config.yaml saved with the run that wrote `checkpoint` (first one above it)."""
    checkpoint = Path(checkpoint).resolve()
    for folder in (checkpoint, *checkpoint.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    raise FileNotFoundError(f"no {CONFIG_FILE} in {checkpoint} or the folders above it")


def build_encoder(
    name: str,
    label: str,
    model_cfg: ModelConfig,
    *,
    text_encoder: str,
    tokenizer: str | None = None,
    weights: str | Path | None = None,
    seed: int = 0,
    max_length: int = 128,
    device: torch.device | None = None,
) -> Encoder:
    """The model of `model_cfg` with the tokenizer of the `tokenizer` folder (default: the
    `text_encoder` folder's own).

    With `weights` (a checkpoint folder or a model.safetensors file), every tensor is loaded,
    strictly. Without, the model is what pre-training starts from: image encoder and projectors
    randomly initialised from `seed`, text encoder as loaded from `text_encoder` (the MLM stage's
    output for Med-UniC) -- the "random init" and "MLM-only" baselines in one model.
    """
    cfg = dataclasses.replace(model_cfg, compile_image_encoder=False)
    tokenizer_ = AutoTokenizer.from_pretrained(tokenizer or text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(cfg, vocab_size=len(tokenizer_), text_encoder=text_encoder)
    if weights is not None:
        weights = Path(weights)
        load_weights(model, weights / WEIGHTS_FILE if weights.is_dir() else weights)
        log.info("%s: loaded weights from %s", name, weights)
    return Encoder(name, label, model, tokenizer_, max_length, device or default_device(),
                   cfg.temperature)
