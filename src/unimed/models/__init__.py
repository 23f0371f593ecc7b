"""Vision and text encoders, projection heads and the methods' models.

Methods (:mod:`unimed.methods`) build these; image encoder presets are listed in
:data:`IMAGE_ENCODERS`.

Exports are resolved lazily: :mod:`unimed.config` imports :mod:`unimed.models.config`, and loading
timm and transformers (seconds) just to read a config would slow every CLI command.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMAGE_ENCODERS": "unimed.models.image",
    "create_image_encoder": "unimed.models.image",
    "load_image_weights": "unimed.models.image",
    "MedUniC": "unimed.models.medunic",
    "create_text_encoder": "unimed.models.text",
    "freeze_text_layers": "unimed.models.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unimed.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
