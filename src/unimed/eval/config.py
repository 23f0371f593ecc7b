"""Configuration of the downstream evaluation protocol (one section per task).

Every task reads only its own section. Fractions are shares of the training split's labelled
images; `min_train_images` keeps the 1% rows of small (phantom) sets from training on one or two
images, and the number of images actually used is reported beside every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import snowballstemmer

from unimed.bounds import check_bounds, path_option
from unimed.text.stemming import NO_STEMMING

TASK_NAMES: tuple[str, ...] = (
    "zero_shot", "linear_probe", "segmentation", "detection", "retrieval", "bias", "gradcam",
)
# Tasks on CT volumes (the 3D world: `phantom.ct.enabled`), run only when `eval.tasks` names them.
VOLUME_TASK_NAMES: tuple[str, ...] = ("volume_probe", "volume_retrieval", "slice_localisation",
                                       "volume_segmentation", "slice_selection", "modality_gap",
                                       "volume_finetune")


# The CheXpert competition classes (CXP500) and the ten physician-labelled PDC classes.
ZERO_SHOT_CLASSES: dict[str, list[str]] = {
    "cxp500": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
    "pdc": [
        "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion",
        "hilar enlargement", "pneumothorax", "pneumonia", "vascular redistribution",
        "heart insufficiency",
    ],
}


# How the prompts of each language are stemmed before tokenisation, to read like the pre-training
# reports of that language: "corpus" (as the vocabulary stage found those reports, recorded beside
# the tokenizer: see unimed.text.stemming), "none", or a snowballstemmer algorithm. Without a record
# "corpus" falls back to FALLBACK_STEMMING: PadChest (and the phantom's Spanish site) distribute
# Snowball-stemmed Spanish, plain Spanish (BIMCV-style, translated reports) is not. A language not
# listed follows its corpus too.
CORPUS_STEMMING = "corpus"
PROMPT_STEMMING: dict[str, str] = {"en": CORPUS_STEMMING, "es": CORPUS_STEMMING}
FALLBACK_STEMMING: dict[str, str] = {"en": NO_STEMMING, "es": "spanish"}
MISSING_LABELS = ("error", "exclude")  # eval.zero_shot.missing_labels


def repeated_class(names: Sequence[str]) -> tuple[str, str] | None:
    """The first class name given again, ignoring case as the prompt files' lookups do, as (its
    first spelling, the repeat); None when every name differs."""
    seen: dict[str, str] = {}
    for name in names:
        key = str(name).lower()
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot classification: positive prompt vs negative prompt per class (Med-UniC Table 1).

    `classes` maps a dataset to the label names scored on it (as the dataset spells them).
    `missing_labels` says what a test record without a 0/1 label for a scored class (blank, or
    uncertain: -1) does: "error" (the protocol's sets are fully labelled) stops the evaluation
    naming the first; "exclude" leaves the record out of that class's AUC and F1 (a test split
    labelled by a report labeller, such as MIMIC-CXR's with CheXpert labels), and the class's
    ``labelled`` count says how many records it was scored on.
    """

    datasets: tuple[str, ...] = ("cxp500", "pdc")
    languages: tuple[str, ...] = ("en", "es")
    classes: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {k: list(v) for k, v in ZERO_SHOT_CLASSES.items()}
    )
    prompt_dir: str = path_option("")  # folder of <language>.yaml prompt files; empty = the packaged ones
    missing_labels: str = "error"

    def __post_init__(self) -> None:
        if self.missing_labels not in MISSING_LABELS:
            raise ValueError(f"eval.zero_shot.missing_labels must be one of {', '.join(MISSING_LABELS)}, "
                             f"got {self.missing_labels!r}")
        for dataset, names in self.classes.items():  # twice would count twice in the macro AUC
            twice = repeated_class(names)
            if twice is not None:
                raise ValueError(f"eval.zero_shot.classes.{dataset} names {twice[1]!r} twice (class names "
                                 "ignore case, as the prompt files' lookups do)")


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """Frozen image encoder + one linear layer (paper: AdamW 5e-4, weight decay 1e-6, early stop).

    Early stopping keeps the state of best validation metric, ties broken by the lower validation
    loss, and stops after `patience` epochs without either improving
    (:func:`unimed.eval.linear_probe.train_probe`).

    A label fraction below 100 % is scored on `draws` seeded training subsets and reported as their
    mean (the papers draw one). A 1% row of a phantom set trains on 16 images: over 8 single draws
    (eval.seed 0-7) the demo's Med-UniC 1% rows moved with a standard deviation of 4-10 points
    (CheXpert AUC, RSNA AUC, COVIDx accuracy), about as wide as their test-set intervals. The
    frozen features are computed once; five draws added 3-4 s per encoder to the demo's three
    probes. ``draws=1`` is the papers' single draw.
    """

    datasets: tuple[str, ...] = ("chexpert", "rsna", "covidx")
    lr: float = 5.0e-4
    weight_decay: float = 1.0e-6
    epochs: int = 200
    batch_size: int = 64
    patience: int = 20
    draws: int = 5

    def __post_init__(self) -> None:
        check_bounds("eval.linear_probe", self, positive=("lr",), non_negative=("weight_decay",),
                     at_least_one=("epochs", "batch_size", "patience", "draws"))


def check_image_size(task: str, size: int | None) -> None:
    """A dense task's own image side: None (the data's) or a positive multiple of 32, the deepest
    stride of the encoders, so that every map's stride is the image side over the map's."""
    if size is not None and (size < 32 or size % 32):
        raise ValueError(f"eval.{task}.image_size must be a multiple of 32 (or null), got {size}")


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    """U-Net decoder (segmentation_models_pytorch) on the frozen image encoder; per-image Dice.

    From the papers: AdamW, weight decay 1e-8, early stopping on validation Dice (Med-UniC
    supplement, segmentation); loss 10 x focal - log(Dice) (GLoRIA / MGCA ``MixedLoss``). Forced by
    the phantom's scale and the CPU: batch 16 instead of 4 with lr 1e-3 instead of 5e-4 (fewer,
    larger steps; on the validation split no other lr did better: ``benchmarks/dense_lr.py
    segmentation``, the demo's SIIM, 218 training and 40 validation images, 6 epochs, seeds 0 / 1,
    validation Dice averaged over Med-UniC, ImageNet and random init at 1 / 10 / 100 %: lr 3e-4
    72.6, 1e-3 72.9, 3e-3 72.2, 1e-2 64.0), and every epoch runs at least `min_epoch_steps` batches,
    because a 1% row trains on 16 images -- one batch per epoch -- and without it stops before the
    decoder leaves the all-background state. Epochs and patience are a CPU budget (papers: 50 /
    100 epochs).

    How probabilities become a mask is chosen on the validation split, per label fraction and
    epoch, among `thresholds` x `min_areas` (the SIIM challenge's per-image rule: pixels above the
    threshold, and nothing at all when they cover less than `min_area` of the image); the papers
    fix 0.5 and no minimum, which ``thresholds=[0.5] min_areas=[0.0]`` restores. Per-image Dice
    scores a stray pixel on an empty image 0, and most SIIM images are empty, so with the fixed
    rule a decoder trained on more labels scored lower: on the demo (SIIM test: 30 of 42 images
    empty) the ImageNet-init decoder read 75.9 / 57.2 / 13.8 Dice at 1 / 10 / 100 % of the labels,
    where predicting nothing scores 71.4, and 71.4 / 71.4 / 77.0 with the chosen rule (Med-UniC
    74.6 / 68.5 / 60.2, then 80.4 / 78.1 / 88.8). Ties go to the rule nearest (0.5, 0).

    `image_size` reads the task's images at a side of their own (as ``DetectionConfig`` says). On
    the demo's SIIM (``benchmarks/dense_lr.py segmentation``, lr 1e-3, 6 epochs, seeds 0 / 1,
    validation Dice at 1 / 10 / 100 %), at the data's 96 px and `min_stride` 4: Med-UniC 70.3 /
    75.5 / 83.2, ImageNet init 69.1 / 70.8 / 78.9, random init 68.3 / 69.5 / 70.1 (predicting
    nothing scores 67.5); at 192 px and `min_stride` 8 (maps of the same sides; the loss on four
    times the pixels, about twice the seconds): 77.9 / 80.1 / 90.2, 80.8 / 83.6 / 91.6 and 67.5 /
    68.1 / 68.0; at 192 px and stride 4, 76.0 / 80.8 / 92.7, 81.5 / 75.2 / 91.9 and 67.5 / 71.0 /
    71.8. The demo reads SIIM at 192 px, stride 8.
    """

    datasets: tuple[str, ...] = ("siim", "rsna")
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-8
    epochs: int = 15
    batch_size: int = 16
    min_epoch_steps: int = 8
    patience: int = 5
    focal_weight: float = 10.0
    # One U-Net block per encoder map of stride >= min_stride (4 for ResNets and the ViT pyramid);
    # narrow blocks keep the demo's CPU budget, the last block ends at stride min_stride / 2.
    decoder_channels: tuple[int, ...] = (64, 32, 16, 8)
    min_stride: int = 4
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    min_areas: tuple[float, ...] = (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02)  # shares of the image
    image_size: int | None = None  # side of the images the task reads; None: data.image_size

    def __post_init__(self) -> None:
        check_image_size("segmentation", self.image_size)
        check_bounds("eval.segmentation", self, positive=("lr",),
                     non_negative=("weight_decay", "focal_weight"),
                     at_least_one=("epochs", "batch_size", "min_epoch_steps", "patience",
                                   "min_stride"))
        if not self.decoder_channels or min(self.decoder_channels) < 1:
            raise ValueError("eval.segmentation.decoder_channels must be one or more widths >= 1, "
                             f"got {list(self.decoder_channels)}")
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError("eval.segmentation.thresholds must be probabilities strictly between 0 "
                             f"and 1, at least one, got {list(self.thresholds)}")
        if not self.min_areas or not all(0.0 <= a < 1.0 for a in self.min_areas):
            raise ValueError("eval.segmentation.min_areas must be shares of the image in [0, 1), at "
                             f"least one, got {list(self.min_areas)}")


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """torchvision FCOS on the frozen image encoder; mAP over IoU 0.4:0.05:0.75 (Med-UniC, MGCA).

    From the papers (Med-UniC supplement, detection): AdamW lr 5e-4, weight decay 1e-6, NMS IoU
    0.5, the IoU thresholds. Forced by the phantom's scale: at the demo's 96 px, Object-CXR boxes
    are 2-6 px and RSNA boxes 6-12 px, so the pyramid starts at the encoder's stride-2 map
    (`min_stride` 2): FCOS only trains on locations inside a box, and at stride 8 only 14% of the
    Object-CXR boxes contain one (53% at stride 4, 93% at stride 2; a ViT's pyramid starts at
    stride 4). Batch 8 instead of 4, a 32-wide one-conv head, `min_epoch_steps`, epochs and
    patience as in :class:`SegmentationConfig` (CPU budget); FCOS instead of YOLOv3 (module
    docstring). On the validation split the paper's lr is the best of those tried; what the head
    lacks at the demo's 3 epochs is training (``benchmarks/dense_lr.py detection``, the demo's
    Object-CXR, 186 training and 47 validation images, seeds 0 / 1, mean validation mAP at 1 / 10
    / 100 %: Med-UniC at lr 5e-4 2.5 / 3.8 / 7.5, 2e-3 3.6 / 4.4 / 5.0, 5e-3 1.3 / 0.3 / 2.4,
    1e-2 0.8 / 1.2 / 0.4; the ImageNet-init encoder alike, the random one 0.0 everywhere; at the
    library's 15 epochs and lr 5e-4 Med-UniC 5.9 / 5.4 / 13.2, ImageNet init 4.3 / 5.3 / 12.9,
    random 0.0, about 50 s per encoder instead of 11).

    What it lacked more was resolution. `image_size` reads the task's images at a side of their
    own (the encoder is convolutional, or a ViT built with a dynamic input size), its maps computed
    once per split and size. At 192 px with `min_stride` 4 the head sees maps of the same sides as
    at 96 px and stride 2, so it trains in the same time, on deeper features of boxes twice as
    large (same benchmark and seeds, lr 5e-4, 3 epochs, ``data.image_size=192
    eval.detection.min_stride=4``): Med-UniC 9.9 / 7.4 / 31.4, ImageNet init 9.1 / 5.1 / 29.6,
    random 0.0 / 0.0 / 0.0; at 192 px and stride 2, 21.2 / 18.3 / 35.3 and 15.5 / 14.5 / 38.5 at
    three times the seconds. The demo reads Object-CXR at 192 px, stride 4.
    """

    datasets: tuple[str, ...] = ("rsna", "object-cxr")
    lr: float = 5.0e-4
    weight_decay: float = 1.0e-6
    epochs: int = 15
    batch_size: int = 8
    min_epoch_steps: int = 8
    patience: int = 5
    iou_thresholds: tuple[float, ...] = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    min_stride: int = 2  # encoder maps of at least this stride feed the FPN
    fpn_channels: int = 32  # FPN and head width (a multiple of 16: FCOS's GroupNorm)
    head_convs: int = 1  # conv layers per FCOS tower (torchvision's default is 4)
    score_thresh: float = 0.05  # detections scored lower are dropped before NMS
    nms_thresh: float = 0.5
    max_detections: int = 20  # per image, after NMS
    image_size: int | None = None  # side of the images the task reads; None: data.image_size

    def __post_init__(self) -> None:
        check_image_size("detection", self.image_size)
        check_bounds("eval.detection", self, positive=("lr", "nms_thresh"),
                     non_negative=("weight_decay",), unit_interval=("score_thresh", "nms_thresh"),
                     at_least_one=("epochs", "batch_size", "min_epoch_steps", "patience",
                                   "min_stride", "head_convs", "max_detections"))
        if self.fpn_channels < 16 or self.fpn_channels % 16:
            raise ValueError(f"eval.detection.fpn_channels must be a multiple of 16 (FCOS's "
                             f"GroupNorm), got {self.fpn_channels}")
        if not self.iou_thresholds or not all(0.0 < t < 1.0 for t in self.iou_thresholds):
            raise ValueError("eval.detection.iou_thresholds must be one or more IoUs strictly between "
                             f"0 and 1, got {list(self.iou_thresholds)}")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Image->report / report->image Recall@K and Precision@K, and cross-lingual report retrieval."""

    datasets: tuple[str, ...] = ("mimic-cxr", "padchest")
    ks: tuple[int, ...] = (1, 5, 10)
    max_queries: int = 1000
    parallel_file: str = path_option("")  # CSV study_id,en,es; empty = <data.root>/parallel-reports/test.csv
    # Shortcut diagnostic on the pre-training pairs (train split of `datasets`): at most
    # `diagnostic_pairs` per language (encoding 1024 pairs with the CPU demo's encoders takes about
    # a minute per encoder on 2 cores, 256 a quarter of that), InfoNCE over batches of
    # `diagnostic_batch_size`.
    diagnostic_pairs: int = 128
    diagnostic_batch_size: int = 32

    def __post_init__(self) -> None:
        check_bounds("eval.retrieval", self, at_least_one=("max_queries", "diagnostic_pairs"))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval.retrieval.ks must be one or more ranks >= 1, got {list(self.ks)}")
        if self.diagnostic_batch_size < 2:
            raise ValueError("eval.retrieval.diagnostic_batch_size must be >= 2 (one positive, one "
                             f"negative), got {self.diagnostic_batch_size}")


@dataclasses.dataclass(frozen=True)
class BiasConfig:
    """Community-bias audit: how separable languages and sites are in the embeddings (Fig. 1, 4)."""

    datasets: tuple[str, ...] = ("mimic-cxr", "padchest")
    samples_per_group: int = 1000
    knn_k: int = 10
    folds: int = 5

    def __post_init__(self) -> None:
        check_bounds("eval.bias", self, at_least_one=("samples_per_group", "knn_k"))
        if self.folds < 2:
            raise ValueError(f"eval.bias.folds must be >= 2, got {self.folds}")


@dataclasses.dataclass(frozen=True)
class GradCAMConfig:
    """Grad-CAM maps of image-prompt similarity for prompts in each language (Fig. 5)."""

    dataset: str = "pdc"
    classes: tuple[str, ...] = ("pleural effusion", "pneumothorax", "cardiomegaly", "consolidation")
    languages: tuple[str, ...] = ("en", "es")
    images_per_class: int = 2
    prompt_dir: str = path_option("")  # folder of <language>.yaml prompt files; empty = the packaged ones

    def __post_init__(self) -> None:
        check_bounds("eval.gradcam", self, at_least_one=("images_per_class",))


@dataclasses.dataclass(frozen=True)
class VolumeConfig:
    """The 3D tasks (:mod:`unimed.eval.volumes`): which datasets, and how a 2D encoder sees a volume.

    A 2D encoder reads a CT volume through the slice-wise adapter: the RAS volume is resized to
    `slices` axial slices of ``data.image_size`` squared pixels, HU-windowed to [0, 1] with `window`
    (the lung window by default), each slice encoded and the slice embeddings mean-pooled.
    `probe_datasets` are classified by a linear probe on the frozen pooled features (CC-CCII:
    NCP / CP / Normal accuracy, UniMedI Table 2; LUNA16 candidates: nodule vs other candidate,
    each the cube around it, AUC, as LUNA16's false-positive reduction track poses it; LUNA16:
    nodule vs normal volume, AUC, the UniMedI paper's wording),
    `retrieval_datasets` give volume <-> report
    Recall@K on their test split (BIMCV-COVID19+ with its Spanish reports), and in
    `localisation_datasets` each finding of a test volume is localised by the `localisation_k`
    slices whose embedding is closest to the finding's prompt, scored against the phantom's slice
    ground truth (``phantom_findings.csv``). In `selection_datasets` a native 3D model's attentive
    slice selection (UniMedI: the k slices its ``slice_attention`` scores highest) is scored
    against the same ground truth, on test volumes resized to the depth the model reads a volume at
    (``Encoder.volume_grid``: UniMedI's ``method.volume_shape``, 16 in the demo, 32 in the paper
    preset, in-plane its side too), or to `selection_slices` axial slices for
    a model that does not say. A native 3D model reads every volume at its own depth and side, in
    one resize of the stored volume, as its pre-training did.
    """

    probe_datasets: tuple[str, ...] = ("cc-ccii", "luna16-candidates", "luna16")
    retrieval_datasets: tuple[str, ...] = ("bimcv-covid19",)
    localisation_datasets: tuple[str, ...] = ("bimcv-covid19",)
    localisation_k: int = 3
    selection_datasets: tuple[str, ...] = ("bimcv-covid19",)
    selection_slices: int = 32
    slices: int = 8
    window: tuple[float, float] = (-1000.0, 400.0)

    def __post_init__(self) -> None:
        check_bounds("eval.volume", self,
                     at_least_one=("slices", "localisation_k", "selection_slices"))
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError("eval.volume.window must be [low, high] HU with low < high, "
                             f"got {list(self.window)}")


@dataclasses.dataclass(frozen=True)
class ModalityGapConfig:
    """2D vs 3D embeddings of the same findings (UniMedI Fig. 2, :mod:`unimed.eval.modality`).

    Test X-ray images of `xray_datasets` and test CT volumes of `volume_datasets` (through
    :meth:`unimed.eval.features.FeatureCache.volumes` with ``eval.volume.slices`` and ``window``)
    positive for exactly one of `classes` (label names, matched case-insensitively: PadChest and
    BIMCV spell them alike, MIMIC-CXR as CheXpert does), up to `per_class` seeded samples per class
    and modality; a class enters when each modality has `min_per_class` samples of it (a spread
    needs two points, and a bootstrap resample of two is one point half of the time).
    """

    xray_datasets: tuple[str, ...] = ("mimic-cxr", "padchest")
    volume_datasets: tuple[str, ...] = ("bimcv-covid19",)
    classes: tuple[str, ...] = ("COVID 19", "pneumonia", "pleural effusion", "pneumothorax", "nodule")
    per_class: int = 100
    min_per_class: int = 5

    def __post_init__(self) -> None:
        for key in ("xray_datasets", "volume_datasets", "classes"):
            if not getattr(self, key):
                raise ValueError(f"eval.modality_gap.{key} must name at least one entry")
        if len({c.lower() for c in self.classes}) < len(self.classes):
            raise ValueError(f"eval.modality_gap.classes repeats a class: {list(self.classes)}")
        if self.min_per_class < 2:
            raise ValueError(f"eval.modality_gap.min_per_class must be >= 2, got {self.min_per_class}")
        if self.per_class < self.min_per_class:
            raise ValueError(f"eval.modality_gap.per_class must be >= min_per_class ({self.min_per_class}), "
                             f"got {self.per_class}")


@dataclasses.dataclass(frozen=True)
class VolumeSegmentationConfig:
    """3D multi-organ segmentation (BCV, UniMedI Table 6): a UNETR decoder on the frozen encoder's
    3D maps (:mod:`unimed.eval.volume_segmentation`); Dice per organ and mean.

    From the paper (appendix 7.2): UNETR, AdamW, Dice + cross-entropy loss, batch 2 volumes,
    20 / 40 / 100 % of the training labels (`fractions`). Its section 4 trains the decoder on a
    frozen encoder, its appendix the entire model; here the encoder is frozen (the CPU budget: its
    3D maps are computed once per split and cached). Forced by the CPU: volumes resized to `depth`
    axial slices of ``data.image_size`` squared pixels (paper 48 x 224 x 224), `feature_size` 8
    (UNETR: 16), 40 `epochs` (every one run: `patience` 40; the state of best validation Dice is
    kept) instead of 25,000 iterations, no augmentation. The lr (paper 1e-4) was chosen on the
    validation split only, for the budget of 40 epochs (`benchmarks/volume_segmentation_lr.py`, the
    demo's CT world, ImageNet-init encoder, 21 training and 3 validation volumes; validation mean
    Dice): 1e-3 0.269 (0.236 at 12 epochs, the earlier default), 3e-3 0.544, 1e-2 0.630, 3e-2
    0.813, 1e-1 0.943. The decoder's instance norms make its convolutions scale-free; at 1e-3 for
    12 epochs the small organs never left the background. `min_stride`: the encoder maps of at
    least this stride feed the decoder; `min_train_volumes` floors the small fractions (the 2D
    tasks' `eval.min_train_images` would swallow a 21-volume training split whole).
    """

    datasets: tuple[str, ...] = ("bcv",)
    fractions: tuple[float, ...] = (0.2, 0.4, 1.0)
    min_train_volumes: int = 2
    depth: int = 16
    window: tuple[float, float] = (-160.0, 240.0)  # abdominal soft-tissue window (HU)
    feature_size: int = 8
    min_stride: int = 2
    lr: float = 1.0e-1
    weight_decay: float = 1.0e-5
    batch_size: int = 2
    epochs: int = 40
    min_epoch_steps: int = 8
    patience: int = 40

    def __post_init__(self) -> None:
        check_bounds("eval.volume_segmentation", self, positive=("lr",),
                     non_negative=("weight_decay",),
                     at_least_one=("min_train_volumes", "depth", "feature_size", "min_stride",
                                   "batch_size", "epochs", "min_epoch_steps", "patience"))
        bad = [f for f in self.fractions if not 0.0 < f <= 1.0]
        if bad or not self.fractions:
            raise ValueError(f"eval.volume_segmentation.fractions must lie in (0, 1], got {list(self.fractions)}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError("eval.volume_segmentation.window must be [low, high] HU with low < high, "
                             f"got {list(self.window)}")


FINETUNE_TRAINABLE = ("all", "last")


@dataclasses.dataclass(frozen=True)
class VolumeFinetuneConfig:
    """3D fine-tuning (UniMedI Table 3, :mod:`unimed.eval.volume_finetune`): a trainable copy of the
    encoder's image side and a linear head on its pooled volume feature, per dataset of `datasets`
    (CC-CCII: NCP / CP / Normal accuracy; LUNA16 candidates: nodule vs other candidate AUC, and
    accuracy; LUNA16: nodule vs normal volume AUC, and accuracy).

    `trainable`: "all" trains every image-side parameter (the paper's full fine-tuning); "last"
    trains the head, the encoder's last feature level (timm ``feature_info[-1]``: ResNet ``layer4``,
    EfficientNet ``blocks.6``, the last ViT block) and the parameters its backbone registers after
    it (EfficientNet ``conv_head``, a ViT's final norm); the rest stays as pre-trained (see the
    module). "last" is the CPU default (backward passes through one level only).
    From the paper (appendix 7.2): AdamW, 100 % of the training labels (`fractions`), random flips
    of the training volumes (`flip`: left-right), batch 8, 50 / 100 epochs. Forced by the CPU:
    `slices` axial slices per volume (what the slice-wise adapter encodes, like
    ``eval.volume.slices``; a native 3D model reads its own depth and side,
    ``Encoder.volume_grid``), batch 4,
    `epochs` / `patience`. The test split is scored with the state of best validation metric
    (validation loss where the metric is undefined there), ties broken by the lower validation
    loss. `min_train_volumes` floors a fraction below 1. Under "last" a slice-wise (2D) encoder's
    frozen part runs once per slice, not once per epoch, when its activations fit in
    `frozen_cache_gb` (:class:`unimed.eval.volume_finetune.FrozenPrefix`), and a native 3D
    model's attentive selection pass through its frozen blocks once per volume, and its second
    pass through them once per volume, orientation and selected slices
    (:class:`unimed.eval.volume_finetune.FrozenSelection`).

    `lr` was chosen on the validation splits only (train -> valid; the script never reads the test
    split) of the phantom CT world of the brief (``unimed phantom configs/demo.yaml
    phantom.ct.enabled=true phantom.mimic_studies=200 phantom.padchest_studies=200
    phantom.cxp500_studies=50 phantom.pdc_studies=50``: CC-CCII 61 / 10 / 19 and LUNA16
    42 / 6 / 12 train / valid / test volumes), trainable "last", the other settings as here, on the
    demo's trained Med-UniC (step 344) and UniMedI (step 102)::

        OMP_NUM_THREADS=1 python benchmarks/volume_finetune_lr.py configs/demo.yaml \\
            data.root=/tmp/ft3d-data method.text.encoder=runs/demo/mlm \\
            method.text.tokenizer=runs/demo/mlm --lrs 1e-4,3e-4,1e-3 --baselines "" \\
            --checkpoint runs/demo/pretrain/checkpoints/step_00000344 \\
            --checkpoint runs/demo/unimedi/pretrain/checkpoints

    Validation CC-CCII accuracy (loss) of the kept state, Med-UniC / UniMedI: lr 1e-4 1.00 (0.17) /
    0.40 (1.09); 3e-4 0.90 (0.47) / 0.60 (1.06); 1e-3 0.50 (1.06) / 0.40 (1.02): mean accuracy 0.70,
    0.75, 0.45, so 3e-4 (by one volume of 20; the validation loss alone would pick 1e-4). LUNA16's
    6 validation volumes hold one class (no AUC), so it selected by validation loss only (epoch 1
    or 2 kept at every lr but UniMedI's 1e-4) and did not enter the choice. The lr fits "last"
    only: "all" at 3e-4 (Med-UniC, CC-CCII) fell to validation accuracy 0.30; its lr is not chosen.
    """

    datasets: tuple[str, ...] = ("cc-ccii", "luna16-candidates", "luna16")
    trainable: str = "last"
    fractions: tuple[float, ...] = (1.0,)
    min_train_volumes: int = 4
    slices: int = 8
    flip: bool = True
    lr: float = 3.0e-4
    weight_decay: float = 1.0e-4
    epochs: int = 10
    batch_size: int = 4
    patience: int = 4
    frozen_cache_gb: float = 2.0  # memory for the frozen part's activations under "last"; 0: off

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("eval.volume_finetune.datasets must name at least one dataset")
        if not self.frozen_cache_gb >= 0:
            raise ValueError("eval.volume_finetune.frozen_cache_gb must be >= 0 (0: no cache), "
                             f"got {self.frozen_cache_gb}")
        if self.trainable not in FINETUNE_TRAINABLE:
            raise ValueError("eval.volume_finetune.trainable must be one of "
                             f"{', '.join(FINETUNE_TRAINABLE)}, got {self.trainable!r}")
        check_bounds("eval.volume_finetune", self, positive=("lr",), non_negative=("weight_decay",),
                     at_least_one=("min_train_volumes", "slices", "epochs", "batch_size",
                                   "patience"))
        bad = [f for f in self.fractions if not 0.0 < f <= 1.0]
        if bad or not self.fractions:
            raise ValueError("eval.volume_finetune.fractions must lie in (0, 1], "
                             f"got {list(self.fractions)}")


# The config fields (section, key) naming the datasets each task reads.
TASK_DATASETS: dict[str, tuple[tuple[str, str], ...]] = {
    "zero_shot": (("zero_shot", "datasets"),),
    "linear_probe": (("linear_probe", "datasets"),),
    "segmentation": (("segmentation", "datasets"),),
    "detection": (("detection", "datasets"),),
    "retrieval": (("retrieval", "datasets"),),
    "bias": (("bias", "datasets"),),
    "gradcam": (("gradcam", "dataset"),),
    "volume_probe": (("volume", "probe_datasets"),),
    "volume_retrieval": (("volume", "retrieval_datasets"),),
    "slice_localisation": (("volume", "localisation_datasets"),),
    "slice_selection": (("volume", "selection_datasets"),),
    "modality_gap": (("modality_gap", "xray_datasets"), ("modality_gap", "volume_datasets")),
    "volume_segmentation": (("volume_segmentation", "datasets"),),
    "volume_finetune": (("volume_finetune", "datasets"),),
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Which tasks run, on which encoders, with which label fractions and seed."""

    tasks: tuple[str, ...] = TASK_NAMES
    baselines: tuple[str, ...] = ("init", "random")
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    min_train_images: int = 16
    # Images per pass of a frozen tower. On the CPU a small batch keeps a depthwise network's
    # activations in cache: the demo's EfficientNet-Lite0 encoded 96 px images at 16 per batch
    # about as fast as at 64 and 192 px maps 1.3-1.7x faster, the same features (Med-UniC's whole
    # evaluation 5-8 % faster, UniMedI's ViT the same); a GPU evaluation would raise it.
    batch_size: int = 16
    # Processes the CPU evaluation runs its jobs in (one encoder's task, or the tasks that share its
    # features), each on the machine's torch threads divided among them; results do not depend on
    # which worker runs a job (:mod:`unimed.eval.runner`). On 2 cores two single-threaded workers
    # evaluate the demo's five encoders faster than one process on two threads (small heads and
    # Python overhead parallelise badly inside one process). A CUDA evaluation runs in one process.
    workers: int = 1
    seed: int = 0
    bootstrap_resamples: int = 1000  # resamples of the test images behind every 95 % interval
    # Per language, the stemming of the prompts (zero-shot, Grad-CAM): see PROMPT_STEMMING.
    prompt_stemming: dict[str, str] = dataclasses.field(default_factory=lambda: dict(PROMPT_STEMMING))
    zero_shot: ZeroShotConfig = ZeroShotConfig()
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    detection: DetectionConfig = DetectionConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    bias: BiasConfig = BiasConfig()
    gradcam: GradCAMConfig = GradCAMConfig()
    volume: VolumeConfig = VolumeConfig()
    modality_gap: ModalityGapConfig = ModalityGapConfig()
    volume_segmentation: VolumeSegmentationConfig = VolumeSegmentationConfig()
    volume_finetune: VolumeFinetuneConfig = VolumeFinetuneConfig()

    def task_settings(self, task: str) -> list[tuple[str, str | tuple[str, ...]]]:
        """(`eval.<section>.<key>`, its value) of each setting naming the datasets `task` reads."""
        return [(f"eval.{section}.{key}", getattr(getattr(self, section), key))
                for section, key in TASK_DATASETS[task]]

    def empty_setting(self, task: str) -> str | None:
        """The first setting naming `task`'s datasets that names none (the task would give no
        row), or None."""
        return next((setting for setting, value in self.task_settings(task) if not value), None)

    def task_datasets(self, task: str) -> tuple[str, ...]:
        """The datasets `task` reads, as its settings name them (the keys of TASK_DATASETS)."""
        names: list[str] = []
        for _, value in self.task_settings(task):
            names += [value] if isinstance(value, str) else list(value)
        return tuple(dict.fromkeys(names))

    def __post_init__(self) -> None:
        valid_tasks = TASK_NAMES + VOLUME_TASK_NAMES
        unknown = [t for t in self.tasks if t not in valid_tasks]
        if unknown:
            raise ValueError(f"eval.tasks: unknown task(s) {unknown}; valid tasks: {', '.join(valid_tasks)}")
        bad = [f for f in self.fractions if not 0.0 < f <= 1.0]
        if bad or not self.fractions:
            raise ValueError(f"eval.fractions must {'lie' if bad else 'name at least one fraction'} in "
                             f"(0, 1], got {bad}")
        for task in dict.fromkeys(self.tasks):  # a task asked for would otherwise give no row
            empty = self.empty_setting(task)
            if empty is not None:
                raise ValueError(f"eval.tasks runs {task}, but {empty} names no dataset: name one, or "
                                 f"take {task} out of eval.tasks")
        check_bounds("eval", self, at_least_one=("min_train_images", "batch_size", "workers"),
                     non_negative=("seed",))
        if self.bootstrap_resamples < 10:
            raise ValueError(f"eval.bootstrap_resamples must be >= 10, got {self.bootstrap_resamples}")
        valid = (CORPUS_STEMMING, NO_STEMMING, *snowballstemmer.algorithms())
        for language, algorithm in self.prompt_stemming.items():
            if algorithm not in valid:
                raise ValueError(f"eval.prompt_stemming.{language} must be '{CORPUS_STEMMING}', "
                                 f"'{NO_STEMMING}' or a snowball algorithm ({', '.join(valid[2:])}), "
                                 f"got {algorithm!r}")
