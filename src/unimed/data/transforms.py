"""Image transforms: Med-UniC pre-training augmentations and the deterministic eval transform.

Input is a grey image as `load_image` returns it: float32 (H, W) in [0, 1] (a numpy array or a
tensor). Output is a (3, S, S) float32 tensor in [0, 1], or normalised when `mean` / `std` are
given (the image encoder's normalisation).

Pre-training (Med-UniC supplement 3.2): resize to 256, random crop 224, horizontal flip, random
rotation in [0, 180] degrees, auto-contrast (torchvision.transforms.v2) for the SSV view; the view
paired with the report is chosen by :func:`cvl_transform`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from unimed.data.config import CVL_VIEWS

ImageTransform = Callable[[np.ndarray | torch.Tensor], torch.Tensor]


def to_tensor_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A grey (H, W) or channel-first (C, H, W) image as a float32 tensor."""
    tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)  # (1, H, W)
    if tensor.ndim != 3:
        raise ValueError(f"expected a (H, W) or (C, H, W) image, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32)


def _clamp01(image: torch.Tensor) -> torch.Tensor:
    # Antialiased resizing overshoots slightly at sharp edges.
    return image.clamp(0.0, 1.0)


def _grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    # (1, H, W) -> (3, H, W): the image encoders expect RGB input.
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _finish(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[v2.Transform]:
    steps: list[v2.Transform] = [v2.Lambda(_clamp01), v2.Lambda(_grey_to_rgb)]
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalisation, or neither")
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return steps


def pretrain_transform(
    image_size: int = 224,
    resize_size: int = 256,
    *,
    rotation: float = 180.0,
    flip_p: float = 0.5,
    autocontrast_p: float = 0.5,
    jitter: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Random augmentation of one view: resize -> random crop -> flip -> rotation -> autocontrast.

    `jitter` > 0 then adds grey-level distortion: brightness and contrast factors drawn from
    [1 - jitter, 1 + jitter] and, with probability 0.5, a Gaussian blur of sigma 0.1-2.0 with a
    kernel a tenth of the image side, at least 3 (SimCLR's colour distortion without hue and
    saturation, which a grey image does not have). Uses the global torch RNG (as torchvision does);
    seed it per sample for reproducible views.
    """
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} is larger than resize_size {resize_size}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    distortion: list[v2.Transform] = []
    if jitter > 0:
        blur = v2.GaussianBlur(kernel_size=max(3, image_size // 20 * 2 + 1), sigma=(0.1, 2.0))
        distortion = [v2.ColorJitter(brightness=jitter, contrast=jitter), v2.RandomApply([blur], p=0.5)]
    return v2.Compose([
        v2.Lambda(to_tensor_image),
        v2.Resize((resize_size, resize_size), antialias=True),
        v2.RandomCrop(image_size),
        v2.RandomHorizontalFlip(p=flip_p),
        v2.RandomRotation(degrees=(0.0, rotation)),
        v2.RandomAutocontrast(p=autocontrast_p),
        *distortion,
        *_finish(mean, std),
    ])


def eval_transform(
    image_size: int = 224,
    resize_size: int = 256,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Deterministic transform: resize -> center crop -> 3 channels."""
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} is larger than resize_size {resize_size}")
    return v2.Compose([
        v2.Lambda(to_tensor_image),
        v2.Resize((resize_size, resize_size), antialias=True),
        v2.CenterCrop(image_size),
        *_finish(mean, std),
    ])


def prior_transform(image_size: int = 224, *, degrees: float = 5.0, flip_p: float = 0.5
                    ) -> v2.Compose:
    """PRIOR's pre-training view (Supp §2.1): resize to S x S -> random affine (rotation within
    +-`degrees`) -> horizontal flip -> 3 channels in [0, 1] (the model applies its z-score)."""
    return v2.Compose([
        v2.Lambda(to_tensor_image),
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomAffine(degrees=degrees),
        v2.RandomHorizontalFlip(p=flip_p),
        *_finish(None, None),
    ])


def cvl_transform(
    view: str,
    image_size: int = 224,
    resize_size: int = 256,
    *,
    rotation: float = 180.0,
) -> v2.Compose:
    """The image paired with the report (L_CVL); the SSV view always gets :func:`pretrain_transform`.

    "original": resize + centre crop, the unaugmented image (Med-UniC 3.3 and the authors' code pair
    the original image with the text). "light": resize + random crop, no flip (a flip contradicts
    "left" / "right" in the report), no rotation, no auto-contrast. "paper": the full SSV set.
    """
    if view == "original":
        return eval_transform(image_size, resize_size)
    if view == "light":
        return pretrain_transform(image_size, resize_size, rotation=0.0, flip_p=0.0, autocontrast_p=0.0)
    if view == "paper":
        return pretrain_transform(image_size, resize_size, rotation=rotation)
    raise ValueError(f"data.cvl_view must be one of {', '.join(CVL_VIEWS)}, got {view!r}")
