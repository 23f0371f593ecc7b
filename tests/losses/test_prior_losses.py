"""PRIOR's objectives against loops written from the spec (shared/specs/PRIOR.md §3-5), on tiny
inputs, and the Hungarian matching against a brute-force search over permutations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from unimed.losses.prior import (
    GlobalAlignmentLoss,
    ImageReconstructionLoss,
    LocalPatchLoss,
    LocalSentenceLoss,
    PriorLoss,
    PrototypeLoss,
    ReportReconstructionLoss,
    hungarian_align,
    hungarian_permutation,
)
from unimed.models.prior_config import PriorConfig


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _cos(a: list[float], b: list[float]) -> float:
    return _dot(_unit(a), _unit(b))


def _ce(logits: list[float], target: int) -> float:
    return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_global(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """§3.1: ½[mean_i CE(s cos(v_i, t_.), i) + mean_i CE(s cos(t_i, v_.), i)]."""
    v, t = image.tolist(), text.tolist()
    n = len(v)
    i2t = sum(_ce([scale * _cos(v[i], t[j]) for j in range(n)], i) for i in range(n)) / n
    t2i = sum(_ce([scale * _cos(t[i], v[j]) for j in range(n)], i) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_global_alignment_matches_loop() -> None:
    gen = _gen(0)
    image, text = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    log_scale = torch.tensor(math.log(1 / 0.3))
    got = GlobalAlignmentLoss()(image, text, log_scale)["global_loss"]
    assert got.item() == pytest.approx(reference_global(image, text, 1 / 0.3), rel=1e-5)


def test_global_alignment_learns_its_scale_and_names_the_gpa_term() -> None:
    gen = _gen(1)
    image, text = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    log_scale = torch.tensor(math.log(100.0), requires_grad=True)
    out = GlobalAlignmentLoss("gpa")(image, text, log_scale)
    assert list(out) == ["gpa_loss"]
    out["gpa_loss"].backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


def reference_local_sentence(sentences: list[list[list[float]]],
                             attended: list[list[list[float]]], scale: float) -> float:
    """§3.3 per report over its own sentences only, then the mean over reports."""
    per_report = []
    for s, s_hat in zip(sentences, attended):
        n = len(s)
        a = sum(_ce([scale * _cos(s_hat[i], s[j]) for j in range(n)], i) for i in range(n)) / n
        b = sum(_ce([scale * _cos(s[i], s_hat[j]) for j in range(n)], i) for i in range(n)) / n
        per_report.append((a + b) / 2)
    return sum(per_report) / len(per_report)


def test_local_sentence_loss_matches_loop_with_padding() -> None:
    gen = _gen(2)
    counts = [3, 1, 4]
    sentences = torch.randn(3, 4, 5, generator=gen)
    attended = torch.randn(3, 4, 5, generator=gen)
    mask = torch.tensor([[i < c for i in range(4)] for c in counts])
    sentences[~mask] = 1e3  # padding must not matter
    scale = 7.0
    got = LocalSentenceLoss()(sentences, attended, mask, torch.tensor(math.log(scale)))
    want = reference_local_sentence(
        [sentences[b, :c].tolist() for b, c in enumerate(counts)],
        [attended[b, :c].tolist() for b, c in enumerate(counts)], scale)
    assert got["local_sentence_loss"].item() == pytest.approx(want, rel=1e-5)


def test_local_patch_loss_matches_simsiam_loop_and_stops_gradients() -> None:
    gen = _gen(3)
    v, v_hat, h_v, h_v_hat = (torch.randn(2, 3, 4, generator=gen, requires_grad=True)
                              for _ in range(4))
    got = LocalPatchLoss()(v, v_hat, h_v, h_v_hat)["local_patch_loss"]
    terms = [
        -(_cos(h_v[b, p].tolist(), v_hat[b, p].tolist()) + _cos(h_v_hat[b, p].tolist(), v[b, p].tolist())) / 2
        for b in range(2) for p in range(3)
    ]
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    got.backward()
    assert v.grad is None and v_hat.grad is None  # the stop-gradient targets
    assert h_v.grad.abs().sum() > 0 and h_v_hat.grad.abs().sum() > 0


def test_prototype_loss_is_mean_absolute_difference() -> None:
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    out = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    got = PrototypeLoss()(x, out)["spb_loss"]
    assert got.item() == pytest.approx((1 + 2 + 0.5 + 1) / 4)


def test_image_reconstruction_loss_l1_and_bilinear_target_resize() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
    got = ImageReconstructionLoss()(pred, target)["image_rec_loss"]
    assert got.item() == pytest.approx((1 + 0 + 2 + 0) / 4)
    big = torch.full((1, 1, 4, 4), 3.0)  # a constant image resizes to the same constant
    got = ImageReconstructionLoss()(pred, big)["image_rec_loss"]
    assert got.item() == pytest.approx((2 + 1 + 0 + 1) / 4)


def _brute_force(cost: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """The minimum total cost and the assignment target j -> prediction perm[j], over all Q!."""
    q = cost.shape[0]
    return min((sum(cost[p[j], j] for j in range(q)), p) for p in itertools.permutations(range(q)))


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_permutation_equals_brute_force(seed: int) -> None:
    cost = np.random.default_rng(seed).random((5, 5))
    perm = hungarian_permutation(cost)
    best, best_perm = _brute_force(cost)
    assert sum(cost[perm[j], j] for j in range(5)) == pytest.approx(best)
    assert tuple(perm) == best_perm  # random costs: the optimum is unique


def test_hungarian_fixes_the_code_permutation_on_a_three_cycle() -> None:
    # Prediction i matches target (i + 1) % 3 at cost 0, everything else costs 1.
    cost = np.ones((3, 3))
    for i in range(3):
        cost[i, (i + 1) % 3] = 0.0
    perm = hungarian_permutation(cost)
    assert [cost[perm[j], j] for j in range(3)] == [0.0, 0.0, 0.0]
    col = linear_sum_assignment(cost)[1]  # the public code pairs pred[col[j]] with target j
    assert [cost[col[j], j] for j in range(3)] == [1.0, 1.0, 1.0]


def test_hungarian_align_pairs_predictions_with_their_targets() -> None:
    gen = _gen(4)
    target = torch.randn(2, 4, 3, generator=gen)
    order = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 3, 0])]
    pred = torch.stack([target[b][order[b]] + 0.01 for b in range(2)]).requires_grad_(True)
    aligned = hungarian_align(pred, target)
    torch.testing.assert_close(aligned, target + 0.01)
    for b in range(2):
        cost = torch.cdist(pred[b].detach(), target[b], p=1).numpy()
        _, best = _brute_force(cost)
        torch.testing.assert_close(aligned[b], pred[b, list(best)])
    aligned.sum().backward()
    torch.testing.assert_close(pred.grad, torch.ones_like(pred))


def test_report_reconstruction_matches_loops() -> None:
    gen = _gen(5)
    aligned = torch.randn(2, 3, 4, generator=gen)
    target = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    target[~mask] = 0.0
    prototypes = torch.randn(5, 4, generator=gen)
    target_logits = torch.randn(2, 3, 5, generator=gen)
    out = ReportReconstructionLoss()(aligned, target, mask, target_logits, prototypes)
    spg = (aligned - target).abs().mean().item()
    kl, rows = 0.0, 0
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            p = torch.softmax(target_logits[b, t], -1).tolist()
            q = torch.softmax(aligned[b, t] @ prototypes.T, -1).tolist()
            kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            rows += 1
    assert out["spg_loss"].item() == pytest.approx(spg, rel=1e-6)
    assert out["kl_loss"].item() == pytest.approx(kl / rows, rel=1e-5)


def _stage_outputs(stage: int) -> dict[str, torch.Tensor]:
    gen = _gen(6)
    b, t, p, d, k, q = 2, 3, 4, 5, 6, 3

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = {"image_global": r(b, d), "text_global": r(b, d), "logit_scale": torch.tensor(2.0),
           "local_logit_scale": torch.tensor(1.0), "sentences": r(b, t, d),
           "attended_sentences": r(b, t, d), "sentence_mask": mask, "patches": r(b, p, d),
           "reconstructed_patches": r(b, p, d), "patch_prediction": r(b, p, d),
           "reconstructed_prediction": r(b, p, d), "raw_sentences": r(5, d),
           "prototype_sentences": r(5, d)}
    if stage == 3:
        out |= {"image_reconstruction": r(b, 1, 8, 8), "image_target": r(b, 1, 8, 8),
                "report_prediction": r(b, q, d), "report_target": r(b, q, d),
                "report_mask": mask, "report_target_logits": r(b, q, k), "prototypes": r(k, d),
                "predicted_text_global": r(b, d)}
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_prior_loss_weighs_the_terms_of_each_stage(stage: int) -> None:
    cfg = PriorConfig()
    outputs = _stage_outputs(stage)
    got = PriorLoss(cfg)(outputs, stage)
    keys = {1: {"global_loss", "local_sentence_loss", "local_patch_loss"}}
    keys[2] = keys[1] | {"spb_loss"}
    keys[3] = keys[2] | {"image_rec_loss", "spg_loss", "kl_loss", "gpa_loss"}
    assert set(got) == keys[stage] | {"loss"}
    raw = GlobalAlignmentLoss()(outputs["image_global"], outputs["text_global"],
                                outputs["logit_scale"])["global_loss"]
    want_weight = 10.0 if stage == 3 else 1.0
    torch.testing.assert_close(got["global_loss"], want_weight * raw)
    if stage >= 2:
        spb = PrototypeLoss()(outputs["raw_sentences"], outputs["prototype_sentences"])["spb_loss"]
        torch.testing.assert_close(got["spb_loss"], 10.0 * spb)
    torch.testing.assert_close(got["loss"], sum(v for k, v in got.items() if k != "loss"))


def test_prior_loss_weight_zero_drops_a_term_and_bad_stage_is_an_error() -> None:
    cfg = PriorConfig(local_patch_weight=0.0)
    got = PriorLoss(cfg)(_stage_outputs(1), 1)
    assert "local_patch_loss" not in got
    with pytest.raises(ValueError, match="stage must be one of"):
        PriorLoss(cfg)(_stage_outputs(1), 4)
