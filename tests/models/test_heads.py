"""ProjectionHead: the projector of every method; its domains keep the running statistics of
batches of another kind (UniMedI's CT samples) apart from the default ones."""

import copy

import torch

from unimed.models.heads import ProjectionHead


def _norm_buffers(head: ProjectionHead, domain: str | None) -> list[torch.Tensor]:
    norms = [head.mlp[1], head.norm] if domain is None else list(head.domain_norms[domain])
    return [b.clone() for n in norms for b in (n.running_mean, n.running_var)]


def test_a_domains_batches_train_as_the_default_ones_and_move_only_its_own_statistics():
    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 4, out_norm=True, domains=("ct",)).train()
    plain = ProjectionHead(6, 8, 4, out_norm=True)
    assert len(list(head.parameters())) == len(list(plain.parameters()))  # the affine ones shared
    assert head.domain_norms["ct"][0].weight is head.mlp[1].weight
    xray, ct = torch.randn(32, 6), 3.0 + 2.0 * torch.randn(32, 6)
    default_before, ct_before = _norm_buffers(head, None), _norm_buffers(head, "ct")
    twin = copy.deepcopy(head)
    torch.testing.assert_close(head(ct, "ct"), twin(ct))  # batch statistics: the same function
    assert all(torch.equal(a, b) for a, b in zip(_norm_buffers(head, None), default_before))
    assert not any(torch.equal(a, b) for a, b in zip(_norm_buffers(head, "ct"), ct_before))
    ct_after = _norm_buffers(head, "ct")
    head(xray)
    assert all(torch.equal(a, b) for a, b in zip(_norm_buffers(head, "ct"), ct_after))


def test_each_domain_is_evaluated_with_its_own_running_statistics():
    """Trained on X-ray-like and CT-like batches of different means, the CT batch evaluated
    through the CT norms comes out centred; through the default ones (X-ray statistics) it is
    one offset shared by every sample, what made UniMedI's CT embeddings nearly parallel."""
    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 4, out_norm=True, domains=("ct",)).train()
    for _ in range(200):
        head(torch.randn(32, 6))
        head(3.0 + torch.randn(32, 6), "ct")
    head.eval()
    ct = 3.0 + torch.randn(256, 6)
    with torch.no_grad():
        own, default = head(ct, "ct"), head(ct)
    assert own.mean(0).abs().max() < 0.3
    assert default.mean(0).abs().max() > 1.0
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(own, own.mean(0, keepdim=True)).mean() < 0.3
    assert cosine(default, default.mean(0, keepdim=True)).mean() > 0.7


def test_an_untracked_pass_computes_the_same_and_leaves_the_running_statistics():
    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 4, out_norm=True).train()
    x = 2.0 + torch.randn(16, 6)
    before, twin = _norm_buffers(head, None), copy.deepcopy(head)
    assert torch.equal(head.untracked(x), twin(x))
    assert all(torch.equal(a, b) for a, b in zip(_norm_buffers(head, None), before))
    assert not any(torch.equal(a, b) for a, b in zip(_norm_buffers(twin, None), before))
    head.eval()
    assert torch.equal(head.untracked(x), head(x))
