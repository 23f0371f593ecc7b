"""UniMedI's self-distillation pieces (shared/specs/UNIMEDI.md §6) against loops written from the
spec's formulas: DINO's head, the [CLS] and patch losses with centering, and the EMA schedules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from unimed.methods.unimedi import clip_loss
from unimed.losses.unimedi import (
    DinoHead,
    DistillationLoss,
    ema_momentum,
    ema_update,
    teacher_temperature,
)

T_S, T_T = 0.1, 0.05


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def _log_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    lse = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - lse for x in xs]


def _cross_entropy(student: list[float], teacher: list[float], center: list[float]) -> float:
    """sum_K -softmax((t - c) / T_t) log_softmax(s / T_s) for one sample or token."""
    target = _softmax([(t - c) / T_T for t, c in zip(teacher, center)])
    log_probs = _log_softmax([s / T_S for s in student])
    return -sum(p * q for p, q in zip(target, log_probs))


def _reference_patch(student, teacher, mask, center) -> float:
    """Per image: mean CE over its masked tokens (0 when none), then the mean over images."""
    per_image = []
    for s_img, t_img, m_img in zip(student, teacher, mask):
        total = sum(_cross_entropy(s, t, center) for s, t, m in zip(s_img, t_img, m_img) if m)
        per_image.append(total / max(sum(m_img), 1))
    return sum(per_image) / len(per_image)


def _mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


def test_teacher_temperature_warms_up_per_epoch() -> None:
    warm = {"start": 0.04, "end": 0.07, "warmup_epochs": 30}
    assert teacher_temperature(0, **warm) == pytest.approx(0.04)
    assert teacher_temperature(29, **warm) == pytest.approx(0.07)
    assert teacher_temperature(10, **warm) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert teacher_temperature(30, **warm) == 0.07
    assert teacher_temperature(49, **warm) == 0.07
    assert teacher_temperature(0, start=0.04, end=0.07, warmup_epochs=0) == 0.07


def test_ema_momentum_cosine_from_base_to_one() -> None:
    base = 0.996
    assert ema_momentum(0, 1000, base) == pytest.approx(base)
    assert ema_momentum(500, 1000, base) == pytest.approx((1 + base) / 2)
    assert ema_momentum(1000, 1000, base) == pytest.approx(1.0)
    assert ema_momentum(5000, 1000, base) == pytest.approx(1.0)
    quarter = 1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2
    assert ema_momentum(250, 1000, base) == pytest.approx(quarter)
    with pytest.raises(ValueError, match="total_steps"):
        ema_momentum(0, 0, base)


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_blends_parameters_and_copies_float_buffers() -> None:
    student = _student()
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.data.normal_(generator=_gen(1))
    student[1].running_mean.fill_(3.0)
    student[1].num_batches_tracked.fill_(7)
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    new = student.state_dict()
    ema_update(teacher, student, 0.3)
    got = teacher.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        want = 0.3 * old[name].numpy() + 0.7 * new[name].numpy()
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-7)
    assert got["1.running_mean"].tolist() == [3.0] * 4  # floating buffer copied
    assert got["1.num_batches_tracked"].item() == 0  # integer buffer left alone


def test_ema_momentum_zero_copies_and_one_keeps_the_teacher() -> None:
    student = DinoHead(4, 6, hidden_dim=8, bottleneck_dim=5)
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.data.normal_(generator=_gen(2))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    ema_update(teacher, student, 0.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_ema_update_names_the_first_mismatched_key() -> None:
    student = _student()
    other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    other.add_module("2", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"'2.weight'"):
        ema_update(other, student, 0.5)
    with pytest.raises(ValueError, match="buffers"):
        ema_update(nn.Sequential(nn.Linear(3, 4), nn.Linear(1, 4)), student, 0.5)


def _reference_head(head: DinoHead, x: np.ndarray) -> np.ndarray:
    """MLP with erf-GELU between layers, L2-normalise, then rows of V scaled to unit norm."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    erf = np.vectorize(math.erf)
    for i, layer in enumerate(linears):
        if i:
            x = 0.5 * x * (1 + erf(x / math.sqrt(2)))
        x = x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    direction = head.last_layer.parametrizations.weight.original1.detach().double().numpy()
    return x @ (direction / np.linalg.norm(direction, axis=1, keepdims=True)).T


def test_dino_head_matches_a_numpy_forward_for_samples_and_tokens() -> None:
    torch.manual_seed(0)
    head = DinoHead(6, 10, hidden_dim=12, bottleneck_dim=4, layers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 12), (12, 12), (12, 4)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    tokens = torch.randn(2, 3, 6, generator=_gen(3))
    got = head(tokens)
    assert got.shape == (2, 3, 10)
    want = _reference_head(head, tokens.double().numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head(tokens[:, 1]), got[:, 1])
    single = DinoHead(6, 10, bottleneck_dim=4, layers=1)
    assert [(m.in_features, m.out_features) for m in single.mlp] == [(6, 4)]


def test_dino_head_init_truncated_normal_and_zero_bias() -> None:
    torch.manual_seed(0)
    head = DinoHead(64, 8, hidden_dim=512, bottleneck_dim=32)
    for layer in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_last_layer_unit_rows_and_frozen_magnitude(norm_last_layer: bool) -> None:
    torch.manual_seed(0)
    head = DinoHead(5, 7, hidden_dim=8, bottleneck_dim=4, norm_last_layer=norm_last_layer)
    weight = head.last_layer.weight.detach().numpy()  # (7, 4) effective g * v / |v|
    np.testing.assert_allclose(np.linalg.norm(weight, axis=1), np.ones(7), rtol=1e-5)
    assert head.last_layer.bias is None
    head(torch.randn(3, 5, generator=_gen(4))).pow(2).sum().backward()
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.requires_grad is not norm_last_layer
    assert (magnitude.grad is None) is norm_last_layer
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0


def test_cls_loss_uses_the_old_center_then_moves_it() -> None:
    gen = _gen(5)
    student, teacher = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    loss_fn = DistillationLoss(5, student_temperature=T_S, center_momentum=0.9)
    old_center = [0.3, -0.2, 0.0, 0.5, 0.1]
    loss_fn.center.copy_(torch.tensor([old_center]))
    got = loss_fn(student, teacher, T_T)
    s_rows, t_rows = student.tolist(), teacher.tolist()
    want = sum(_cross_entropy(s, t, old_center) for s, t in zip(s_rows, t_rows)) / 3
    assert got.item() == pytest.approx(want, rel=1e-5)
    moved = [c + 0.1 * (m - c) for c, m in zip(old_center, _mean_rows(t_rows))]
    assert loss_fn.center.flatten().tolist() == pytest.approx(moved, rel=1e-5, abs=1e-7)
    assert "center" in loss_fn.state_dict()


def test_eval_mode_leaves_the_center() -> None:
    gen = _gen(6)
    student, teacher = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    loss_fn = DistillationLoss(4).eval()
    loss_fn(student, teacher, T_T)
    assert loss_fn.center.abs().sum() == 0


def test_loss_runs_in_float32_and_only_the_student_gets_gradient() -> None:
    gen = _gen(7)
    student = torch.randn(2, 4, generator=gen).bfloat16().requires_grad_(True)
    teacher = torch.randn(2, 4, generator=gen).bfloat16().requires_grad_(True)
    loss = DistillationLoss(4)(student, teacher, T_T)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_patch_loss_averages_masked_tokens_then_images() -> None:
    gen = _gen(8)
    student, teacher = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [True, True, True, False]])
    loss_fn = DistillationLoss(5, student_temperature=T_S)
    old_center = [0.2, 0.0, -0.1, 0.4, 0.3]
    loss_fn.center.copy_(torch.tensor([old_center]))
    got = loss_fn(student, teacher, T_T, mask)
    want = _reference_patch(student.tolist(), teacher.tolist(), mask.tolist(), old_center)
    assert got.item() == pytest.approx(want, rel=1e-5)
    image_means = [_mean_rows(tokens) for tokens in teacher.tolist()]  # all tokens, masked or not
    moved = [0.9 * c + 0.1 * m for c, m in zip(old_center, _mean_rows(image_means))]
    assert loss_fn.center.flatten().tolist() == pytest.approx(moved, rel=1e-5, abs=1e-7)


def test_patch_loss_on_every_token_with_an_all_true_mask() -> None:
    gen = _gen(9)
    student, teacher = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    got = DistillationLoss(4, student_temperature=T_S).eval()(
        student, teacher, T_T, torch.ones(2, 3, dtype=torch.bool)
    )
    rows = zip(student.flatten(0, 1).tolist(), teacher.flatten(0, 1).tolist())
    want = sum(_cross_entropy(s, t, [0.0] * 4) for s, t in rows) / 6
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_patch_loss_ignores_the_student_at_unmasked_tokens() -> None:
    gen = _gen(10)
    student, teacher = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    loss_fn = DistillationLoss(6).eval()
    base = loss_fn(student, teacher, T_T, mask)
    changed = student.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6, generator=gen) * 5
    assert loss_fn(changed, teacher, T_T, mask).item() == pytest.approx(base.item(), rel=1e-6)
    changed[0, 0, 0] += 3.0  # a masked token
    assert loss_fn(changed, teacher, T_T, mask).item() != pytest.approx(base.item(), rel=1e-3)


def test_center_is_averaged_over_ranks(monkeypatch) -> None:
    other_rank_mean = torch.tensor([[1.0, -2.0, 0.5]])

    def all_reduce_with_a_second_rank(tensor: torch.Tensor) -> None:
        tensor.add_(other_rank_mean)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce_with_a_second_rank)
    teacher = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    loss_fn = DistillationLoss(3)
    loss_fn(torch.zeros(2, 3), teacher, T_T, world_size=2)
    global_mean = [(1.0 + 1.0) / 2, (1.0 - 2.0) / 2, (1.0 + 0.5) / 2]
    assert loss_fn.center.flatten().tolist() == pytest.approx([0.1 * m for m in global_mean])


def test_distillation_loss_rejects_mismatched_inputs() -> None:
    loss_fn = DistillationLoss(4)
    with pytest.raises(ValueError, match="student"):
        loss_fn(torch.zeros(2, 4), torch.zeros(3, 4), T_T)
    with pytest.raises(ValueError, match="mask"):
        loss_fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), T_T)
    with pytest.raises(ValueError, match="mask"):
        loss_fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), T_T, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not initialised"):
        loss_fn(torch.zeros(2, 4), torch.zeros(2, 4), T_T, world_size=2)


def test_clip_loss_is_float32_under_autocast_and_matches_cross_entropy_by_hand() -> None:
    """UniMedI's image-report loss: the mean of the two directions' cross-entropy over logits
    scale x cosine, computed in float32 even inside the training loop's autocast region."""
    image = torch.randn(6, 16, generator=_gen(0))
    text = torch.randn(6, 16, generator=_gen(1))
    logit_scale = torch.tensor(math.log(60.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = clip_loss(image, text, logit_scale)
    plain = clip_loss(image, text, logit_scale)
    cos = [[float(a @ b / (a.norm() * b.norm())) for b in text] for a in image]
    rows = [-_log_softmax([60.0 * c for c in cos[i]])[i] for i in range(6)]
    cols = [-_log_softmax([60.0 * cos[j][i] for j in range(6)])[i] for i in range(6)]
    expected = (sum(rows) / 6 + sum(cols) / 6) / 2
    assert under_autocast.dtype == torch.float32
    assert float(plain) == pytest.approx(expected, rel=1e-5)
    assert float(under_autocast) == pytest.approx(expected, rel=1e-5)
