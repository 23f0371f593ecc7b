"""PRIOR's zero-shot scorer (Supp §3.2; spec §7): one prompt "{X} is observed" per class, a global
score s * cos(z_v, z_prompt) and a local score (mean sigmoid LAM attention between the image
patches and the prompt sentence), each softmax-normalised over the candidates, then added.

The Supp adds the two with equal weight (``local_weight=1``); the released code uses 0.5. The
prompts are encoded without Gumbel noise (the code samples it: spec §11-B7) and without [SEP]
(§11-B8), and any batch size gives the same scores (§11-B13).

:func:`multiclass_scores` is the paper's protocol (one label per image, CheXpert 5x200): softmax
over the classes. The project's multi-label zero-shot sets use the model's own
``Prior.zero_shot_scores`` through :mod:`unimed.eval.zero_shot`: per class, the observed prompt
competes with the negative prompt ("No {X}"), each pair normalised alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from unimed.eval.encoders import Encoder
from unimed.eval.prompts import PromptSet
from unimed.models.prior import combine_scores


@torch.no_grad()
def raw_scores(encoder: Encoder, images: torch.Tensor, texts: Sequence[str], *,
               batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) images, M one-sentence texts -> (N, M) global and (N, M) local scores (CPU)."""
    if not hasattr(encoder.model, "prompt_scores"):
        raise TypeError(f"encoder '{encoder.name}' has no PRIOR prompt scorer (prompt_scores)")
    prompts = encoder.model.encode_prompts(*encoder.tokenize(texts))
    global_rows, local_rows = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(encoder.device)
        scores = encoder.model.prompt_scores(x, prompts)
        global_rows.append(scores["global"].float().cpu())
        local_rows.append(scores["local"].float().cpu())
    return torch.cat(global_rows), torch.cat(local_rows)


def multiclass_scores(encoder: Encoder, images: torch.Tensor, prompts: PromptSet,
                      classes: Sequence[str], *, local_weight: float = 1.0,
                      batch_size: int = 64) -> np.ndarray:
    """(N, C) PRIOR scores over the classes' observed prompts; argmax is the prediction."""
    texts = [prompts.observed(c) for c in classes]
    g, l = raw_scores(encoder, images, texts, batch_size=batch_size)
    return combine_scores(g, l, local_weight).numpy()
