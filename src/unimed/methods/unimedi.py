"""UniMedI as a method: report-guided pre-training of one ViT on X-rays and CT volumes
(spec shared/specs/UNIMEDI.md), L = L_vl + L_icl + L_pcl.

Per batch (the loop mixes the "xray" and "ct" loaders as ``train.loader_mix`` says: by default an
epoch is one pass over both, each loader's batches spread evenly through it):

1. CT only, no gradient: the selector (`method.selection_network`: the EMA teacher, or the student)
   runs [CLS] + T_3D(volume); its [CLS] attention averaged over layers and heads (eq. 1), averaged
   per slab (eq. 2), picks the top-k slabs, whose slices (`method.slab_slice`) go through T_2D
   beside the volume's tokens (`method.selection: random` draws them instead: the Table 7 "VL" row).
2. No gradient: the EMA teacher sees the full sequence; its [CLS] attention ranks the patch tokens
   and the student's [MASK] positions are the lowest `method.mask_ratio` share of each group
   (`method.masking: random` ranks at random).
3. The student sees the masked sequence. L_vl: CLIP between its projected [CLS] and the projected
   report (negatives gathered across ranks); L_icl: DINO's loss between the heads of the student's
   and the teacher's [CLS]; L_pcl: iBOT's per-token loss on the masked patch tokens.
4. After the optimizer step the teacher (E_v and the head) moves towards the student with a
   momentum on a cosine from `method.ema_momentum` to 1 over all steps.

The teacher temperature follows DINO's per-epoch warm-up; the teacher, its head and both centres
are modules and buffers of the method, so a checkpoint holds them and a resumed run continues on the
same loss curve (the schedules are functions of the step and epoch the loop passes). Without
self-distillation (both weights 0) there is no teacher pass, no mask and, unless the attentive
selection needs it, no teacher.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from transformers import PretrainedConfig

from unimed.data.config import DataConfig
from unimed.data.pretrain import build_pretrain_dataset, build_pretrain_loader
from unimed.data.records import Record
from unimed.data.volume_pretrain import VolumeCollator, VolumePretrainDataset
from unimed.errors import ConfigError
from unimed.losses.common import gather_features
from unimed.losses.contrastive import info_nce
from unimed.losses.unimedi import (
    DinoHead,
    DistillationLoss,
    ema_momentum,
    ema_update,
    teacher_temperature,
)
from unimed.methods.base import Method, Stage, StepContext
from unimed.models.image import create_image_encoder, shared_trunk_outputs, vit_presets
from unimed.models.text import create_text_encoder, freeze_text_layers
from unimed.models.unimedi import UniMedI, UniMedIVision, slice_images
from unimed.models.unimedi_config import UniMedIConfig
from unimed.models.unimedi_ops import attention_keep_mask, random_slices, slab_to_slices
from unimed.train.config import TrainConfig

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learnable temperature


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, *,
              rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Symmetric CLIP InfoNCE, mean of the two directions, over L2-normalised (B, D) features;
    negatives are the global batch. Computed in float32 with autocast off, like every contrastive
    loss here (:func:`unimed.losses.common.float32_forward`): under fp16 autocast the similarity
    matmul would run in fp16 and round logits of up to 100 to steps of 0.0625."""
    with torch.autocast(image.device.type, enabled=False):
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        temperature = torch.exp(-logit_scale.float().clamp(max=MAX_LOGIT_SCALE))
        offset = rank * image.shape[0]
        return (info_nce(image, gather_features(text, rank, world_size), offset, temperature)
                + info_nce(text, gather_features(image, rank, world_size), offset, temperature)) / 2


class UniMedIMethod(Method):
    """UniMedI pre-training: ``forward`` returns "vl_loss", "icl_loss", "pcl_loss" (weighted) and
    their sum "loss"."""

    reads_volumes = True

    def __init__(self, cfg: UniMedIConfig, model: UniMedI) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        width = model.visual.num_features
        needs_teacher = cfg.distills or (cfg.selection == "attentive"
                                         and cfg.selection_network == "teacher")
        self.teacher = (copy.deepcopy(model.visual).requires_grad_(False) if needs_teacher
                        else None)
        self.head = self.patch_head = self.teacher_head = self.teacher_patch_head = None
        if cfg.distills:
            def head() -> DinoHead:
                return DinoHead(width, cfg.head_out, hidden_dim=cfg.head_hidden,
                                bottleneck_dim=cfg.head_bottleneck)

            self.head = head()
            self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
            if not cfg.shared_head:
                self.patch_head = head()
                self.teacher_patch_head = copy.deepcopy(self.patch_head).requires_grad_(False)
            self.cls_distill = DistillationLoss(cfg.head_out, center_momentum=cfg.center_momentum,
                                                student_temperature=cfg.student_temperature)
            self.patch_distill = DistillationLoss(cfg.head_out,
                                                  center_momentum=cfg.center_momentum,
                                                  student_temperature=cfg.student_temperature)
            for module in (self.head, self.patch_head):
                for param in () if module is None else module.last_layer.parameters():
                    if param.requires_grad:
                        param.register_hook(self._last_layer_gradient)
        self._frozen_last_layer = False
        self._total_steps = 1

    def unused_parameters(self, loaders: Sequence[str]) -> str | None:
        """An X-ray step does not run the 3D tokenizer (a CT step runs every part: its slices go
        through T_2D)."""
        if "xray" in loaders:
            return "an X-ray step leaves the 3D tokenizer (T_3D) and its positions without a gradient"
        return None

    # ------------------------------------------------------------------ schedule
    def configure_optimizer(self, stage: Stage, train: TrainConfig, total_steps: int
                            ) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """AdamW + warm-up + cosine (``train.*``); also fixes the EMA momentum's span."""
        self._total_steps = max(total_steps, 1)
        return super().configure_optimizer(stage, train, total_steps)

    def _last_layer_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """DINO keeps the head's last layer fixed for the first epochs: a zero gradient (AdamW's
        moments stay zero, so the step moves it by weight decay alone, which the weight
        normalisation undoes)."""
        return torch.zeros_like(grad) if self._frozen_last_layer else grad

    def start_from_model(self) -> None:
        """The teacher starts as the student's image encoder, as when it was built."""
        if self.teacher is not None:
            self.teacher.load_state_dict(self.model.visual.state_dict())

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Move the teacher (E_v and heads) towards the student."""
        if self.teacher is None:
            return
        momentum = ema_momentum(ctx.step, self._total_steps, self.cfg.ema_momentum)
        ema_update(self.teacher, self.model.visual, momentum)
        for teacher, student in ((self.teacher_head, self.head),
                                 (self.teacher_patch_head, self.patch_head)):
            if teacher is not None:
                ema_update(teacher, student, momentum)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        # The frozen CNN of a hybrid 2D tokenizer encodes each batch once for the teacher and
        # both student views (they are one function: see shared_trunk_outputs).
        with shared_trunk_outputs(self.teacher, self.model.visual):
            return self._forward(batch, ctx)

    def _forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg, model = self.cfg, self.model
        self._frozen_last_layer = ctx.epoch < cfg.freeze_last_layer_epochs
        if "volume" in batch:
            volume = model.preprocess_volume(batch["volume"])
            slices = self._select(volume)
            # a hybrid T_3D projects the selected slices' CNN maps (UniMedIVision.ct_tokens)
            pixels = None if model.visual.hybrid_volume else slice_images(volume, slices)

            def tokens(visual: UniMedIVision, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
                return visual.ct_tokens(volume, slices, mask, slice_pixels=pixels)
        else:
            image = model.preprocess(batch["image"])
            slices = None

            def tokens(visual: UniMedIVision, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
                return [visual.tokens_2d(image, mask)]
        mask = teacher_out = None
        if cfg.distills:
            with torch.no_grad():
                teacher_tokens = tokens(self.teacher)
                teacher_out, attention = self.teacher.encode(
                    teacher_tokens,
                    attention=cfg.attention_softmax if cfg.masking == "attentive" else None)
                if attention is None:  # random masking: rank the tokens at random
                    attention = torch.rand(teacher_out.shape[:1] + (teacher_out.shape[1] - 1,),
                                           device=teacher_out.device)
                mask = attention_keep_mask(attention, cfg.mask_ratio,
                                           self._groups(teacher_tokens, slices))
        student_out, _ = model.visual.encode(tokens(model.visual, mask))
        vl_cls = student_out[:, 0]
        if cfg.vl_view == "full" and mask is not None:
            vl_cls = model.visual.encode(tokens(model.visual))[0][:, 0]
        text = model.project_text(model.pooled_text(batch["input_ids"], batch["attention_mask"]))
        project = model.project_volume if "volume" in batch else model.project_image
        terms = {"vl_loss": cfg.vl_weight * clip_loss(
            project(vl_cls), text, model.logit_scale, rank=ctx.rank,
            world_size=ctx.world_size)}
        if teacher_out is not None:
            terms.update(self._distill(student_out, teacher_out, mask, ctx))
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def _select(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, k') indices of the slices of the normalised `volume` that join it through T_2D."""
        cfg = self.cfg
        if cfg.selection == "random":
            slabs = random_slices(volume.shape[0], volume.shape[2] // cfg.volume_patch[0],
                                  cfg.selected_slices, device=volume.device)
            return slab_to_slices(slabs, cfg.volume_patch[0], cfg.slab_slice)
        selector = self.teacher if cfg.selection_network == "teacher" else self.model.visual
        attention = selector.cls_attention(selector.prefixed([selector.tokens_3d(volume)]),
                                           cfg.attention_softmax)
        return self.model.select_slices(attention)

    def _groups(self, tokens: list[torch.Tensor], slices: torch.Tensor | None) -> list[int]:
        """Sizes of the token groups the mask ranks apart: the volume and each slice, or (joint
        ranking) all patch tokens together."""
        total = sum(t.shape[1] for t in tokens)
        if self.cfg.mask_ranking == "joint" or slices is None:
            return [total]
        k = slices.shape[1]
        return [tokens[0].shape[1], *[tokens[1].shape[1] // k] * k]

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                 ctx: StepContext) -> dict[str, torch.Tensor]:
        """L_icl on [CLS] and L_pcl on the patch tokens, weighted."""
        cfg = self.cfg
        temperature = teacher_temperature(ctx.epoch, start=cfg.warmup_teacher_temperature,
                                          end=cfg.teacher_temperature,
                                          warmup_epochs=cfg.teacher_temperature_epochs)
        patch_head = self.patch_head or self.head
        teacher_patch_head = self.teacher_patch_head or self.teacher_head
        with torch.no_grad():
            teacher_cls = self.teacher_head(teacher[:, 0])
            teacher_patches = teacher_patch_head(teacher[:, 1:])
        icl = self.cls_distill(self.head(student[:, 0]), teacher_cls, temperature,
                               world_size=ctx.world_size)
        positions = mask if cfg.patch_loss_tokens == "masked" else torch.ones_like(mask)
        pcl = self.patch_distill(patch_head(student[:, 1:]), teacher_patches, temperature,
                                 positions, world_size=ctx.world_size)
        return {"icl_loss": cfg.icl_weight * icl, "pcl_loss": cfg.pcl_weight * pcl}

    # ------------------------------------------------------------------ data
    def build_loaders(self, records: Sequence[Record], tokenizer: Any, data: DataConfig, *,
                      batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                      pin_memory: bool = False) -> dict[str, DataLoader]:
        """"xray": the 2D image-report pairs (``data.*`` views, `train.batch_size`); "ct": the
        volume-report pairs at `method.volume_shape` (`method.volume_batch_size`). A run whose
        data holds one modality only trains on it, with a warning."""
        cfg = self.cfg
        xrays = [r for r in records if r.ndim == 2]
        volumes = [r for r in records if r.ndim == 3]
        loaders: dict[str, DataLoader] = {}
        common = {"rank": rank, "world_size": world_size, "seed": seed, "pin_memory": pin_memory}
        if xrays:
            dataset = build_pretrain_dataset(xrays, tokenizer, data, seed=seed)
            loaders["xray"] = build_pretrain_loader(dataset, data, batch_size=batch_size, **common)
        if volumes:
            dataset = VolumePretrainDataset(volumes, tokenizer, max_length=data.max_length,
                                            shape=cfg.volume_shape, window=cfg.volume_window,
                                            seed=seed, on_error=data.on_error,
                                            cache=data.volume_cache)
            loaders["ct"] = build_pretrain_loader(
                dataset, data, batch_size=cfg.volume_batch_size, setting="method.volume_batch_size",
                collate_fn=VolumeCollator(tokenizer.pad_token_id), **common)
        if not loaders:
            raise ConfigError("UniMedI found no image-report or volume-report records in "
                              "data.pretrain_datasets")
        if len(loaders) == 1:
            log.warning("UniMedI pre-trains on %s only: data.pretrain_datasets has no %s records",
                        "X-rays" if xrays else "CT volumes", "volume" if xrays else "X-ray")
        return loaders


def build_unimedi(cfg: UniMedIConfig, *, vocab_size: int | None = None,
                  text_encoder: str | PretrainedConfig | None = None) -> UniMedIMethod:
    """UniMedI from `cfg`: a ViT preset (dynamic image size) and the BERT text encoder."""
    if cfg.image.encoder not in vit_presets():
        raise ConfigError(f"method.image.encoder={cfg.image.encoder}: UniMedI needs a ViT preset "
                          f"({', '.join(vit_presets())})")
    vit = create_image_encoder(cfg.image.encoder, cfg.image.weights)
    text = create_text_encoder(text_encoder or cfg.text.encoder, cfg.text, vocab_size=vocab_size)
    freeze_text_layers(text, cfg.text.frozen_layers)
    return UniMedIMethod(cfg, UniMedI(cfg, vit, text))
