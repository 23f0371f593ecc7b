"""Attentive slice selection scored against slice ground truth: hit rates on a hand-made ground
truth with stub 3D models, the exact random rate beside it, the resized-slice mapping against the
real resize, 2D encoders skipped, clear errors, the config keys and the report table."""

from __future__ import annotations

import contextlib
import dataclasses
from fractions import Fraction
from math import comb
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unimed.config import Config, ConfigError, load_config
from unimed.data.records import Record
from unimed.data.volumes import Volume, axial_slices
from unimed.eval import report, volumes
from unimed.eval.checks import quality_checks
from unimed.eval.config import EvalConfig
from unimed.eval.encoders import Encoder
from unimed.eval.report import format_tables, table_notes
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext

DATASET = "bimcv-covid19"
DEPTH = 8  # eval.volume.selection_slices of these tests
# Test volumes in record order: (name, native depth, its bright slices, ground truth {finding: slices}).
# "empty" holds no finding, so it is not scored; its bright slices would hit v1's findings if the
# task fed the wrong volume's scores. v2 is stored with 16 slices: its slices 10-11 are slice 5 of 8.
VOLUMES = (
    ("v0", 8, (2, 6), {"nodule": (2, 3)}),
    ("empty", 8, (7, 4), {}),
    ("v1", 8, (2, 6), {"pleural_effusion": (0, 1, 2, 3), "pneumothorax": (6,)}),
    ("v2", 16, (2, 6), {"covid": (10, 11)}),
)
# Training volumes (depth 8), the position prior's ground truth: slice 2 holds a finding twice,
# slices 3 and 6 once each, so the 2 slices most often on a finding are {2, 3} (ties: lower index).
TRAINING = (("t0", {"nodule": (2,)}), ("t1", {"pleural_effusion": (2, 3)}), ("t2", {"covid": (6,)}))


@dataclasses.dataclass
class HandMadeData:
    """The part of EvalData the task reads: test records, their stacks of DEPTH slices whose bright
    slices are given, their native depths; the ground truth file lies under `cfg.root`."""

    cfg: SimpleNamespace
    splits: dict[str, list[Record]]
    image_size: int = 4

    def records(self, dataset: str, split: str) -> list[Record]:
        assert dataset == DATASET
        return self.splits.get(split, [])

    def require(self, dataset: str, split: str) -> list[Record]:
        assert self.records(dataset, split)
        return self.records(dataset, split)

    def slice_stacks(self, dataset: str, split: str, slices: int, window: tuple[float, float],
                     side: int) -> torch.Tensor:
        assert (slices, side) == (DEPTH, self.image_size)
        stacks = torch.zeros(len(VOLUMES), DEPTH, 1, side, side)
        for i, (_, _, bright, _) in enumerate(VOLUMES):
            for rank, z in enumerate(bright):  # the first bright slice brightest
                stacks[i, z] = 1.0 - 0.1 * rank
        return stacks

    def native_depths(self, dataset: str, split: str) -> list[int]:
        return [DEPTH] * len(TRAINING) if split == "train" else [depth for _, depth, _, _ in VOLUMES]

    def asking(self) -> contextlib.AbstractContextManager[set[str]]:
        return contextlib.nullcontext(set())


class Bright(torch.nn.Module):
    """A stub UniMedI: selects the `selection_k` brightest slices (or the darkest, `sign` -1)."""

    def __init__(self, k: int, sign: float = 1.0) -> None:
        super().__init__()
        self.selection_k, self.sign = k, sign

    def slice_attention(self, volumes: torch.Tensor) -> torch.Tensor:  # (N, D, 1, S, S) -> (N, D)
        return self.sign * volumes.mean(dim=(2, 3, 4))


@pytest.fixture()
def selection_ctx(tmp_path: Path) -> TaskContext:
    folder = tmp_path / DATASET
    folder.mkdir()
    truth = [(name, truth) for name, _, _, truth in VOLUMES] + list(TRAINING)
    rows = [f"{name}.nii.gz,{finding},{' '.join(map(str, held))}"
            for name, found in truth for finding, held in found.items()]
    (folder / volumes.GROUND_TRUTH_FILE).write_text("key,finding,slices\n" + "\n".join(rows) + "\n")
    splits = {split: [Record(DATASET, folder / f"{name}.nii.gz", name, name, split, ndim=3) for name, *_ in found]
              for split, found in (("test", VOLUMES), ("train", TRAINING))}
    cfg = EvalConfig(tasks=("slice_selection",), bootstrap_resamples=50)
    cfg = dataclasses.replace(cfg, volume=dataclasses.replace(cfg.volume, selection_slices=DEPTH))
    data = HandMadeData(SimpleNamespace(root=str(tmp_path)), splits)
    return TaskContext(data, cfg, tmp_path / "eval")


def _chance(m: int, k: int = 2, n: int = DEPTH) -> Fraction:
    return 1 - Fraction(comb(n - m, k), comb(n, k))


def test_hit_rate_and_random_rate_match_the_hand_count(selection_ctx):
    """Top 2 = slices {2, 6} of every volume: v0 hits its nodule (2), v1 its effusion (2) and
    pneumothorax (6), v2's COVID lies on slice 5 of 8: missed."""
    result = volumes.run_selection(Encoder("uni", "UniMedI", Bright(k=2), None), selection_ctx)[DATASET]
    assert (result["k"], result["slices"], result["volumes"]) == (2, DEPTH, 3)
    assert result["hit_rate"] == pytest.approx(2 / 3)
    chance = [_chance(2), _chance(5), _chance(1)]  # finding slices of v0, v1 (union), v2 (resized)
    assert chance == [Fraction(13, 28), Fraction(25, 28), Fraction(7, 28)]
    assert result["random"] == pytest.approx(float(sum(chance) / 3))
    assert result["gain"] == pytest.approx(2 / 3 - float(sum(chance) / 3))
    # Selected slices on a finding: v0 1 of 2, v1 2 of 2, v2 0; random: 2, 5 and 1 of 8 slices.
    assert result["precision"] == pytest.approx(1.5 / 3) and result["random_precision"] == pytest.approx(8 / 24)
    # Per volume, the share less random's: 1/2 - 2/8, 1 - 5/8, 0 - 1/8.
    assert result["precision_gain"] == pytest.approx((0.25 + 0.375 - 0.125) / 3)
    lo, hi = result["ci"]["precision_gain"]
    assert lo <= result["precision_gain"] <= hi and result["replicates"]["precision_gain"].shape == (50,)
    # The position prior {2, 3} hits v0 and v1 as the model does: no gain over it.
    assert result["prior_slices"] == [2, 3] and result["prior"] == pytest.approx(2 / 3)
    assert result["prior_gain"] == pytest.approx(0.0)
    # Its slices on a finding: v0 2 of 2, v1 2 of 2, v2 0 (slice 5 of 8): against the model's 1/2,
    # 1 and 0 per volume.
    assert result["prior_precision"] == pytest.approx(2 / 3)
    assert result["prior_precision_gain"] == pytest.approx((0.5 - 1 + 0 + 0) / 3)
    assert result["most_selected"] == [[2, 1.0], [6, 1.0]]
    lo, hi = result["ci"]["hit_rate"]
    assert lo <= result["hit_rate"] <= hi and result["replicates"]["hit_rate"].shape == (50,)
    assert result["per_finding"] == {
        "covid": {"volumes": 1, "hit_rate": 0.0, "random": pytest.approx(7 / 28)},
        "nodule": {"volumes": 1, "hit_rate": 1.0, "random": pytest.approx(13 / 28)},
        "pleural_effusion": {"volumes": 1, "hit_rate": 1.0, "random": pytest.approx(22 / 28)},  # 4 of 8
        "pneumothorax": {"volumes": 1, "hit_rate": 1.0, "random": pytest.approx(7 / 28)},
    }


def test_selection_scores_the_split_it_is_given(selection_ctx):
    """benchmarks/learning_levers.py scores the selection on the validation volumes: the same
    volumes moved to "valid" score there as they did under "test"."""
    encoder = Encoder("uni", "UniMedI", Bright(k=2), None)
    splits = selection_ctx.data.splits
    splits["valid"] = [dataclasses.replace(r, split="valid") for r in splits.pop("test")]
    result = volumes.select(encoder, selection_ctx, DATASET, split="valid")
    assert (result["volumes"], result["hit_rate"]) == (3, pytest.approx(2 / 3))


def test_a_model_that_selects_the_wrong_slices_scores_lower(selection_ctx):
    best = volumes.run_selection(Encoder("uni", "UniMedI", Bright(k=2), None), selection_ctx)[DATASET]
    worst = volumes.run_selection(Encoder("bad", "Bad", Bright(k=2, sign=-1.0), None), selection_ctx)[DATASET]
    # The darkest slices come first by index among the ties: {0, 1} for v0 / v2, {0, 1} hits v1's effusion.
    assert worst["hit_rate"] == pytest.approx(1 / 3) and worst["hit_rate"] < best["hit_rate"]
    assert worst["random"] == best["random"] and worst["gain"] < 0 < best["gain"]
    assert worst["prior_gain"] == pytest.approx(-1 / 3)  # it misses v0, which the prior hits


class Chooser(torch.nn.Module):
    """A stub slab model: says which slices it feeds (`selected_slices`), the same for every volume;
    its `slice_attention` ties (what ranking it would get wrong)."""

    def __init__(self, chosen: list[int]) -> None:
        super().__init__()
        self.chosen = chosen

    def selected_slices(self, volumes: torch.Tensor) -> torch.Tensor:  # (N, D, 1, S, S) -> (N, k)
        return torch.tensor([self.chosen] * len(volumes))

    def slice_attention(self, volumes: torch.Tensor) -> torch.Tensor:
        return torch.zeros(volumes.shape[:2])


def test_a_model_that_names_its_selected_slices_is_scored_on_them(selection_ctx):
    result = volumes.run_selection(Encoder("slab", "Slab", Chooser([2, 6]), None), selection_ctx)[DATASET]
    assert result["k"] == 2 and result["hit_rate"] == pytest.approx(2 / 3)  # as the brightest {2, 6}
    assert result["random"] == pytest.approx(45 / 84)
    three = volumes.run_selection(Encoder("slab", "Slab", Chooser([0, 5, 7]), None), selection_ctx)[DATASET]
    assert three["k"] == 3 and three["hit_rate"] == pytest.approx(2 / 3)  # v1's effusion (0), v2's COVID (5)
    assert three["random"] == pytest.approx(float(sum(_chance(m, k=3) for m in (2, 5, 1)) / 3))
    with pytest.raises(ValueError, match=r"slab: selected_slices must return \(N, k\) integer slice "
                                         r"indices in \[0, 8\) .* from 2 to 8"):
        volumes.run_selection(Encoder("slab", "Slab", Chooser([2, 8]), None), selection_ctx)


def test_2d_encoders_are_skipped_with_the_reason_not_failed(selection_ctx, tiny_encoder):
    out = evaluate([tiny_encoder], selection_ctx, ("slice_selection",))
    result = out["encoders"]["tiny"]["tasks"]["slice_selection"]
    assert set(result) == {"skipped"} and "no attentive slice selection" in result["skipped"]


def test_a_model_that_says_its_depth_is_scored_at_that_depth(selection_ctx):
    """UniMedI reads volumes at its own depth (``volume_depth``): the task gives it stacks of that
    many slices and scores its picks there, whatever ``eval.volume.selection_slices`` says (the
    hand-made data accept stacks of DEPTH slices only)."""

    class Deep(Bright):
        volume_depth = DEPTH

    cfg = dataclasses.replace(selection_ctx.cfg, volume=dataclasses.replace(selection_ctx.cfg.volume,
                                                                            selection_slices=32))
    ctx = TaskContext(selection_ctx.data, cfg, selection_ctx.out_dir)
    result = volumes.run_selection(Encoder("uni", "UniMedI", Deep(k=2), None), ctx)[DATASET]
    assert (result["slices"], result["hit_rate"], result["prior_slices"]) == (DEPTH, pytest.approx(2 / 3), [2, 3])


def test_a_broken_selection_interface_is_one_clear_error(selection_ctx):
    with pytest.raises(ValueError, match="uni: .*selection_k is 0"):
        volumes.run_selection(Encoder("uni", "UniMedI", Bright(k=0), None), selection_ctx)

    class Flat(Bright):
        def slice_attention(self, volumes: torch.Tensor) -> torch.Tensor:
            return volumes.mean(dim=(1, 2, 3, 4))  # (N,): one score per volume, not per slice

    with pytest.raises(ValueError, match=r"flat: slice_attention returned shape \(3,\) .*expected \(N, D\)"):
        volumes.run_selection(Encoder("flat", "Flat", Flat(k=2), None), selection_ctx)
    truth = Path(selection_ctx.data.cfg.root) / DATASET / volumes.GROUND_TRUTH_FILE
    truth.write_text("key,finding,slices\nv0.nii.gz,nodule,8\n")
    with pytest.raises(ValueError, match="v0.nii.gz puts nodule on slice 8, but the volume has 8 slices"):
        volumes.run_selection(Encoder("uni", "UniMedI", Bright(k=2), None), selection_ctx)
    truth.unlink()
    with pytest.raises(ValueError, match="slice_selection needs the slice ground truth .*phantom_findings.csv"):
        volumes.run_selection(Encoder("uni", "UniMedI", Bright(k=2), None), selection_ctx)


@pytest.mark.parametrize(("depth", "slices"), [(8, 8), (16, 8), (32, 8), (12, 5), (6, 9)])
def test_resized_ground_truth_is_where_the_resize_puts_the_finding(depth, slices):
    """A finding on one stored slice is held by the resized slices that show it (above the window
    floor) when downsampling, one or two, for the resize the volume tasks use (which averages);
    when upsampling, by slices that each show it, the one that shows it most among them."""
    for z in range(depth):
        array = np.full((4, 4, depth), -1000.0, dtype=np.float32)
        array[:, :, z] = 400.0
        resized = axial_slices(Volume(array, np.eye(4), Path("v.nii")), size=4, slices=slices)  # (slices, 4, 4)
        response = resized.amax(dim=(1, 2))
        held = volumes.resampled_slices({z}, depth, slices)
        assert held and max(held) - min(held) + 1 == len(held) <= max(2, -(-slices // depth) + 1)
        assert all(response[j] > 0 for j in held) and int(response.argmax()) in held
        if depth >= slices:
            assert held == set(torch.nonzero(response > 0).flatten().tolist())
    assert volumes.resampled_slices({3, 5}, 8, 8) == {3, 5}
    assert volumes.resampled_slices({0, 3, 4, 7}, 32, 8) == {0, 1}


def test_config_keys_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"eval\.volume\.selection_slices must be >= 1, got 0"):
        load_config(None, ["eval.volume.selection_slices=0"], cls=Config)
    cfg = load_config(None, ["eval.volume.selection_datasets=[bimcv-covid19,luna16]",
                             "eval.tasks=[slice_selection,modality_gap]"], cls=Config)
    assert cfg.eval.volume.selection_datasets == ("bimcv-covid19", "luna16")
    assert Config().eval.volume.selection_datasets == Config().eval.volume.localisation_datasets


def _metrics() -> dict:
    row = {"k": 4, "slices": 32, "volumes": 12, "random": 0.4, "hit_rate": 0.75, "gain": 0.35,
           "precision": 0.5, "random_precision": 0.2, "precision_gain": 0.3, "prior": 0.7, "prior_gain": 0.05,
           "prior_precision": 0.625, "prior_precision_gain": -0.125,
           "ci": {"hit_rate": [0.5, 0.9], "gain": [0.1, 0.55], "precision": [0.3, 0.7], "prior_gain": [-0.1, 0.2],
                  "precision_gain": [0.12, 0.45], "prior_precision_gain": [-0.3, 0.05]},
           "per_finding": {"nodule": {"volumes": 3, "hit_rate": 2 / 3, "random": 0.25}}}
    return {"encoders": {
        "unimedi": {"label": "UniMedI", "tasks": {"slice_selection": {DATASET: row}}},
        "medunic": {"label": "Med-UniC", "tasks": {"slice_selection": {"skipped": "Med-UniC has none"}}},
    }}


def test_the_report_has_one_row_per_encoder_with_selection_and_names_the_others():
    tables = {title: (header, rows) for title, header, rows in format_tables(_metrics())}
    header, rows = tables[report.TITLE_SELECTION]
    group = "BIMCV-COVID19+ (32 slices) / "
    assert header == ["Method", group + "k", group + "attentive", group + "random", group + "gain (points)",
                      group + "position prior", group + "gain over prior (points)",
                      group + "slices on a finding: attentive", group + "slices on a finding: random",
                      group + "slices on a finding: gain (points)",
                      group + "slices on a finding: position prior",
                      group + "slices on a finding: gain over prior (points)",
                      group + "nodule (attentive / random)"]
    assert rows == [["UniMedI", "4", "75.0 (50.0–90.0)", "40.0", "35.0 (10.0–55.0)", "70.0", "5.0 (-10.0–20.0)",
                     "50.0 (30.0–70.0)", "20.0", "30.0 (12.0–45.0)", "62.5", "-12.5 (-30.0–5.0)",
                     "66.7 / 25.0"]]
    note = table_notes(_metrics())[report.TITLE_SELECTION]
    assert note.startswith("Test volumes with a finding: BIMCV-COVID19+ 12. Position prior: ")
    assert note.endswith(". Not applicable (no attentive slice selection): Med-UniC")
    assert "Fig. 5" not in [row[0] for row in tables[report.TITLE_VOLUME_NOT_RUN][1]]
    two_d = {"encoders": {"medunic": _metrics()["encoders"]["medunic"]}}
    tables = {title: rows for title, _, rows in format_tables(two_d)}
    assert report.TITLE_SELECTION not in tables
    fig5 = next(row for row in tables[report.TITLE_VOLUME_NOT_RUN] if row[0] == "Fig. 5")
    assert fig5[3] == "ran, not applicable to any encoder here (Med-UniC has none)"


@pytest.mark.parametrize("gain_ci, status", [((0.05, 0.2), "pass"), ((-0.5, -0.2), "fail"),
                                             ((-0.1, 0.1), "tie")])
def test_the_quality_bar_reads_the_gain_over_random_slices(gain_ci, status):
    result = {"k": 2, "slices": 32, "volumes": 31, "hit_rate": 0.45, "random": 0.80, "prior": 0.94,
              "prior_slices": [15, 16], "precision": 0.371, "random_precision": 0.591,
              "most_selected": [[3, 0.9], [7, 0.85]],
              "ci": {"hit_rate": [0.29, 0.61], "gain": list(gain_ci)}}

    def checks(result: dict):
        metrics = {"method": "unimedi", "encoders": {
            "unimedi": {"label": "UniMedI", "tasks": {"slice_selection": {"bimcv-covid19": result}}},
            "init": {"label": "init", "tasks": {}}}}
        return [c for c in quality_checks(metrics) if c.name.startswith("Slice selection")]

    def check(result: dict):
        [found] = checks(result)  # metrics without a precision gain: the hit-rate check alone
        return found

    found = check(result)
    assert (found.name, found.status) == ("Slice selection BIMCV-COVID19+: attentive beats random slices",
                                          status)
    assert "vs random 80.0%" in found.detail and "position prior 94.0%" in found.detail
    # A check that does not pass says where the selection looks, how often its slices hold a
    # finding against random ones, and that the position prior, which never looks at the volume,
    # does at least as well here.
    facts = ("(it picks slice 3 in 90.0% and 7 in 85.0% of the volumes (of 32); 37.1% of its slices "
             "hold a finding against 59.1% of random ones)")
    prior = "most frequent finding slices (15, 16) hit 94.0% without looking at the volume"
    assert (facts in found.cause) == (prior in found.cause) == (status != "pass")
    assert ("within noise of random slices, below them (" in found.cause) == (status == "tie")
    # A failing selection names the script that tells how flat its attention is and what it follows.
    assert found.cause.endswith("pre-train longer (benchmarks/slice_attention.py: how flat the attention "
                                "is, and whether it follows the volume or the input position)") == (
        status == "fail")
    # Above random and above the prior: neither clause.
    above = check({**result, "hit_rate": 0.96, "prior": 0.9, "precision": None})
    assert "without looking" not in above.cause and "below them" not in above.cause
    if status == "tie":
        assert above.cause == ("within noise of random slices (it picks slice 3 in 90.0% and 7 in 85.0% "
                               "of the volumes (of 32)); more test volumes or more pre-training")
    # Where the task measured it, a second check reads the share of the selected slices on a
    # finding against random slices' share, with its own interval.
    hits, shares = checks({**result, "ci": {**result["ci"], "precision_gain": list(gain_ci)}})
    assert (hits.status, hits.cause) == (found.status, found.cause)
    assert (shares.name, shares.status) == (
        "Slice selection BIMCV-COVID19+: attentive slices hold findings more often than random ones",
        status)
    assert shares.detail.startswith("37.1% of the selected slices on a finding vs 59.1% of random ones; "
                                    "difference 95% CI [")
    assert ("it picks slice 3 in 90.0% and 7 in 85.0%" in shares.cause) == (status != "pass")
    assert shares.cause.endswith("input position)") == (status == "fail")
    # Where the task measured the prior's share too, a third check reads the gain over it.
    with_prior = {**result, "prior_precision": 0.93,
                  "ci": {**result["ci"], "precision_gain": [0.1, 0.3], "prior_precision_gain": list(gain_ci)}}
    hits, shares, prior = checks(with_prior)
    assert shares.status == "pass"
    assert (prior.name, prior.status) == (
        "Slice selection BIMCV-COVID19+: attentive slices hold findings more often than the position prior's",
        status)
    assert prior.detail.startswith("37.1% of the selected slices on a finding vs 93.0% of the training "
                                   "volumes' most frequent finding slices (15, 16); difference 95% CI [")
    assert prior.cause == {
        "pass": "",
        "fail": "the attention picks slices that hold findings less often than where findings usually lie "
                "(it picks slice 3 in 90.0% and 7 in 85.0% of the volumes (of 32)); pre-train longer "
                "(benchmarks/slice_attention.py: how flat the attention is, and whether it follows the "
                "volume or the input position)",
        "tie": "within noise of the position prior (it picks slice 3 in 90.0% and 7 in 85.0% of the volumes "
               "(of 32)): the selection adds nothing measurable to where findings usually lie; more test "
               "volumes or more pre-training"}[status]
    skipped = {"method": "medunic", "encoders": {"medunic": {"tasks": {"slice_selection": {
        "skipped": "no attentive slice selection"}}}}}
    assert not [c for c in quality_checks(skipped) if c.name.startswith("Slice selection")]
