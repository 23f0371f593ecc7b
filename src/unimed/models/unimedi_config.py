"""UniMedI's config section: one ViT for 2D and 3D, its tokenizers, the attentive slice selection,
self-distillation and the image-report objective (spec shared/specs/UNIMEDI.md).

The paper leaves much unstated; every ambiguous choice is a switch here whose default is the spec's
recommendation, and its comment names the alternatives ([A] items of spec §11).
"""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds
from unimed.models.config import ImageTowerConfig, TextTowerConfig

SELECTIONS = ("attentive", "random")
SLAB_SLICES = ("center", "random", "all")
ATTENTION_SOFTMAX = ("patches", "with_cls")
SELECTION_NETWORKS = ("teacher", "student")
MASKINGS = ("attentive", "random")
MASK_RANKINGS = ("per_group", "joint")
PATCH_LOSS_TOKENS = ("masked", "all")
VL_VIEWS = ("masked", "full")
VOLUME_TOKENIZERS = ("tubelet", "hybrid")


@dataclasses.dataclass(frozen=True)
class UniMedIConfig:
    """The UniMedI model and objective.

    Vision: a ViT preset of ``unimed.models.image`` (`image.encoder`; paper ViT-B/16, randomly
    initialised unless `image.weights`) whose 2D patch embedding is T_2D, plus a tokenizer T_3D
    with `volume_patch` (depth, rows, columns) over volumes of `volume_shape` (paper 32x128x128,
    spec default patch 4x16x16), each with its own position embeddings, one [CLS]. T_3D
    (`volume_tokenizer`) is a Conv3d over the voxels ("tubelet", the paper's), or ("hybrid", for a
    hybrid ViT whose T_2D is a frozen CNN and a 1x1 projection) that frozen CNN on every axial
    slice and a learned Conv3d over each slab's `volume_patch[0]` slices of its feature maps; the
    in-plane patch is then the CNN's stride.
    X-rays come at ``data.image_size``. A CT sample is ``[CLS] | T_3D(volume) | T_2D(slice_1) | ... |
    T_2D(slice_k)``, the `selected_slices` slices (k) fed at the volume's in-plane size.
    Text: the framework's BERT (cross-lingual tokenizer), pooled per `text.pooling`.
    """

    name: str = "unimedi"
    image: ImageTowerConfig = ImageTowerConfig(encoder="vit_base_patch16_224", mean=(0.5,) * 3,
                                               std=(0.5,) * 3)
    text: TextTowerConfig = TextTowerConfig(frozen_layers=0, hidden_size=768, num_layers=12,
                                            num_heads=12, intermediate_size=3072)
    volume_shape: tuple[int, int, int] = (32, 128, 128)
    volume_patch: tuple[int, int, int] = (4, 16, 16)
    volume_tokenizer: str = "tubelet"  # T_3D: Conv3d over voxels, or "hybrid": T_2D's CNN per slice
    volume_batch_size: int = 16  # CT batch per rank (the X-ray batch is train.batch_size)
    volume_window: tuple[float, float] = (-1000.0, 400.0)  # HU -> [0, 1]; not stated in the paper
    # Projectors as MGCA's GlobalEmbedding: Linear-BN-ReLU-Linear-BN(affine=False).
    projector_hidden: int = 2048
    embed_dim: int = 128
    temperature: float = 0.07  # CLIP temperature; MGCA keeps it fixed
    learn_temperature: bool = False  # CLIP: learnable from 0.07, logit scale clamped at 100
    # Attentive slice selection (eq. 1-2).
    selection: str = "attentive"  # "random": the Table 7 "VL" row's random slices
    selected_slices: int = 4  # k, not given in the paper
    slab_slice: str = "center"  # with depth patch > 1: the slab's centre, a random or every slice
    attention_softmax: str = "patches"  # eq. 1's softmax over patch keys; "with_cls": A-CLIP's
    selection_network: str = "teacher"  # the EMA teacher's no-grad pass (A-CLIP), or the student
    # Self-distillation (DINO on [CLS], iBOT on patches), EMA teacher of the vision encoder.
    masking: str = "attentive"  # keep the highest-attention tokens; "random" for the ablation
    mask_ratio: float = 0.5  # "a large proportion"; A-CLIP 0.5
    mask_ranking: str = "per_group"  # volume and each slice ranked apart; "joint": all together
    patch_loss_tokens: str = "masked"  # iBOT: loss on the masked tokens; "all": every patch
    vl_view: str = "masked"  # L_vl on the masked student's [CLS] (A-CLIP) or a full student pass
    head_out: int = 8192  # K prototypes (iBOT 8192, DINO 65536)
    head_hidden: int = 2048
    head_bottleneck: int = 256
    shared_head: bool = True  # one head for [CLS] and patches (iBOT's default)
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    teacher_temperature_epochs: int = 30
    center_momentum: float = 0.9
    ema_momentum: float = 0.996  # cosine to 1 over all steps
    freeze_last_layer_epochs: int = 1
    vl_weight: float = 1.0
    icl_weight: float = 1.0
    pcl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.text.train_appended_rows:
            raise ValueError("method.text.train_appended_rows is a Med-UniC setting; this method "
                             "trains its text tower as method.text.frozen_layers says")
        for key, valid in (("selection", SELECTIONS), ("slab_slice", SLAB_SLICES),
                           ("attention_softmax", ATTENTION_SOFTMAX),
                           ("selection_network", SELECTION_NETWORKS), ("masking", MASKINGS),
                           ("mask_ranking", MASK_RANKINGS),
                           ("patch_loss_tokens", PATCH_LOSS_TOKENS), ("vl_view", VL_VIEWS),
                           ("volume_tokenizer", VOLUME_TOKENIZERS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"method.{key} must be one of {', '.join(valid)}, "
                                 f"got {getattr(self, key)!r}")
        check_bounds("method", self,
                     positive=("volume_batch_size", "projector_hidden", "embed_dim", "selected_slices",
                               "head_out", "head_hidden", "head_bottleneck", "temperature",
                               "student_temperature", "teacher_temperature",
                               "warmup_teacher_temperature"),
                     unit_interval=("center_momentum", "ema_momentum"),
                     non_negative=("teacher_temperature_epochs", "freeze_last_layer_epochs",
                                   "vl_weight", "icl_weight", "pcl_weight"))
        for key in ("volume_shape", "volume_patch"):
            value = getattr(self, key)
            if len(value) != 3 or min(value) <= 0:
                raise ValueError(f"method.{key} needs 3 positive sizes (depth, rows, columns), "
                                 f"got {list(value)}")
        if self.volume_shape[1] != self.volume_shape[2]:
            raise ValueError("method.volume_shape needs square slices (rows = columns: the selected "
                             f"slices go through T_2D), got {list(self.volume_shape)}")
        if any(s % p for s, p in zip(self.volume_shape, self.volume_patch)):
            raise ValueError(f"method.volume_shape {list(self.volume_shape)} is not a multiple of "
                             f"method.volume_patch {list(self.volume_patch)}")
        slabs = self.volume_shape[0] // self.volume_patch[0]
        if self.selected_slices > slabs:
            raise ValueError(f"method.selected_slices={self.selected_slices} but the volume has "
                             f"only {slabs} slabs of {self.volume_patch[0]} slices")
        if len(self.volume_window) != 2 or not self.volume_window[0] < self.volume_window[1]:
            raise ValueError("method.volume_window must be [low, high] HU with low < high, got "
                             f"{list(self.volume_window)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def distills(self) -> bool:
        """Whether self-distillation is on (the EMA teacher's full pass and masking are needed)."""
        return self.icl_weight > 0 or self.pcl_weight > 0
