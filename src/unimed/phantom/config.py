"""Configuration of the phantom world generator."""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds, path_option
from unimed.phantom.ct.config import CTConfig


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Size, difficulty and seed of the generated world; counts are studies per dataset layout.

    The control community (`control_site`, see sites.yaml) adds `control_studies` studies to each
    layout that writes one of its languages, with one acquisition chain for every language, so that
    community-bias measurements can tell language from acquisition (docs/LAYOUTS.md).

    `difficulty` 1.0 is the calibrated default (see benchmarks/phantom_learnability.py); larger values
    lower lesion contrast and size and raise noise.
    """

    root: str = path_option("data/phantom")
    seed: int = 0
    image_size: int = 256
    difficulty: float = 1.0
    lateral_fraction: float = 0.15
    mimic_studies: int = 600
    padchest_studies: int = 600
    chexpert_studies: int = 300
    cxp500_studies: int = 100
    rsna_studies: int = 300
    siim_studies: int = 300
    covidx_studies: int = 300
    object_cxr_studies: int = 300
    pdc_studies: int = 100
    control_site: str = "miami"  # the control community: a site reporting in several languages
    control_studies: int = 100  # its studies per language, beside the layout's own (MIMIC-CXR, PadChest)
    languages: tuple[str, ...] = ("en", "es")
    workers: int = 1
    lang_dir: str = path_option("")  # folder of language packs; empty = the packaged phantom/lang
    sites_file: str = path_option("")  # sites YAML; empty = the packaged phantom/sites.yaml
    ct: CTConfig = CTConfig()  # the 3D (CT) world, written only with phantom.ct.enabled

    def __post_init__(self) -> None:
        counts = [f.name for f in dataclasses.fields(self) if f.name.endswith("_studies")]
        check_bounds("phantom", self, at_least_one=("workers",), positive=("difficulty",),
                     non_negative=("seed", *counts), unit_interval=("lateral_fraction",))
        if self.image_size < 8:
            raise ValueError(f"phantom.image_size must be >= 8, got {self.image_size}")
