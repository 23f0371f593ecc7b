"""Seed aggregation and the ordering verdicts of `unimed ablate`."""

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from unimed.commands.ablate import (
    ABLATIONS,
    aggregate,
    main_run_differs,
    method_ablation,
    orderings,
    row_config,
    trained_as,
    welch_interval,
)
from unimed.config import load_config, save_config
from unimed.errors import ConfigError
from unimed.train.checkpoint import save_checkpoint
from unimed.train.loop import CHECKPOINT_DIR


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


def test_welch_interval_of_groups_without_spread_is_the_difference() -> None:
    assert welch_interval([0.3, 0.3], [0.2, 0.2]) == pytest.approx((0.1, 0.1, 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision-loss warning on nearly equal values
        diff, lo, hi = welch_interval([0.1 + 0.2, 0.3, 0.3], [0.2, 0.2, 0.2])
        assert lo == diff == hi == pytest.approx(0.1)
        spread = [0.1, 0.2, 0.4]
        diff, lo, hi = welch_interval([0.5, 0.5, 0.5 + 1e-17], spread)
    half = stats.t.ppf(0.975, len(spread) - 1) * np.std(spread, ddof=1) / np.sqrt(len(spread))
    assert (diff, lo, hi) == pytest.approx((0.5 - np.mean(spread), diff - half, diff + half))


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
    (result,) = orderings(rows, ABLATIONS["medunic"].orderings)
    assert result["metric"] == "zero_shot/pdc/en/f1" and result["verdict"] == verdict


def test_one_seed_gives_no_ordering() -> None:
    assert orderings([_row("SSV + CVL + MLM", [0.8]), _row("CVL + MLM", [0.6])],
                     ABLATIONS["medunic"].orderings) == []


def _config(*overrides: str):
    return load_config(None, ["vocab.base_model=english-bert", *overrides])


def test_medunic_rows_switch_loss_weights_and_mlm() -> None:
    cfg = _config("method.loss.ssv_weight=2.0")
    rows = {row.name: row_config(cfg, row) for row in ABLATIONS["medunic"].rows}
    loss = rows["CVL + MLM"].method.loss
    assert (loss.ssv_weight, loss.cvl_weight, loss.ctr_weight) == (0.0, 1.0, 0.0)
    assert rows["SSV + CVL + MLM"].method.loss.ssv_weight == 2.0
    assert rows["SSV + CVL + CTR + MLM"].method.text.encoder == str(cfg.run.dir / "mlm")
    assert rows["SSV + CVL + CTR"].method.text.tokenizer == str(cfg.run.dir / "vocab")
    assert [row.full for row in ABLATIONS["medunic"].rows] == [False, False, False, True]


def test_prior_rows_add_its_stages_one_at_a_time() -> None:
    cfg = _config("method.name=prior", "method.stage_epochs=[4,2,3]")
    stages = [row_config(cfg, row, seed=7) for row in ABLATIONS["prior"].rows]
    assert [s.method.stage_epochs for s in stages] == [(4, 0, 0), (4, 2, 0), (4, 2, 3)]
    assert stages[1].run.name == f"{cfg.run.name}/ablation/stage_1_spb/seed7"
    assert [row.full for row in ABLATIONS["prior"].rows] == [False, False, True]
    no_stage_3 = _config("method.name=prior", "method.stage_epochs=[4,2,0]")
    with pytest.raises(ConfigError, match=r"method.stage_epochs is \[4, 2, 0\]"):
        row_config(no_stage_3, ABLATIONS["prior"].rows[0])


def test_a_method_without_ablation_rows_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delitem(ABLATIONS, "prior")
    with pytest.raises(ConfigError, match="no ablation rows for method 'prior'"):
        method_ablation(_config("method.name=prior"))


def test_the_main_run_stands_for_the_full_row_only_when_trained_with_its_settings(tmp_path) -> None:
    cfg = _config("method.name=prior", "method.stage_epochs=[4,2,3]", f"run.output_dir={tmp_path}")
    full = row_config(cfg, ABLATIONS["prior"].rows[-1])
    save_config(cfg, cfg.run.dir / "pretrain")
    assert trained_as(cfg.run.dir, full)
    for other in ("method.stage_epochs=[4,0,0]", "data.image_size=48", "data.pretrain_datasets=[mimic-cxr]"):
        save_config(_config("method.name=prior", "method.stage_epochs=[4,2,3]", f"run.output_dir={tmp_path}",
                            other), cfg.run.dir / "pretrain")
        assert not trained_as(cfg.run.dir, full), other  # data: the rows were compared on other data
    # Where its files are kept and how it shows progress do not change what a run trains.
    save_config(_config("method.name=prior", "method.stage_epochs=[4,2,3]", f"run.output_dir={tmp_path}",
                        "data.num_workers=3", "data.progress=false", f"data.split_dir={tmp_path}"),
                cfg.run.dir / "pretrain")
    assert trained_as(cfg.run.dir, full)


def test_a_main_run_stopped_before_its_end_does_not_stand_for_the_full_row(tmp_path) -> None:
    """It was evaluated as the full row (the newest checkpoint of a run stopped at step 5 of 16)."""
    cfg = _config("method.name=prior", "method.stage_epochs=[4,2,3]", f"run.output_dir={tmp_path}")
    full = row_config(cfg, ABLATIONS["prior"].rows[-1])
    save_config(cfg, cfg.run.dir / "pretrain")
    checkpoints = cfg.run.dir / "pretrain" / CHECKPOINT_DIR
    assert main_run_differs(cfg.run.dir, full) == "holds no checkpoint"
    save_checkpoint(checkpoints, 5, torch.nn.Linear(2, 2), {"step": 5, "last_step": 16})
    assert main_run_differs(cfg.run.dir, full) == "stopped at step 5 of 16 (step_00000005)"
    save_checkpoint(checkpoints, 16, torch.nn.Linear(2, 2), {"step": 16, "last_step": 16})
    assert main_run_differs(cfg.run.dir, full) is None


def test_ablate_refuses_a_row_or_a_task_it_cannot_run_before_any_row_trains(tmp_path, monkeypatch,
                                                                              capsys) -> None:
    """The row without MLM needs vocab.base_model: that was found after two rows had pre-trained
    and been evaluated. A task of the table whose datasets are empty ran as an empty result
    ({"zero_shot": {}}) in every row."""
    from unimed.cli import main

    trained = []
    monkeypatch.setattr("unimed.commands.ablate.run_row", lambda *args, **kwargs: trained.append(args))
    base = ["ablate", "configs/demo.yaml", f"run.output_dir={tmp_path}", "--seeds", "1", "--quiet"]
    assert main([*base, "vocab.base_model=null"]) == 2
    assert capsys.readouterr().err.strip() == ("unimed: config error: the row without MLM starts from "
                                               "vocab.base_model, which is not set")
    assert main([*base, "eval.zero_shot.datasets=[]", "eval.tasks=[retrieval]"]) == 2
    assert capsys.readouterr().err.strip() == ("unimed: config error: unimed ablate scores every row on "
                                               "zero_shot, but eval.zero_shot.datasets names no dataset: "
                                               "name one")
    assert trained == []


@pytest.mark.parametrize(("name", "content", "message"), [
    ("metrics.json", b'{"encoders": {', "cannot be read (Expecting"),
    ("metrics.json", b"[1, 2]", "holds a JSON list, not an evaluation's metrics (an object)"),
    ("bootstrap.npz", b"PK\x03\x04 cut", "cannot be read ("),
])
def test_a_damaged_evaluation_of_the_run_stops_ablate_before_any_row_trains(tmp_path, monkeypatch, capsys,
                                                                          name, content, message) -> None:
    """The ablation writes its table into the run's metrics.json and report: a damaged file there
    was a traceback after every row had trained."""
    from unimed.cli import main

    trained = []
    monkeypatch.setattr("unimed.commands.ablate.check_datasets_present", lambda *args: None)  # no data here
    monkeypatch.setattr("unimed.commands.ablate.run_row", lambda *args, **kwargs: trained.append(args))
    run = tmp_path / "demo"
    run.mkdir()
    (run / "metrics.json").write_text('{"encoders": {}}')
    (run / name).write_bytes(content)
    assert main(["ablate", "configs/demo.yaml", f"run.output_dir={tmp_path}", "--seeds", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"unimed: config error: {run / name} {message}"), err
    assert trained == []


@pytest.mark.parametrize("seeds", [1, 2])
def test_ablate_with_one_seed_says_that_no_ordering_is_judged(tmp_path, monkeypatch, capsys, seeds) -> None:
    """With --seeds 1 the orderings were left out without a word (the table still read "mean over
    seeds")."""
    from unimed.cli import main

    scores = iter(range(100))
    monkeypatch.setattr("unimed.commands.ablate.check_datasets_present", lambda *args: None)  # no data here
    monkeypatch.setattr("unimed.commands.ablate.run_row", lambda *args, **kwargs: {
        "zero_shot": {"cxp500": {"en": {"auc": 0.5 + next(scores) / 1000}}}})
    argv = ["ablate", "configs/demo.yaml", f"run.output_dir={tmp_path}", "--seeds", str(seeds), "--quiet"]
    assert main(argv) == 0
    note = ("NOTE: one seed per row, so no ordering of the paper is judged (each needs a Welch interval "
            "over 2 seeds or more: --seeds 2)")
    assert (note in capsys.readouterr().out) == (seeds == 1)
