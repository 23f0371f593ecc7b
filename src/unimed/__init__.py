"""unimed: medical vision-language pre-training with an embedded phantom world.

``unimed.load(path)`` returns a trained model for inference (:mod:`unimed.pretrained`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from unimed.pretrained import Pretrained


def load(path: Any, *, device: Any = "cpu") -> Pretrained:
    """The trained model at `path` (an exported folder, a run or a checkpoint folder); see
    :func:`unimed.pretrained.load`. Imported on first use, so `import unimed` stays light."""
    from unimed.pretrained import load as load_pretrained

    return load_pretrained(path, device=device)
