"""Range checks of configuration values, run by each section's ``__post_init__`` so that a value
out of range is a config error naming its key when the preset is read, before any stage starts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_bounds(prefix: str, section: Any, *, at_least_one: Iterable[str] = (),
                 positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                 unit_interval: Iterable[str] = ()) -> None:
    """Raise ValueError naming ``<prefix>.<field>`` for the first field of `section` outside its
    range: ``at_least_one`` (integers >= 1), ``positive`` (> 0), ``non_negative`` (>= 0),
    ``unit_interval`` (in [0, 1])."""
    rules = (
        (at_least_one, lambda v: v >= 1, ">= 1"),
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
        (unit_interval, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    )
    for keys, holds, bound in rules:
        for key in keys:
            value = getattr(section, key)
            if not holds(value):
                raise ValueError(f"{prefix}.{key} must be {bound}, got {value}")
