"""Cross-lingual retrieval of parallel reports: does a text encoder place a report and its
translation together? The MLM stage's guard (it must not make this worse) and a text-bias measure.
"""

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


def parallel_recall_at_1(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """Row i of `first` (N, D) and row i of `second` (N, D) are translations of each other: the share
    of rows whose nearest neighbour in the other language is their translation, each direction."""
    sims = first @ second.T  # (N, N)
    target = torch.arange(len(sims))
    return {
        "first_to_second": float((sims.argmax(1) == target).float().mean()),
        "second_to_first": float((sims.argmax(0) == target).float().mean()),
    }
