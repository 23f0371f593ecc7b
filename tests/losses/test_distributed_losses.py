"""Two gloo processes give the single-process losses and gradients on the same global batch.

Convention checked (see unimed.losses.common): the mean over ranks of each per-rank loss equals the
single-process loss (L_TF is even equal on every rank), and the gradient each rank gets for its own
rows is world_size times the single-process gradient of those rows, which DDP's gradient averaging
turns back into the single-process parameter gradient.
"""

from __future__ import annotations

import pytest
import torch
from gloo_ranks import run_on_ranks

from unimed.losses import MedUniCLoss, gather_features
from unimed.models.config import MedUniCLossConfig

WORLD = 2
LOCAL = 3
KEYS = ("image_features", "image_aug_features", "text_features", "ctr_a", "ctr_b")
TERMS = ("cvl_loss", "ssv_loss", "tf_loss", "tt_loss", "loss")
CONFIGS = {"paper": MedUniCLossConfig(), "symmetric_ssv": MedUniCLossConfig(ssv_symmetric=True, ctr_weight=0.5)}


def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(WORLD * LOCAL, 6, generator=gen) for k in KEYS}


def _losses_and_grads(
    cfg: MedUniCLossConfig, features: dict[str, torch.Tensor], rank: int, world_size: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Each term's value and its gradient w.r.t. every input, one autograd.grad call per term."""
    inputs = {k: v.clone().requires_grad_(True) for k, v in features.items()}
    losses = MedUniCLoss(cfg)(**inputs, rank=rank, world_size=world_size)
    result = {}
    for term in TERMS:
        grads = torch.autograd.grad(
            losses[term], list(inputs.values()), retain_graph=True, allow_unused=True
        )
        result[term] = {"value": losses[term].detach()}
        result[term].update(
            {k: torch.zeros_like(inputs[k]) if g is None else g for k, g in zip(inputs, grads)}
        )
    return result


def _rank_losses(rank: int, world: int) -> dict:
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    local = {k: v[rows] for k, v in _global_batch().items()}
    gathered = gather_features(local["ctr_a"], rank, world)
    results = {n: _losses_and_grads(cfg, local, rank, world) for n, cfg in CONFIGS.items()}
    return {"gathered": gathered.detach(), "results": results}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_rank_losses, WORLD, tmp_path_factory.mktemp("dist"))


def test_gather_concatenates_ranks_in_order(rank_results) -> None:
    expected = _global_batch()["ctr_a"]
    for result in rank_results:
        torch.testing.assert_close(result["gathered"], expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("term", TERMS)
def test_distributed_equals_single_process(rank_results, name: str, term: str) -> None:
    single = _losses_and_grads(CONFIGS[name], _global_batch(), rank=0, world_size=1)[term]
    per_rank = [r["results"][name][term] for r in rank_results]
    mean_value = torch.stack([r["value"] for r in per_rank]).mean()
    torch.testing.assert_close(mean_value, single["value"])
    if term == "tf_loss":
        for r in per_rank:
            torch.testing.assert_close(r["value"], single["value"])
    for rank, result in enumerate(per_rank):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for key in KEYS:
            torch.testing.assert_close(result[key], WORLD * single[key][rows], msg=f"{term} {key}")


def test_gather_is_identity_for_one_process() -> None:
    x = torch.randn(3, 2)
    assert gather_features(x, 0, 1) is x


def test_gather_without_process_group_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_features(torch.randn(3, 2), 0, 2)
