"""PRIOR's global InfoNCE in two gloo processes equals the single-process loss on the global batch.

The positives of rank r are the gathered rows r * B + i (global rank), negatives span both ranks,
and each rank's gradient for its own rows is world_size times the single-process gradient (the
convention of unimed.losses.common, which DDP's averaging turns into the single-process update).
The learnable log-scale gets the same gradient summed over ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
from gloo_ranks import run_on_ranks

from unimed.losses.prior import GlobalAlignmentLoss

WORLD = 2
LOCAL = 3


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * LOCAL, 5, generator=gen), torch.randn(WORLD * LOCAL, 5, generator=gen)


def _loss_and_grads(image: torch.Tensor, text: torch.Tensor, rank: int, world_size: int
                    ) -> dict[str, torch.Tensor]:
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = GlobalAlignmentLoss()(image, text, log_scale, rank=rank, world_size=world_size)
    loss = loss["global_loss"]
    loss.backward()
    return {"value": loss.detach(), "image": image.grad, "text": text.grad,
            "log_scale": log_scale.grad}


def _rank_loss(rank: int, world: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    image, text = _global_batch()
    return _loss_and_grads(image[rows], text[rows], rank, world)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_rank_loss, WORLD, tmp_path_factory.mktemp("prior_dist"))


def test_global_loss_over_two_ranks_equals_single_process(rank_results) -> None:
    single = _loss_and_grads(*_global_batch(), rank=0, world_size=1)
    mean = torch.stack([r["value"] for r in rank_results]).mean()
    torch.testing.assert_close(mean, single["value"])
    for rank, result in enumerate(rank_results):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for key in ("image", "text"):
            torch.testing.assert_close(result[key], WORLD * single[key][rows], msg=key)
    scale_grad = torch.stack([r["log_scale"] for r in rank_results]).sum()
    torch.testing.assert_close(scale_grad, WORLD * single["log_scale"])


def test_labels_follow_the_global_rank(rank_results) -> None:
    # With local-rank labels (the public code on a second node) rank 1 would score its rows against
    # rank 0's keys: its loss would differ from the global-rank one computed here in one process.
    image, text = _global_batch()
    rows = slice(LOCAL, 2 * LOCAL)
    normal = torch.nn.functional.normalize
    logits = normal(image[rows], dim=-1) @ normal(text, dim=-1).T / 0.07
    i2t = torch.nn.functional.cross_entropy(logits, torch.arange(LOCAL) + LOCAL)
    logits = normal(text[rows], dim=-1) @ normal(image, dim=-1).T / 0.07
    t2i = torch.nn.functional.cross_entropy(logits, torch.arange(LOCAL) + LOCAL)
    torch.testing.assert_close(rank_results[1]["value"], (i2t + t2i) / 2)
