"""Seed aggregation and the ordering verdicts of `unimed ablate`."""

import numpy as np
import pytest
from scipy import stats

from unimed.commands.ablate import aggregate, orderings, welch_interval


def test_aggregate_gives_mean_and_sample_sd_of_shared_leaves() -> None:
    runs = [{"a": {"value": 0.5, "ci": [0.4, 0.6], "n": 3}, "only_first": 1.0},
            {"a": {"value": 0.7, "ci": [0.6, 0.8], "n": 3}}]
    mean, sd = aggregate(runs)
    assert mean == {"a": {"value": pytest.approx(0.6), "n": 3.0}}
    assert sd["a"]["value"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_welch_interval_matches_scipy() -> None:
    better, worse = [0.81, 0.79, 0.84], [0.70, 0.75, 0.71]
    diff, lo, hi = welch_interval(better, worse)
    reference = stats.ttest_ind(better, worse, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(better) - np.mean(worse))
    assert (lo, hi) == pytest.approx((reference.low, reference.high))


def _row(name: str, values: list[float]) -> dict:
    return {"name": name, "seeds": {str(i): {"zero_shot": {"pdc": {"en": {"f1": v}}}}
                                    for i, v in enumerate(values)}}


@pytest.mark.parametrize(("better", "worse", "verdict"), [
    ([0.80, 0.81, 0.82], [0.60, 0.61, 0.62], "holds"),
    ([0.60, 0.61, 0.62], [0.80, 0.81, 0.82], "reversed"),
    ([0.70, 0.80, 0.60], [0.72, 0.62, 0.78], "tie"),
])
def test_orderings_verdicts(better, worse, verdict) -> None:
    rows = [_row("SSV + CVL + MLM", better), _row("CVL + MLM", worse)]
    (result,) = orderings(rows)
    assert result["metric"] == "zero_shot/pdc/en/f1" and result["verdict"] == verdict


def test_one_seed_gives_no_ordering() -> None:
    assert orderings([_row("SSV + CVL + MLM", [0.8]), _row("CVL + MLM", [0.6])]) == []
