"""Range checks of configuration values, run by each section's ``__post_init__`` so that a value
out of range is a config error naming its key when the preset is read, before any stage starts; and
the marker of the options that name files or folders."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

PATH_OPTION = "path"
"""Field metadata key of an option that names a file or folder: a relative one is relative to the
working directory the run was launched from (:func:`unimed.config.load_run_config`)."""


def path_option(default: Any) -> Any:
    """A config field holding a file or folder path (or a list of them, or None)."""
    return dataclasses.field(default=default, metadata={PATH_OPTION: True})


def check_bounds(prefix: str, section: Any, *, at_least_one: Iterable[str] = (),
                 positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                 unit_interval: Iterable[str] = ()) -> None:
    """Raise ValueError naming ``<prefix>.<field>`` for the first field of `section` outside its
    range: ``at_least_one`` (integers >= 1), ``positive`` (> 0), ``non_negative`` (>= 0),
    ``unit_interval`` (in [0, 1]); each a finite number (YAML's ``.inf`` as a learning rate trained
    a step of NaN weights, as a phantom difficulty drew pure noise)."""
    rules = (
        (at_least_one, lambda v: v >= 1, ">= 1"),
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
        (unit_interval, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    )
    for keys, holds, bound in rules:
        for key in keys:
            value = getattr(section, key)
            if math.isinf(value):
                raise ValueError(f"{prefix}.{key} must be a finite number {bound}, got {value}")
            if not holds(value):
                raise ValueError(f"{prefix}.{key} must be {bound}, got {value}")
