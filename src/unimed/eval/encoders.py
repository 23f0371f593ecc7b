"""Encoders under evaluation: a trained checkpoint, or the model as pre-training starts it.

Every evaluation task talks to an :class:`Encoder`, never to a method's model class directly. The
encoder holds the ``model`` of a method (:mod:`unimed.methods`, built by name from the config) and
uses only its evaluation interface: ``encode_image`` / ``encode_text`` (projected, for zero-shot,
retrieval and Grad-CAM), ``pooled_image`` / ``pooled_text`` (pooled backbone features for linear
probes) and ``project_image`` / ``project_text`` (pooled -> projected, so both spaces come from one
pass of a tower), ``forward_intermediates`` (dense maps for segmentation and detection; the backbone
``visual`` describes their layout), ``temperature`` (the contrastive temperature it was trained
with) and, optionally, ``zero_shot_prompts`` / ``zero_shot_scores`` (a method's own zero-shot
rule: the prompts encoded once, then the images scored against them). Images go in as pixels
in [0, 1]: the model normalises them itself.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from unimed.eval.dense import Allocate, Maps, batched_maps, in_memory, slice_wise_maps
from unimed.methods import MethodConfig, create_method
from unimed.models.image import to_channels_last, without_input_padding
from unimed.models.text import check_max_length, load_tokenizer
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
        to_channels_last(self.model.to(self.device)).eval().requires_grad_(False)

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

    def volume_grid(self, adapter_slices: int, adapter_side: int) -> tuple[int, int]:
        """(slices, side): how many axial slices of how many pixels square this encoder reads a
        volume at. A native 3D model's own (its ``volume_depth`` and ``volume_side``, UniMedI's
        ``method.volume_shape``: what its pre-training read the stored volume at, in one resize),
        so it is evaluated on what it learnt from; else the slice-wise adapter's `adapter_slices`
        of `adapter_side` (the 2D images' ``data.image_size``)."""
        depth = getattr(self.model, "volume_depth", None)
        side = getattr(self.model, "volume_side", None)
        return (adapter_slices if depth is None else int(depth),
                adapter_side if side is None else int(side))

    @torch.no_grad()
    def volume_spaces(self, volumes: torch.Tensor, *, batch_size: int = 64
                      ) -> dict[str, torch.Tensor] | None:
        """(N, D, 1, S, S) axial slices in [0, 1] (inferior to superior) -> {"pooled", "projected"}
        volume embeddings on the CPU from a native 3D encoder (a model with ``pooled_volume``,
        UniMedI: the volume's own tokens and its selected slices in one pass); None for a 2D
        encoder, which the caller embeds through the slice-wise adapter."""
        native = getattr(self.model, "pooled_volume", None)
        if native is None:
            return None
        project = getattr(self.model, "project_volume", self.model.project_image)
        pooled, projected = [], []
        for start in range(0, len(volumes), batch_size):
            feats = native(volumes[start : start + batch_size].to(self.device))
            pooled.append(feats.float().cpu())
            projected.append(project(feats).float().cpu())
        return _spaces(pooled, projected)

    @torch.no_grad()
    def volume_maps(self, volumes: torch.Tensor, *, batch_size: int = 64, min_stride: int = 2,
                    allocate: Allocate = in_memory) -> Maps:
        """(N, D, 1, S, S) axial slices in [0, 1] (inferior to superior) -> frozen 3D feature maps,
        each (N, C_i, D_i, H_i, W_i) float16 on the CPU, shallow to deep: what 3D dense tasks read,
        written batch by batch into tensors from `allocate` (in memory by default).

        A native 3D encoder gives its own: a model with ``volume_intermediates`` (the same input,
        the same output, e.g. a 3D ViT's token maps of a few blocks) is called on each batch.
        Every 2D encoder goes through the slice-wise adapter
        (:func:`unimed.eval.dense.slice_wise_maps`)."""
        native = getattr(self.model, "volume_intermediates", None)
        if native is None:
            return slice_wise_maps(self, volumes, batch_size, min_stride, allocate)
        return batched_maps(lambda x: native(x.to(self.device)), volumes, batch_size, allocate)

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


BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, FrozenBatchNormAct2d)
PROBE_SIZE = 64  # side of the probe image that finds and checks the folded pairs


class FoldedNorm(nn.Module):
    """What is left of a batch norm folded into the convolution before it: its dropout and
    activation (timm's ``BatchNormAct2d`` and ``FrozenBatchNormAct2d``), else the identity."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def fold_batch_norms(visual: nn.Module) -> nn.Module:
    """A copy of the frozen image backbone `visual` in which every batch norm (eval-mode
    statistics) that reads a convolution's output is folded into that convolution; `visual`
    itself, with a warning, when folding would change what the backbone computes.

    A frozen encoder's batch norm is a fixed per-channel affine map, so the convolution can apply
    it: weight x scale, bias x scale + shift, with scale = gamma / sqrt(var + eps) and shift =
    beta - mean x scale. The same function up to float rounding, without a pass over every map:
    the demo's EfficientNet-Lite0 forward ran about 40 % faster on the CPU (timm's frozen batch
    norms of ``method.image.frozen_levels`` compute x * scale + bias in separate eager ops, three
    times slower than a fused batch norm). The pairs are found by running a probe image (a norm
    whose input *is* the tensor the convolution just returned), and the folded copy's pooled output
    and feature maps are checked against the original's on it: a convolution whose output
    something else reads too would change them.
    """
    visual.eval()
    if not any(isinstance(m, BATCH_NORMS) for m in visual.modules()):
        return visual
    folded = copy.deepcopy(visual)
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
             for m in folded.modules() if isinstance(m, (nn.Conv2d, *BATCH_NORMS))]
    probe = torch.rand(2, 3, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(visual.parameters()).device)
    try:
        folded(probe)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = [(conv, norm) for (conv, _, out), (norm, x, _) in zip(calls, calls[1:])
             if isinstance(conv, nn.Conv2d) and isinstance(norm, BATCH_NORMS) and x is out
             and norm.running_var is not None]  # a norm without running statistics uses the batch's
    parents = {child: (parent, name) for parent in folded.modules()
               for name, child in parent.named_children()}
    for conv, norm in pairs:
        ones = torch.ones_like(norm.running_var)
        gamma = norm.weight if norm.weight is not None else ones
        beta = norm.bias if norm.bias is not None else torch.zeros_like(ones)
        scale = gamma * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        shift = beta - norm.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.ndim - 1)))
        conv.bias = nn.Parameter(shift, requires_grad=False)
        parent, name = parents[norm]
        parent.add_module(name, FoldedNorm(norm))
    outputs = [(folded(probe), visual(probe)), *zip(
        folded.forward_intermediates(probe, intermediates_only=True),
        visual.forward_intermediates(probe, intermediates_only=True))]
    if any((got - want).abs().max() > 1e-4 * want.abs().max() for got, want in outputs):
        log.warning("folding the image encoder's batch norms into its convolutions changed its "
                    "output (a convolution's output is read by more than its norm): not folded")
        return visual
    return folded


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
    for_inference: bool = False,
) -> Encoder:
    """The model of the method `method_cfg` names, with the tokenizer of the `tokenizer` folder
    (default: the `text_encoder` folder's own).

    With `weights` (a checkpoint folder or a model.safetensors file), every tensor of the method is
    loaded, strictly. Without, the model is what pre-training starts from: image encoder and
    projectors randomly initialised from `seed`, text encoder as loaded from `text_encoder` (the MLM
    stage's output for Med-UniC) -- the "random init" and "MLM-only" baselines in one model.
    With `for_inference` (what the evaluation's encoders use), the image backbone's batch norms are
    folded into its convolutions (:func:`fold_batch_norms`) and its TensorFlow 'same' convolutions
    stop padding their inputs (:class:`unimed.models.image.SamePadConv2d`): faster, but the state
    dict is then no longer the method's (an export writes the unfolded model).
    """
    image = dataclasses.replace(method_cfg.image, compile=False)
    cfg = dataclasses.replace(method_cfg, image=image)
    tokenizer_ = load_tokenizer(tokenizer or text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = create_method(cfg, vocab_size=len(tokenizer_), text_encoder=text_encoder)
    check_max_length(max_length, method.model.text)
    if weights is not None:
        weights = Path(weights)
        load_weights(method, weights / WEIGHTS_FILE if weights.is_dir() else weights)
        log.info("%s: loaded weights from %s", name, weights)
    model = inference_ready(method.model) if for_inference else method.model
    return Encoder(name, label, model, tokenizer_, max_length, device or default_device(),
                   float(model.temperature))


def inference_ready(model: nn.Module) -> nn.Module:
    """`model` with its image backbone's batch norms folded into its convolutions and its 'same'
    convolutions no longer padding their inputs (see :func:`build_encoder`'s `for_inference`)."""
    model.visual = without_input_padding(fold_batch_norms(model.visual))
    return model
