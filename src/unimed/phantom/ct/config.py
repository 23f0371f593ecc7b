"""Configuration of the 3D (CT) phantom world: the `phantom.ct` section."""

from __future__ import annotations

import dataclasses

from unimed.bounds import check_bounds


@dataclasses.dataclass(frozen=True)
class CTConfig:
    """Size, difficulty and study counts of the CT world; written only when `enabled`.

    `shape` is (slices, rows, columns) of every volume as acquired (the UniMedI input 32x128x128).
    `difficulty` 1.0 is the default; larger values lower lesion contrast and size and raise noise.
    The seed is the phantom's (`phantom.seed`); the folders go under `phantom.root`.
    """

    enabled: bool = False
    shape: tuple[int, int, int] = (32, 128, 128)
    difficulty: float = 1.0
    bimcv_studies: int = 60
    ccii_studies: int = 90
    luna_studies: int = 60
    bcv_studies: int = 30
    languages: tuple[str, ...] = ("es", "en")
    lang_dir: str = ""  # folder of CT language packs; empty = the packaged phantom/lang/ct
    sites_file: str = ""  # CT sites YAML; empty = the packaged phantom/ct/sites.yaml

    def __post_init__(self) -> None:
        counts = [f.name for f in dataclasses.fields(self) if f.name.endswith("_studies")]
        check_bounds("phantom.ct", self, positive=("difficulty",), non_negative=counts)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"phantom.ct.shape must be 3 sizes >= 8 (slices, rows, columns), got "
                             f"{list(self.shape)}")
