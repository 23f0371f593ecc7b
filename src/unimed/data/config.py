"""Configuration of dataset reading and the pre-training data pipeline."""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds, path_option
from unimed.data.errors import ON_ERROR_OPTIONS
from unimed.data.splits import SPLITS

CVL_VIEWS = ("original", "light", "paper")
BATCH_COMPOSITIONS = ("mixed", "community")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the datasets live, how records are filtered and split, and the pre-training views.

    `rotation` is the largest random rotation of a pre-training view in degrees (paper: 180).
    `cvl_view` is the view paired with the report: "original" (unaugmented, as the paper and the
    authors' code), "light" (random crop only) or "paper" (the SSV augmentations). The SSV view always
    gets the full set, plus grey-level distortion of strength `ssv_jitter` when it is above 0
    (brightness / contrast jitter and blur, :func:`unimed.data.transforms.pretrain_transform`; 0: the
    paper's set). `batch_composition` is "mixed" (batches drawn across communities) or
    "community" (every global batch from one community: one language at one site), so the
    contrastive negatives cannot be told apart by language or acquisition alone.
    `sentence_keep` below 1 pairs each image with a random subset of its report's sentences (each
    kept with that probability, at least one: CXR-CLIP's text sampling; 1, the whole report, as the
    paper; :class:`unimed.data.pretrain.PretrainDataset`).
    `text_datasets` are the report corpora of the text stages (`unimed vocab`, `unimed mlm`; empty:
    the pre-training datasets), read from their `text_splits`; their images are not needed.
    `volume_cache` is a folder where the 3D pre-training loader keeps each CT volume's prepared input
    (read, resized and windowed once, then read back every epoch and run; None: read every time);
    `image_cache` likewise keeps each X-ray as the pre-training views start from it (decoded and
    resized; :class:`unimed.data.pretrain.CachedImageLoader`).
    `candidate_negatives` N keeps, per volume of a candidates dataset (records that are cubes
    around candidate points: `luna16-candidates`), every candidate with a positive label and a
    seeded sample of at most N of the others (:func:`unimed.data.adapters.sample_candidates`), after
    the splits are carved; None keeps every row. LUNA16's candidates_V2 table lists about 850
    candidates per series for fewer than two nodules, more than an evaluation can hold in memory.
    """

    root: str = path_option("data/phantom")
    pretrain_datasets: tuple[str, ...] = ("mimic-cxr", "padchest")
    text_datasets: tuple[str, ...] = ()
    text_splits: tuple[str, ...] = ("train",)
    min_report_tokens: int = 3
    split_seed: int = 0
    on_error: str = "raise"
    image_size: int = 224
    resize_size: int = 256
    rotation: float = 180.0
    cvl_view: str = "original"
    ssv_jitter: float = 0.0
    batch_composition: str = "mixed"
    sentence_keep: float = 1.0
    max_length: int = 128
    num_workers: int = 0
    split_dir: str | None = path_option(None)
    volume_cache: str | None = path_option(None)
    image_cache: str | None = path_option(None)
    candidate_negatives: int | None = None
    check_images: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_OPTIONS:
            raise ValueError(f"data.on_error must be one of {', '.join(ON_ERROR_OPTIONS)}, "
                             f"got {self.on_error!r}")
        if not self.text_splits or any(s not in SPLITS for s in self.text_splits):
            raise ValueError(f"data.text_splits must be a non-empty list of {', '.join(SPLITS)}, "
                             f"got {list(self.text_splits)}")
        check_bounds("data", self, at_least_one=("image_size", "resize_size", "max_length"),
                     non_negative=("min_report_tokens", "num_workers", "split_seed"))
        if self.max_length < 3:  # [CLS] and [SEP] alone: every report the same, and 1 is not truncated
            raise ValueError(f"data.max_length must be >= 3 (a report's tokens between [CLS] and [SEP]), "
                             f"got {self.max_length}")
        if self.image_size > self.resize_size:
            raise ValueError(f"data.image_size={self.image_size} is larger than data.resize_size="
                             f"{self.resize_size}: an image is resized to resize_size, then cropped "
                             "to image_size")
        if self.candidate_negatives is not None and self.candidate_negatives < 1:
            raise ValueError("data.candidate_negatives must be >= 1 (or null: every candidate), "
                             f"got {self.candidate_negatives}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"data.rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.cvl_view not in CVL_VIEWS:
            raise ValueError(f"data.cvl_view must be one of {', '.join(CVL_VIEWS)}, got {self.cvl_view!r}")
        if not 0.0 < self.sentence_keep <= 1.0:
            raise ValueError(f"data.sentence_keep must be in (0, 1], got {self.sentence_keep}")
        if not 0.0 <= self.ssv_jitter < 1.0:
            raise ValueError(f"data.ssv_jitter must be in [0, 1), got {self.ssv_jitter}")
        if self.batch_composition not in BATCH_COMPOSITIONS:
            raise ValueError(
                f"data.batch_composition must be one of {', '.join(BATCH_COMPOSITIONS)}, "
                f"got {self.batch_composition!r}"
            )
