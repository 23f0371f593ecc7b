"""Image encoders: timm backbones created by preset name, with optional local weights.

Every preset returns a timm model built with ``num_classes=0``, so ``model(x)`` is the pooled
feature vector ``(B, model.num_features)`` and ``model.forward_intermediates`` gives dense maps for
segmentation and detection. Nothing is ever downloaded: weights come only from a local file.
ViT presets are built with ``dynamic_img_size=True`` so one preset serves any input size divisible
by its patch (the paper trains at 256 px with 224-px ViT definitions); timm resamples the position
embeddings only when the input grid differs from the built one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import safetensors.torch
import timm
import torch
from torch import nn

from unimed.registry import Registry

log = logging.getLogger(__name__)

IMAGE_ENCODERS: Registry[Callable[[], nn.Module]] = Registry("image encoder")

_VIT = {"dynamic_img_size": True}

# name -> (timm model name, timm overrides). Paper presets first, then small CPU presets.
_PRESETS: dict[str, tuple[str, dict]] = {
    "resnet50": ("resnet50", {}),
    "vit_base_patch16_224": ("vit_base_patch16_224", _VIT),
    "vit_large_patch32_224": ("vit_large_patch32_224", _VIT),
    "resnet18": ("resnet18", {}),
    "resnet10t": ("resnet10t", {}),
    # A 6-block, 192-wide ViT with 8-px patches: 64 tokens at 64 px, ~2.7 M parameters.
    "vit_tiny_patch8_64": (
        "vit_tiny_patch16_224", {**_VIT, "img_size": 64, "patch_size": 8, "depth": 6}
    ),
}

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _register_preset(name: str, timm_name: str, overrides: dict) -> None:
    def factory() -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **overrides)

    factory.__doc__ = f"timm '{timm_name}' without classifier, overrides {overrides or 'none'}."
    IMAGE_ENCODERS.register(name)(factory)


for _name, (_timm_name, _overrides) in _PRESETS.items():
    _register_preset(_name, _timm_name, _overrides)


def create_image_encoder(name: str, weights: str | Path | None = None) -> nn.Module:
    """Build the registered image encoder `name`; load `weights` (a local state dict) if given."""
    model = IMAGE_ENCODERS.get(name)()
    if weights is not None:
        load_image_weights(model, weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pth/.pt/.bin (``torch.load(weights_only=True)``).

    A checkpoint that wraps its weights under "state_dict" or "model" is unwrapped, and a DDP
    "module." prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path), device="cpu")
    elif path.suffix in _TORCH_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"image weights {path}: unsupported suffix '{path.suffix}'; "
            f"use .safetensors or one of {', '.join(_TORCH_SUFFIXES)}"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"image weights {path}: expected a mapping of parameter name -> tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_image_weights(model: nn.Module, path: str | Path) -> None:
    """Load a timm/torchvision state dict into `model`; any missing or unexpected key is an error.

    Classifier weights (``fc.*`` / ``head.*``) are dropped because the encoder has no classifier.
    Partial loads are refused rather than warned about, so a mis-named checkpoint never trains
    silently from random init.
    """
    state = read_state_dict(path)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if classifier and not isinstance(model.get_submodule(classifier), nn.Linear):
        dropped = [k for k in state if k.startswith(f"{classifier}.")]
        for key in dropped:
            del state[key]
        if dropped:
            log.info("image weights %s: ignored classifier keys %s", path, dropped)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"image weights {path} do not fit the encoder: {exc}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys {_preview(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected keys {_preview(result.unexpected_keys)}"
        )
    if problems:
        raise ValueError(f"image weights {path} do not match the encoder: " + "; ".join(problems))
    log.info("loaded image weights from %s (%d tensors)", path, len(state))


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
