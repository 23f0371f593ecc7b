"""UniMedI's slice selection and attention-guided masking (shared/specs/UNIMEDI.md §3, §6) on
hand-made attention maps whose answers are worked out here by hand or with plain Python loops."""

from __future__ import annotations

import pytest
import torch

from unimed.models.unimedi_ops import (
    attention_keep_mask,
    random_slices,
    slab_to_slices,
    slice_scores,
    top_k_slices,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_slice_scores_average_each_slab_of_tokens() -> None:
    attention = torch.tensor([[1.0, 3.0, 0.0, 0.0, 2.0, 4.0], [6.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    expected = [[2.0, 0.0, 3.0], [3.0, 1.0, 0.0]]  # eq. 2: (1/N) sum over the N = 2 tokens of i
    assert slice_scores(attention, 2).tolist() == expected
    thirds = slice_scores(attention, 3).flatten().tolist()
    assert thirds == pytest.approx([4 / 3, 2.0, 7 / 3, 1 / 3])
    with pytest.raises(ValueError, match="multiple"):
        slice_scores(attention, 4)


def test_top_k_picks_the_highest_slabs_in_anatomical_order() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.8, 0.2, 0.9], [2.0, 1.0, 4.0, 0.0, 3.0, 5.0]])
    got = top_k_slices(scores, 3)  # by score: slabs 5, 3, 1 and 5, 2, 4
    assert got.dtype == torch.long
    assert got.tolist() == [[1, 3, 5], [2, 4, 5]]
    assert top_k_slices(scores, 1).tolist() == [[5], [5]]
    assert top_k_slices(scores, 6).tolist() == [list(range(6))] * 2
    for k in (0, 7):
        with pytest.raises(ValueError, match="k"):
            top_k_slices(scores, k)


def test_random_slices_are_distinct_sorted_and_cover_every_slice() -> None:
    got = random_slices(200, 8, 3, generator=_gen(0))
    assert got.shape == (200, 3) and got.dtype == torch.long
    rows = got.tolist()
    assert all(row == sorted(set(row)) for row in rows)  # distinct and ascending
    counts = [sum(row.count(s) for row in rows) for s in range(8)]
    assert min(counts) > 40  # each slice expected 200 * 3 / 8 = 75 times
    assert torch.equal(got, random_slices(200, 8, 3, generator=_gen(0)))
    assert not torch.equal(got, random_slices(200, 8, 3, generator=_gen(1)))
    with pytest.raises(ValueError, match="k"):
        random_slices(2, 4, 5)


def test_slab_to_slices_centre_random_and_all() -> None:
    slabs = torch.tensor([[0, 2], [1, 7]])
    assert slab_to_slices(slabs, 4, "center").tolist() == [[2, 10], [6, 30]]
    assert slab_to_slices(slabs, 4, "all").tolist() == [
        [0, 1, 2, 3, 8, 9, 10, 11],
        [4, 5, 6, 7, 28, 29, 30, 31],
    ]
    assert slab_to_slices(slabs, 1, "center").tolist() == slabs.tolist()
    many = slabs.repeat(100, 1)  # (200, 2)
    picked = slab_to_slices(many, 4, "random", generator=_gen(0))
    assert picked.shape == many.shape
    offsets = picked - 4 * many
    assert offsets.min() == 0 and offsets.max() == 3  # inside the slab, all offsets drawn
    assert set(offsets.flatten().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="center, random, all"):
        slab_to_slices(slabs, 4, "middle")


def _reference_keep_mask(attention: list[float], ratio: float, groups: list[int]) -> list[bool]:
    """Per group: keep the round((1 - r) n) highest tokens (lower index first on ties)."""
    masked, start = [], 0
    for n in groups:
        values = attention[start:start + n]
        keep_count = int((1 - ratio) * n + 0.5)
        order = sorted(range(n), key=lambda j: (-values[j], j))
        kept = set(order[:keep_count])
        masked += [j not in kept for j in range(n)]
        start += n
    return masked


def test_keep_mask_keeps_the_highest_tokens_of_each_group() -> None:
    attention = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2, 0.6, 0.3, 0.8, 0.4, 0.0]])
    # groups [4, 6], ratio 0.5: keep 2 of (0.9, 0.1, 0.5, 0.7) and 3 of (0.2, 0.6, 0.3, 0.8, 0.4, 0)
    expected = [False, True, True, False, True, False, True, False, False, True]
    assert attention_keep_mask(attention, 0.5, [4, 6]).tolist() == [expected]
    # Joint ranking keeps the 5 highest overall: 0.9, 0.8, 0.7, 0.6, 0.5.
    joint = [False, True, False, False, True, False, True, False, True, True]
    assert attention_keep_mask(attention, 0.5, [10]).tolist() == [joint]


def test_keep_mask_counts_and_ties_match_a_loop() -> None:
    gen = _gen(0)
    attention = torch.randint(0, 4, (5, 23), generator=gen).float()  # many ties
    for ratio, groups in [(0.5, [11, 5, 7]), (0.75, [15, 8]), (0.3, [23]), (0.0, [20, 3])]:
        got = attention_keep_mask(attention, ratio, groups)
        assert got.dtype == torch.bool and got.shape == attention.shape
        for row, mask in zip(attention.tolist(), got.tolist()):
            assert mask == _reference_keep_mask(row, ratio, groups)
    kept = (~attention_keep_mask(attention, 0.75, [16, 7])).sum(-1)
    assert kept.tolist() == [4 + 2] * 5  # round(.25 * 16) + round(.25 * 7)


def test_keep_mask_rejects_bad_groups_and_ratios() -> None:
    attention = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="sum"):
        attention_keep_mask(attention, 0.5, [2, 3])
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            attention_keep_mask(attention, ratio, [6])
