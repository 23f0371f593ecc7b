"""benchmarks/slice_attention.py: its measures on hand-made slab scores whose answers are known (a
selection that follows the anatomy, one that follows the input position, a flat attention)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("slice_attention") as module:
        yield module


# Three volumes of 4 slabs; each volume's anatomy puts its brightest slabs at different places.
CONTENT = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 4.0, 3.0, 2.0], [2.0, 1.0, 3.0, 4.0]])
FOUND = [{0}, {1, 2}, {3}]


def test_a_selection_that_follows_the_anatomy_picks_the_same_slabs_upside_down(bench):
    out = bench.diagnose(CONTENT, CONTENT[:, ::-1], FOUND, k=2)
    assert out["kept_anatomy"] == 1.0
    # picks {0, 1}, {1, 2}, {2, 3}; upside down the same anatomy sits at {2, 3}, {1, 2}, {0, 1}
    assert out["kept_position"] == pytest.approx((0 + 1 + 0) / 3)
    assert out["precision"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert out["random_precision"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    assert out["random_kept"] == 0.5
    np.testing.assert_allclose(out["picked"], [1 / 3, 2 / 3, 2 / 3, 1 / 3])
    np.testing.assert_allclose(out["picked_reversed"], [1 / 3, 2 / 3, 2 / 3, 1 / 3])
    np.testing.assert_allclose(out["holds_finding"], [1 / 3, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(out["relative_score"], [7 / 7.5, 8 / 7.5, 8 / 7.5, 7 / 7.5])
    # spread (4 - 1) / 2.5 in every volume; the slab means vary little against the total
    assert out["spread"] == pytest.approx(1.2)
    means = CONTENT.mean(0)
    assert out["position_share"] == pytest.approx(means.var() / CONTENT.var())
    assert out["position_share"] < 0.1


def test_a_selection_that_follows_the_input_position_ignores_the_volume(bench):
    position = np.tile([1.0, 1.2, 1.1, 0.7], (3, 1))  # every volume, either way up, scored alike
    out = bench.diagnose(position, position, FOUND, k=1)
    assert (out["kept_position"], out["kept_anatomy"]) == (1.0, 0.0)
    assert out["position_share"] == pytest.approx(1.0)
    np.testing.assert_allclose(out["picked"], [0, 1, 0, 0])
    assert out["precision"] == pytest.approx(1 / 3)  # slab 1 holds a finding in volume 1 only
    assert out["spread"] == pytest.approx(0.5 / 1.0)


def test_a_flat_attention_has_no_spread_and_picks_by_the_tie_rule(bench):
    flat = np.full((3, 4), 0.25)
    out = bench.diagnose(flat, flat, FOUND, k=2)
    assert out["spread"] == 0.0 and np.isnan(out["position_share"])
    np.testing.assert_allclose(out["picked"], [1, 1, 0, 0])  # ties go to the lower index
    assert out["kept_anatomy"] == 0.0  # reversed, the lowest inputs are the top slabs


def test_slab_scores_and_finding_slabs_read_slabs_of_the_model_thickness(bench):
    slices = np.array([[0.1, 0.1, 0.3, 0.3, 0.2, 0.2]])
    np.testing.assert_array_equal(bench.slab_scores(slices, 2), [[0.1, 0.3, 0.2]])
    with pytest.raises(ValueError, match="not constant within slabs of 3 slices"):
        bench.slab_scores(slices, 3)
    assert bench.finding_slabs({"nodule": {1}, "covid": {4, 5}}, 2) == {0, 2}


def test_a_run_folder_without_a_checkpoint_is_one_line(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "slice_attention.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"slice_attention.py: no checkpoint at {tmp_path}: expected a "
                                                "folder with model.safetensors, a checkpoints folder with a "
                                                "'latest' file, or a run folder holding pretrain/checkpoints"]
