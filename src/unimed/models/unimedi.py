"""UniMedI (He et al.): one ViT for 2D X-rays and 3D CT in a report-guided common space
(spec shared/specs/UNIMEDI.md).

:class:`UniMedIVision` is the vision encoder E_v: a timm ViT (its patch embedding is T_2D, its
blocks and norm are shared) with a Conv3d tokenizer T_3D, 3D position embeddings and the [MASK]
vector of the masked student. It also behaves as the timm backbone the 2D evaluation reads
(``forward``, ``forward_intermediates``, ``feature_info``), so every 2D task runs on it unchanged.

Token order of a CT sample: ``[CLS] | T_3D(volume) | T_2D(slice_1) | ... | T_2D(slice_k)``; the 3D
tokens are Conv3d + ``flatten(2)`` in (depth, rows, columns) order, so token j belongs to slab
j // (rows x columns). T_3D's Conv3d reads the voxels (the paper's tubelets) or, with a hybrid ViT,
the maps its frozen CNN (T_2D's trunk) makes of every axial slice; the selected slices' T_2D
tokens then project those maps (the CNN runs once per slice of a CT sample). Attention for eq. 1
is the [CLS] query's softmax over the keys, averaged over layers and heads (recomputed beside each
block from its own q/k projections: timm's fused attention does not return weights).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn
from transformers import BertModel

from unimed.data.resize import resize_volume
from unimed.errors import ConfigError
from unimed.models.heads import ProjectionHead
from unimed.models.image import shared_trunk_outputs
from unimed.models.text import pool_text, text_cache
from unimed.models.unimedi_config import UniMedIConfig
from unimed.models.unimedi_ops import slab_to_slices, slice_scores, top_k_slices

Tokens = list[torch.Tensor]


def block_cls_attention(block: nn.Module, x: torch.Tensor, with_cls_key: bool) -> torch.Tensor:
    """(B, N, C) input of a timm ViT block -> (B, N - 1) its [CLS] query's attention over the patch
    keys, averaged over heads: softmax over the patch keys only (eq. 1) or, `with_cls_key`, over
    every key with the patch part kept (A-CLIP)."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, width = h.shape
    heads, dim = attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[: heads * dim], None if bias is None else bias[: heads * dim])
    k = F.linear(h, weight[heads * dim : 2 * heads * dim],
                 None if bias is None else bias[heads * dim : 2 * heads * dim])
    q = attn.q_norm(q.view(batch, 1, heads, dim).transpose(1, 2))
    k = attn.k_norm(k.view(batch, tokens, heads, dim).transpose(1, 2))
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if with_cls_key:
        weights = logits.softmax(-1)[..., 1:]
    else:
        weights = logits[..., 1:].softmax(-1)
    return weights[:, :, 0].mean(1)


class SelectionTrunk(NamedTuple):
    """The selection pass after its first `blocks` ViT blocks: `tokens` (N, 1 + P, width) and
    `attention`, the sum of those blocks' [CLS] attention rows (N, P); with a hybrid T_3D, `maps`
    (N, D, C, h, w): the frozen CNN's map of every slice, from which the CT pass's tokens are
    made again without the CNN (:meth:`UniMedI.ct_trunk`)."""

    blocks: int
    tokens: torch.Tensor
    attention: torch.Tensor
    maps: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by field name (`maps` only when there are maps): what a caller moves,
        indexes or joins row by row."""
        return {name: value for name, value in self._asdict().items()
                if isinstance(value, torch.Tensor)}


# The CT pass's tokens after the selection trunk's blocks, given the normalised volume (B, 1, D, H,
# W), its selected slices (B, k') and (hybrid T_3D) its slices' CNN maps or None:
# UniMedI.ct_trunk, or a record of its results.
CtTrunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def slice_images(volume: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) volume and (B, k) slice indices -> (B x k, 3, H, W) slice images in T_2D's
    input format (grey copied to the three channels)."""
    rows = torch.arange(volume.shape[0], device=volume.device)[:, None]
    return volume[:, 0][rows, slices].flatten(0, 1)[:, None].expand(-1, 3, -1, -1)


def hybrid_trunk_channels(vit: nn.Module, volume_patch: Sequence[int]) -> int:
    """The channels of a hybrid ViT's frozen CNN (T_2D's ``HybridEmbed``), which a hybrid T_3D runs
    on every slice; a ConfigError when `vit` is not hybrid or `volume_patch`'s in-plane size is not
    the CNN's stride (one T_3D token per cell of its map)."""
    embed = vit.patch_embed
    if not isinstance(getattr(embed, "backbone", None), nn.Module):
        raise ConfigError("method.volume_tokenizer=hybrid runs T_2D's CNN on every slice: "
                          "method.image.encoder must be a hybrid ViT preset (a CNN trunk and a "
                          "1x1 projection)")
    stride = tuple(int(r) for r in embed.feature_ratio)
    if tuple(volume_patch[1:]) != stride:
        raise ConfigError(f"method.volume_patch {list(volume_patch)}: with "
                          "method.volume_tokenizer=hybrid its rows and columns must be the CNN's "
                          f"stride {list(stride)}")
    return int(embed.feature_dim)


class UniMedIVision(nn.Module):
    """E_v: the shared ViT with its 2D and 3D tokenizers (see the module docstring)."""

    def __init__(self, vit: nn.Module, volume_shape: Sequence[int], volume_patch: Sequence[int],
                 volume_tokenizer: str = "tubelet") -> None:
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", True):
            raise ValueError("UniMedI needs a ViT with a [CLS] token whose position embedding "
                             "covers it (timm's default ViT)")
        self.vit = vit
        width = int(vit.embed_dim)
        self.volume_patch = tuple(int(p) for p in volume_patch)
        self.hybrid_volume = volume_tokenizer == "hybrid"
        self.volume_grid = self.token_grid(volume_shape)
        if self.hybrid_volume:
            channels = hybrid_trunk_channels(vit, self.volume_patch)
            kernel = (self.volume_patch[0], 1, 1)
        else:
            channels, kernel = 1, self.volume_patch
        self.volume_embed = nn.Conv3d(channels, width, kernel_size=kernel, stride=kernel)
        self.volume_pos = nn.Parameter(torch.zeros(1, math.prod(self.volume_grid), width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        trunc_normal_(self.volume_pos, std=0.02)
        self.num_features = int(vit.num_features)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.embed_dim = width
        self.feature_info = [{**info, "module": f"vit.{info['module']}"} for info in vit.feature_info]

    # ------------------------------------------------------------------ timm backbone interface
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised X-ray -> (B, width) pooled [CLS] (timm's forward)."""
        return self.vit(x)

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` of the 2D path."""
        return self.vit.forward_intermediates(x, **kwargs)

    # ------------------------------------------------------------------ tokens
    @property
    def tokens_per_slab(self) -> int:
        return self.volume_grid[1] * self.volume_grid[2]

    def tokens_2d(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, N, width) T_2D tokens with 2D positions (resampled
        when the grid differs from the built one); `mask` (B, N) True rows become [MASK] first."""
        return self._positioned(self.vit.patch_embed(images), mask)  # (B, h, w, C): dynamic size

    def projected_maps(self, maps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) a hybrid ViT's CNN maps of B images -> those images' :meth:`tokens_2d`:
        the hybrid patch embedding's projection, without running the CNN again."""
        return self._positioned(self.vit.patch_embed.proj(maps).permute(0, 2, 3, 1), mask)

    def _positioned(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, h, w, C) patch embeddings -> (B, h x w, C) tokens, masked, with 2D positions."""
        vit = self.vit
        grid = x.shape[1:3]
        x = self._masked(x.flatten(1, 2), mask)
        pos = resample_abs_pos_embed(vit.pos_embed[:, vit.num_prefix_tokens :], new_size=grid,
                                     old_size=vit.patch_embed.grid_size, num_prefix_tokens=0)
        return x + pos

    def slice_maps(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) normalised volumes -> (B, D, C, h, w) a hybrid ViT's frozen CNN map of
        every axial slice, each slice entering as it enters T_2D (:func:`slice_images`). On the
        CPU the trunk takes the slices a few at a time (:data:`unimed.models.image.CPU_PIXELS_PER_PASS`:
        the same maps up to float rounding, faster, in bounded memory)."""
        batch, _, depth = volumes.shape[:3]
        slices = volumes.flatten(0, 2)[:, None].expand(-1, 3, -1, -1)  # grey -> T_2D's 3 channels
        maps = self.vit.patch_embed.backbone(slices)
        return maps.view(batch, depth, *maps.shape[1:])  # (B, D, C, h, w)

    def embed_3d(self, volumes: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, D, H, W) normalised volumes -> (B, width, d, h, w) T_3D's map: the Conv3d over the
        voxels, or (hybrid) over each slab's :meth:`slice_maps` (`maps` when the caller has
        them)."""
        if not self.hybrid_volume:
            return self.volume_embed(volumes)
        maps = self.slice_maps(volumes) if maps is None else maps
        return self.volume_embed(maps.transpose(1, 2))

    def tokens_3d(self, volumes: torch.Tensor, mask: torch.Tensor | None = None,
                  maps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, D, H, W) normalised volumes -> (B, P, width) T_3D tokens in (d, h, w) order with
        3D positions (trilinearly resampled when the grid differs); `maps`: a hybrid T_3D's
        :meth:`slice_maps` of the volumes, when the caller has them."""
        x = self.embed_3d(volumes, maps)  # (B, C, d, h, w)
        grid = tuple(x.shape[2:])
        x = self._masked(x.flatten(2).transpose(1, 2), mask)
        pos = self.volume_pos
        if grid != self.volume_grid:
            pos = pos.transpose(1, 2).reshape(1, -1, *self.volume_grid)
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return x + pos

    def token_grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The (d, h, w) grid of T_3D's tokens for a volume of spatial `shape` (D, H, W): a hybrid's
        CNN rounds a map's size up ('same' padding), the tubelet Conv3d down."""
        depth = int(shape[0]) // self.volume_patch[0]
        if self.hybrid_volume:
            return depth, *(-(-int(s) // p) for s, p in zip(shape[1:], self.volume_patch[1:]))
        return depth, *(int(s) // p for s, p in zip(shape[1:], self.volume_patch[1:]))

    def ct_tokens(self, volume: torch.Tensor, slices: torch.Tensor,
                  mask: torch.Tensor | None = None,
                  slice_pixels: torch.Tensor | None = None,
                  maps: torch.Tensor | None = None) -> Tokens:
        """The token groups of a CT sample: T_3D(volume) (B, P, width) and its k slices' T_2D
        tokens (B, k x N, width); `mask` (B, P + k x N) True rows become [MASK]. A hybrid T_3D
        runs the CNN on every slice once (:meth:`slice_maps`, or `maps` when the caller has them)
        and the k slices' tokens project their maps; otherwise T_2D reads `slice_pixels`
        (:func:`slice_images` of `volume` and `slices`, when the caller already has them)."""
        batch, k = slices.shape
        volume_tokens = math.prod(self.token_grid(volume.shape[2:]))
        masks = (None, None) if mask is None else (
            mask[:, :volume_tokens], mask[:, volume_tokens:].reshape(batch * k, -1))
        if self.hybrid_volume:
            maps = self.slice_maps(volume) if maps is None else maps
            rows = torch.arange(batch, device=slices.device)[:, None]
            flat = self.projected_maps(maps[rows, slices].flatten(0, 1), masks[1])
        else:
            pixels = slice_images(volume, slices) if slice_pixels is None else slice_pixels
            flat = self.tokens_2d(pixels, masks[1])
        return [self.tokens_3d(volume, masks[0], maps), flat.reshape(batch, -1, flat.shape[-1])]

    def _masked(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return x
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)

    def encode(self, groups: Tokens, *, attention: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[CLS] + the token groups through the blocks -> ((B, 1 + N, width) normed outputs, the
        [CLS] attention over the N patch tokens averaged over layers and heads (eq. 1) when
        `attention` is "patches" or "with_cls", else None)."""
        vit = self.vit
        x, total = self.run_blocks(self.prefixed(groups), vit.blocks, attention)
        return vit.norm(x), None if total is None else total / len(vit.blocks)

    def cls_attention(self, x: torch.Tensor, attention: str, first: int = 0,
                      total: torch.Tensor | None = None) -> torch.Tensor:
        """The [CLS] attention of :meth:`encode` alone: `x` (the input of block `first`, with
        `total` the sum of the attention rows of the blocks before it) through the later blocks,
        but the last one, whose output nothing reads, gives its attention row only."""
        blocks = self.vit.blocks
        if first < len(blocks):
            x, total = self.run_blocks(x, blocks[first:-1], attention, total)
            rows = block_cls_attention(blocks[-1], x, with_cls_key=attention == "with_cls")
            total = rows if total is None else total + rows
        return total / len(blocks)

    def prefixed(self, groups: Tokens) -> torch.Tensor:
        """[CLS] (with its position) + the token groups: the (B, 1 + N, width) input of block 0."""
        vit = self.vit
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(groups[0].shape[0], -1, -1)
        return vit.norm_pre(vit.pos_drop(torch.cat([cls, *groups], dim=1)))

    @staticmethod
    def run_blocks(x: torch.Tensor, blocks: Sequence[nn.Module], attention: str | None,
                   total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x` through `blocks` in order; with `attention` ("patches" / "with_cls"), each block's
        [CLS] attention rows over the patch tokens (:func:`block_cls_attention`) are added to
        `total`, in block order. Returns the tokens and the sum."""
        for block in blocks:
            if attention is not None:
                rows = block_cls_attention(block, x, with_cls_key=attention == "with_cls")
                total = rows if total is None else total + rows
            x = block(x)
        return x, total

    def maps_3d(self, volumes: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """(B, 1, D, H, W) normalised volumes -> the 3D token maps (B, width, d, h, w) after the
        blocks `indices`, [CLS] + T_3D tokens only (the dense 3D tasks' input)."""
        x = self.prefixed([self.tokens_3d(volumes)])
        grid = (x.shape[0], -1, *self.token_grid(volumes.shape[2:]))
        maps = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in indices:
                maps.append(x[:, 1:].transpose(1, 2).reshape(grid))
        return maps


class UniMedI(nn.Module):
    """The UniMedI model under evaluation: E_v, the text encoder and the two projectors.

    2D entry points take X-ray pixels in [0, 1] (normalised inside, like every model of the
    framework). 3D entry points take what the evaluation's volume seams pass: (N, D, 1, S, S)
    axial slices in [0, 1], inferior to superior, resampled here to `method.volume_shape`.
    """

    def __init__(self, cfg: UniMedIConfig, vit: nn.Module, text_encoder: BertModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = UniMedIVision(vit, cfg.volume_shape, cfg.volume_patch, cfg.volume_tokenizer)
        self.text = text_encoder
        self.text_cache = text_cache(cfg.text.cache_frozen, text_encoder)
        mean, std = cfg.image.mean or (0.5,) * 3, cfg.image.std or (0.5,) * 3
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        width, text_width = self.visual.num_features, int(text_encoder.config.hidden_size)
        # CT samples train in batches of their own: the projector keeps their running statistics
        # apart from the X-rays' (ProjectionHead's domains; project_volume)
        self.image_proj = ProjectionHead(width, cfg.projector_hidden, cfg.embed_dim, out_norm=True,
                                         domains=("ct",))
        self.text_proj = ProjectionHead(text_width, cfg.projector_hidden, cfg.embed_dim,
                                        out_norm=True)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))

    @property
    def volume_depth(self) -> int:
        """How many axial slices the model reads a volume at (``method.volume_shape``'s depth)."""
        return int(self.cfg.volume_shape[0])

    @property
    def volume_side(self) -> int:
        """The side of the axial slices the model reads a volume at (``method.volume_shape``'s
        rows = columns)."""
        return int(self.cfg.volume_shape[1])

    @property
    def selection_k(self) -> int:
        """How many slices the attentive selection feeds through T_2D."""
        return self.cfg.selected_slices

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> the ViT's normalised input."""
        return (image - self.pixel_mean) / self.pixel_std

    def preprocess_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) windowed volume in [0, 1] -> normalised with the grey channel's mean /
        std (the volume and its slices get the same normalisation as an X-ray)."""
        return (volume - self.pixel_mean[:, :1, None]) / self.pixel_std[:, :1, None]

    def volume_input(self, stacks: torch.Tensor) -> torch.Tensor:
        """(N, D, 1, S, S) axial slices in [0, 1] -> (N, 1, D', H', W') at `method.volume_shape`
        (:func:`~unimed.data.resize.resize_volume`: averaged down along an axis that shrinks)."""
        return resize_volume(stacks.transpose(1, 2), self.cfg.volume_shape)

    # ------------------------------------------------------------------ 2D evaluation interface
    def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(image))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.image_proj(pooled)

    def project_volume(self, pooled: torch.Tensor) -> torch.Tensor:
        """P_v of a CT sample's [CLS] (:meth:`pooled_volume`), through the projector's CT batch
        norms, whose running statistics only CT batches update."""
        return self.image_proj(pooled, "ct")

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.project_image(self.pooled_image(image))
        return F.normalize(features, dim=-1) if normalize else features

    def pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.cfg.text
        return pool_text(self.text, input_ids, attention_mask, text.pooling,
                         shared_layers=0 if text.frozen_dropout else text.frozen_layers,
                         cache=self.text_cache if self.training else None)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_proj(pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = False) -> torch.Tensor:
        features = self.project_text(self.pooled_text(input_ids, attention_mask))
        return F.normalize(features, dim=-1) if normalize else features

    def forward_intermediates(self, image: torch.Tensor, indices: int | list[int] | None = None
                              ) -> list[torch.Tensor]:
        return self.visual.forward_intermediates(self.preprocess(image), indices=indices,
                                                 intermediates_only=True)

    # ------------------------------------------------------------------ 3D
    def select_slices(self, attention: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, P) [CLS] attention over a volume's 3D tokens -> (B, k') indices of the volume's
        slices that go through T_2D: the top-k slabs (eq. 2), each as `method.slab_slice`."""
        scores = slice_scores(attention, self.visual.tokens_per_slab)
        slabs = top_k_slices(scores, self.cfg.selected_slices)
        return slab_to_slices(slabs, self.cfg.volume_patch[0], self.cfg.slab_slice, generator)

    @torch.no_grad()
    def volume_attention(self, volume: torch.Tensor, trunk: SelectionTrunk | None = None
                         ) -> torch.Tensor:
        """(B, 1, D, H, W) normalised volume -> (B, P) [CLS] attention over its 3D tokens
        (a pass of [CLS] + T_3D(volume) alone, eq. 1); from `trunk` on, when given (the same
        volumes' :meth:`selection_trunk`), only the blocks after it run."""
        visual, attention = self.visual, self.cfg.attention_softmax
        if trunk is None:
            return visual.cls_attention(visual.prefixed([visual.tokens_3d(volume)]), attention)
        return visual.cls_attention(trunk.tokens, attention, trunk.blocks, trunk.attention)

    def frozen_blocks(self) -> int:
        """How many ViT blocks, from the first, hold no trainable parameter, with everything
        before them (the 3D tokenizer, [CLS], the position embeddings)."""
        vision, vit = self.visual, self.visual.vit
        before = [*vision.volume_embed.parameters(), vision.volume_pos, vit.cls_token, vit.pos_embed,
                  *vit.norm_pre.parameters()]
        if any(p.requires_grad for p in before):
            return 0
        trains = [any(p.requires_grad for p in block.parameters()) for block in vit.blocks]
        return trains.index(True) if True in trains else len(trains)

    @torch.no_grad()
    def selection_trunk(self, stacks: torch.Tensor) -> SelectionTrunk | None:
        """(N, D, 1, S, S) axial slices in [0, 1] -> the selection pass (eq. 1: [CLS] + T_3D of
        the volume) through the :meth:`frozen_blocks`: its tokens and the sum of those blocks'
        [CLS] attention rows, which stay the same while the later blocks train (the 3D
        fine-tuning under "last" computes them once per volume and passes them to
        :meth:`pooled_volume`), and a hybrid T_3D's slice maps. None when no block is frozen."""
        blocks = self.frozen_blocks()
        if blocks == 0:
            return None
        visual = self.visual
        volume = self.preprocess_volume(self.volume_input(stacks))
        maps = visual.slice_maps(volume) if visual.hybrid_volume else None
        x = visual.prefixed([visual.tokens_3d(volume, maps=maps)])
        x, total = visual.run_blocks(x, visual.vit.blocks[:blocks], self.cfg.attention_softmax)
        return SelectionTrunk(blocks, x, total, maps)

    def slice_attention(self, stacks: torch.Tensor) -> torch.Tensor:
        """(N, D, 1, S, S) axial slices in [0, 1] -> (N, D) each input slice's attentive score
        (eq. 2: its slab's mean [CLS] attention), what the slice-selection score ranks."""
        volume = self.preprocess_volume(self.volume_input(stacks))
        scores = slice_scores(self.volume_attention(volume), self.visual.tokens_per_slab)
        depth = stacks.shape[1]
        slab = (torch.arange(depth, device=scores.device) * scores.shape[1]) // depth
        return scores[:, slab]

    @torch.no_grad()
    def selected_slices(self, stacks: torch.Tensor) -> torch.Tensor:
        """(N, D, 1, S, S) axial slices in [0, 1] -> (N, k') long indices of the input slices the
        attentive selection feeds through T_2D (the top-k slabs, each as `method.slab_slice`),
        mapped from the model's depth (`method.volume_shape`) back to the D input slices: what the
        slice_selection evaluation scores (ranking `slice_attention` would tie within a slab)."""
        volume = self.preprocess_volume(self.volume_input(stacks))
        chosen = self.select_slices(self.volume_attention(volume))  # (N, k') at the model's depth
        return ((2 * chosen + 1) * stacks.shape[1]) // (2 * volume.shape[2])  # slice centre -> input

    def pooled_volume(self, stacks: torch.Tensor, trunk: SelectionTrunk | None = None,
                      ct_trunk: CtTrunk | None = None) -> torch.Tensor:
        """(N, D, 1, S, S) axial slices in [0, 1] -> (N, width) the [CLS] of the CT sample: the
        volume's tokens and its attentively selected slices in one pass. `trunk`: the same
        volumes' :meth:`selection_trunk`, from which the selection pass continues (and whose
        slice maps the CT pass reads). `ct_trunk` (with `trunk`): gives the CT pass's tokens after
        the trunk's blocks for the volume, its selected slices and the trunk's maps
        (:meth:`ct_trunk`'s, or a record of them), and only the later blocks run."""
        volume = self.preprocess_volume(self.volume_input(stacks))
        maps = None if trunk is None else trunk.maps
        with shared_trunk_outputs(self.visual):  # a hybrid T_3D's CNN reads the volume once
            slices = self.select_slices(self.volume_attention(volume, trunk))
            if ct_trunk is None:
                out, _ = self.visual.encode(self.visual.ct_tokens(volume, slices, maps=maps))
            else:
                x, _ = self.visual.run_blocks(ct_trunk(volume, slices, maps),
                                              self.visual.vit.blocks[trunk.blocks :], None)
                out = self.visual.vit.norm(x)
        return out[:, 0]

    @torch.no_grad()
    def ct_trunk(self, volume: torch.Tensor, slices: torch.Tensor, blocks: int,
                 maps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, D, H, W) normalised volume and (B, k') selected slices -> (B, 1 + P + k' x N,
        width) the CT pass's tokens after its first `blocks` ViT blocks, which must hold no
        trainable parameter, nor T_2D (:meth:`frozen_blocks`, :meth:`frozen_slice_tokens`);
        `maps`: a hybrid T_3D's slice maps of the volume (:attr:`SelectionTrunk.maps`)."""
        x = self.visual.prefixed(self.visual.ct_tokens(volume, slices, maps=maps))
        return self.visual.run_blocks(x, self.visual.vit.blocks[:blocks], None)[0]

    def frozen_slice_tokens(self) -> bool:
        """Whether T_2D's patch embedding holds no trainable parameter: then the CT pass's frozen
        blocks give a volume and its selected slices the same tokens every time."""
        return not any(p.requires_grad for p in self.visual.vit.patch_embed.parameters())

    def volume_intermediates(self, stacks: torch.Tensor) -> list[torch.Tensor]:
        """(N, D, 1, S, S) axial slices in [0, 1] -> 3D token maps (N, width, d, h, w) of four
        evenly spaced blocks (UNETR's 3 / 6 / 9 / 12 of ViT-B), on the input's own depth and size
        (position embeddings resampled)."""
        depth = len(self.visual.vit.blocks)
        indices = sorted({max(0, round(depth * q / 4) - 1) for q in range(1, 5)})
        volume = self.preprocess_volume(stacks.transpose(1, 2))
        return self.visual.maps_3d(volume, indices)
