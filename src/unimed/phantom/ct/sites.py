"""CT acquisition sites (`ct/sites.yaml`): report language(s), acquisition geometry and prevalence."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from unimed.errors import ConfigError
from unimed.phantom.sites import load_yaml, read_languages, read_prevalence, require

CT_SITES_FILE = Path(__file__).with_name("sites.yaml")
CT_FINDINGS: tuple[str, ...] = ("nodule", "covid", "pneumonia", "pleural_effusion", "pneumothorax")
"""The latent findings a CT study can hold (catalogue names); covid and pneumonia exclude each other."""
KERNELS = ("smooth", "sharp")
ORIENTATIONS = ("RAS", "LPS")
STORAGES = ("hu", "rescaled")


@dataclasses.dataclass(frozen=True)
class CTAcquisition:
    """How one site samples and stores a volume."""

    pixel_mm: float
    slice_mm: float
    thickness_mm: float
    noise_hu: float
    kernel: str
    orientation: str
    storage: str
    fov_z_mm: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class CTSite:
    """One CT site of the phantom world."""

    name: str
    languages: tuple[str, ...]
    age: tuple[int, int]
    female_fraction: float
    acquisition: CTAcquisition
    prevalence: dict[str, float]


def _choice(value: str, options: tuple[str, ...], where: str) -> str:
    if value not in options:
        raise ConfigError(f"{where} = {value!r}; valid: {list(options)}")
    return value


def _parse(name: str, raw: object, path: Path) -> CTSite:
    where = f"{path}: site '{name}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    acq = dict(require(raw, "acquisition", where))
    fields = [f.name for f in dataclasses.fields(CTAcquisition)]
    missing = [f for f in fields if f not in acq]
    if missing:
        raise ConfigError(f"{where}.acquisition: missing keys {missing}")
    for key in ("pixel_mm", "slice_mm", "thickness_mm"):
        if float(acq[key]) <= 0:
            raise ConfigError(f"{where}.acquisition.{key} must be > 0, got {acq[key]}")
    low, high = (float(v) for v in acq["fov_z_mm"])
    acquisition = CTAcquisition(
        pixel_mm=float(acq["pixel_mm"]), slice_mm=float(acq["slice_mm"]),
        thickness_mm=float(acq["thickness_mm"]), noise_hu=float(acq["noise_hu"]),
        kernel=_choice(acq["kernel"], KERNELS, f"{where}.acquisition.kernel"),
        orientation=_choice(acq["orientation"], ORIENTATIONS, f"{where}.acquisition.orientation"),
        storage=_choice(acq["storage"], STORAGES, f"{where}.acquisition.storage"),
        fov_z_mm=(low, high),
    )
    prevalence = read_prevalence(raw, where, CT_FINDINGS, "CT findings")
    return CTSite(
        name=name,
        languages=read_languages(raw, where),
        age=tuple(require(raw, "age", where)),
        female_fraction=float(require(raw, "female_fraction", where)),
        acquisition=acquisition,
        prevalence={f: float(prevalence.get(f, 0.0)) for f in CT_FINDINGS},
    )


@functools.lru_cache(maxsize=8)
def load_ct_sites(path: Path = CT_SITES_FILE) -> dict[str, CTSite]:
    """All CT sites defined in `path`."""
    return {name: _parse(name, raw, path) for name, raw in load_yaml(path).items()}


def get_ct_site(name: str, path: Path = CT_SITES_FILE) -> CTSite:
    """The named CT site, or a ConfigError listing the valid names."""
    sites = load_ct_sites(path)
    if name not in sites:
        raise ConfigError(f"unknown phantom CT site '{name}'; valid sites: {sorted(sites)}")
    return sites[name]
