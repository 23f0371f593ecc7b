"""Parallel-report retrieval (the MLM stage's guard) and the line the main job prints for it."""

import pytest
import torch

from unimed.commands.medunic import mlm_check_line
from unimed.text.crosslingual import parallel_recall_at_1


def test_parallel_recall_counts_translations_found_first_each_way() -> None:
    english = torch.eye(3)
    # Row 0 and 1 of the second language are swapped; row 2 is its translation.
    second = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    recall = parallel_recall_at_1(english, second)
    assert recall == {"first_to_second": pytest.approx(1 / 3), "second_to_first": pytest.approx(1 / 3)}
    assert parallel_recall_at_1(english, english) == {"first_to_second": 1.0, "second_to_first": 1.0}


def test_check_line_says_pass_or_fail_with_the_numbers() -> None:
    worse = {"before": 0.034, "after": 0.014, "passed": False, "pairs": 147}
    assert mlm_check_line(worse) == ("FAIL: MLM made cross-lingual retrieval worse: cross-lingual R@1 "
                                     "3.4% before MLM, 1.4% after (147 parallel reports)")
    assert mlm_check_line({**worse, "after": 0.05, "passed": True}).startswith("PASS: MLM did not")
