"""Acquisition sites (`sites.yaml`): report language(s), acquisition chain and disease prevalence."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import yaml

from unimed import yaml_files
from unimed.errors import ConfigError, yaml_problem
from unimed.phantom.catalogue import FINDING_NAMES

SITES_FILE = Path(__file__).with_name("sites.yaml")


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """How one site turns density into pixels."""

    ap_fraction: float
    gain: float
    gamma: float
    noise: float
    markers: dict[str, str]
    border_value: float
    border_fraction: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Site:
    """One hospital of the phantom world; `languages` are the languages its reports are written in
    (one for most sites; several for a bilingual site, whose studies take the language of the
    layout that writes them)."""

    name: str
    languages: tuple[str, ...]
    age: tuple[int, int]
    female_fraction: float
    acquisition: Acquisition
    prevalence: dict[str, float]


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, or raise ConfigError naming the file."""
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml_files.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"phantom data file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {path}: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return data


def require(data: dict[str, Any], key: str, where: str) -> Any:
    """`data[key]`, or a ConfigError naming the file and key."""
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}'")
    return data[key]


def read_prevalence(raw: Any, where: str, valid: tuple[str, ...], kind: str) -> dict[str, Any]:
    """`prevalence`: a mapping whose keys are among `valid` (the `kind` of finding, for the
    message)."""
    prevalence = dict(require(raw, "prevalence", where))
    unknown = sorted(set(prevalence) - set(valid))
    if unknown:
        raise ConfigError(f"{where}.prevalence: unknown {kind} {unknown}; valid: {list(valid)}")
    return prevalence


def read_languages(raw: Any, where: str) -> tuple[str, ...]:
    """`language`: one language code or a non-empty list of distinct codes."""
    value = require(raw, "language", where)
    codes = [value] if isinstance(value, str) else value
    if not isinstance(codes, list) or not codes or not all(isinstance(c, str) and c for c in codes):
        raise ConfigError(f"{where}.language must be a language code or a list of them, got {value!r}")
    if len(set(codes)) != len(codes):
        raise ConfigError(f"{where}.language lists a language twice: {codes}")
    return tuple(codes)


def _parse_site(name: str, raw: Any, path: Path) -> Site:
    where = f"{path}: site '{name}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    acq = require(raw, "acquisition", where)
    fields = {f.name for f in dataclasses.fields(Acquisition)}
    missing = sorted(fields - set(acq))
    if missing:
        raise ConfigError(f"{where}.acquisition: missing keys {missing}")
    acq = {k: acq[k] for k in fields}
    acq["border_fraction"] = tuple(acq["border_fraction"])
    prevalence = read_prevalence(raw, where, FINDING_NAMES, "findings")
    return Site(
        name=name,
        languages=read_languages(raw, where),
        age=tuple(require(raw, "age", where)),
        female_fraction=float(require(raw, "female_fraction", where)),
        acquisition=Acquisition(**acq),
        prevalence={f: float(prevalence.get(f, 0.0)) for f in FINDING_NAMES},
    )


@functools.lru_cache(maxsize=8)
def load_sites(path: Path = SITES_FILE) -> dict[str, Site]:
    """All sites defined in `path` (the packaged `sites.yaml` by default)."""
    data = load_yaml(path)
    return {name: _parse_site(name, raw, path) for name, raw in data.items()}


def get_site(name: str, path: Path = SITES_FILE) -> Site:
    """The named site, or a ConfigError listing the valid site names."""
    sites = load_sites(path)
    if name not in sites:
        raise ConfigError(f"unknown phantom site '{name}'; valid sites: {sorted(sites)}")
    return sites[name]
