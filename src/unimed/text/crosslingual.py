"""Sentence features of a bare text encoder (no projector), as the MLM stage's cross-lingual
retrieval check needs them; the retrieval metrics themselves are :mod:`unimed.eval.retrieval`'s."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import BertModel, PreTrainedTokenizerBase

from unimed.models.text import pool_text


@torch.no_grad()
def embed_texts(
    encoder: BertModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    pooling: str,
    max_length: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, hidden) L2-normalised sentence features of `texts` (encoder in eval mode, on its device)."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        out.append(pool_text(encoder, batch["input_ids"], batch["attention_mask"], pooling).float())
    return F.normalize(torch.cat(out), dim=-1).cpu()
