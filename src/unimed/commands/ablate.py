"""`unimed ablate`: the ablation rows of the method's paper — Med-UniC Table 4 (which objectives and
whether MLM came first), PRIOR's stages (alignment, + sentence prototype bank, + cross-modality
reconstruction), UniMedI Table 7 (image-report alignment with random slices, + self-distillation,
+ attentive slice selection and masking).

Each row pre-trains its own model per seed under `<run>/ablation/<row>/seed<k>` (same data and
schedule; `--seeds`, default 3) and is evaluated on the ablation tasks; the full row at the run's own
seed is the main run's checkpoint when one exists. Every metric is reported as the mean and standard
deviation over seeds, and each ordering the paper claims (:data:`ABLATIONS`) is tested on the seed
means: it holds when the Welch 95 % interval of the difference lies above zero, is reversed when it
lies below, and is a tie otherwise. Rows
resume from their newest checkpoint, so an interrupted ablation continues where it stopped and a
finished row is only evaluated again; a row trained with another config is refused, never reused.
The table is printed, saved as `ablation.json` and added to the run's metrics.json and report.html
(a later `unimed evaluate` rewrites those two without it: run `unimed ablate` again, which then only
re-evaluates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from unimed.commands import command, holding
from unimed.commands.evaluate import (
    EVAL_DIR,
    METRICS_FILE,
    check_datasets_present,
    print_summary,
    read_replicates,
    run_evaluation,
    write_outputs,
)
from unimed.commands.train import resolve_encoder, run_pretrain, trained_data
from unimed.config import CONFIG_FILE, Config, to_dict
from unimed.errors import ConfigError
from unimed.eval.report import read_metrics
from unimed.train.checkpoint import latest_checkpoint, training_progress
from unimed.train.loop import CHECKPOINT_DIR

log = logging.getLogger(__name__)

ABLATION_FILE = "ablation.json"
ABLATION_TASKS = ("zero_shot", "linear_probe", "segmentation")


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One ablation row: its name, the switches the table shows (in column order), and how it
    makes its method section from the run's (`mlm` False: the text encoder skips MLM)."""

    name: str
    switches: tuple[tuple[str, bool], ...]
    configure: Callable[[Any], Any]

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" + ", "_").replace(" ", "_")

    @property
    def mlm(self) -> bool:
        return dict(self.switches).get("mlm", True)

    @property
    def full(self) -> bool:
        """Every switch on: the method as the run configures it."""
        return all(on for _, on in self.switches)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A method's ablation: the paper table it reproduces, its rows, and the orderings (better,
    worse) the paper claims."""

    table: str
    rows: tuple[AblationRow, ...]
    orderings: tuple[tuple[str, str], ...]
    tasks: tuple[str, ...] = ABLATION_TASKS


def _medunic_row(name: str, ssv: bool, cvl: bool, ctr: bool, mlm: bool) -> AblationRow:
    def configure(method: Any) -> Any:
        weights = method.loss
        loss = dataclasses.replace(
            weights,
            ssv_weight=weights.ssv_weight if ssv else 0.0,
            cvl_weight=weights.cvl_weight if cvl else 0.0,
            ctr_weight=weights.ctr_weight if ctr else 0.0,
        )
        return dataclasses.replace(method, loss=loss)

    return AblationRow(name, (("ssv", ssv), ("cvl", cvl), ("ctr", ctr), ("mlm", mlm)), configure)


def _prior_row(name: str, spb: bool, ccr: bool) -> AblationRow:
    def configure(method: Any) -> Any:
        align, prototypes, reconstruction = method.stage_epochs
        if not (prototypes and reconstruction):
            raise ConfigError(
                f"PRIOR's ablation trains its stages 2 and 3, but method.stage_epochs is "
                f"{list(method.stage_epochs)}; give every stage epochs, e.g. 'method.stage_epochs=[3,1,1]'")
        stages = (align, prototypes if spb else 0, reconstruction if ccr else 0)
        return dataclasses.replace(method, stage_epochs=stages)

    return AblationRow(name, (("spb", spb), ("ccr", ccr)), configure)


def _unimedi_row(name: str, sd: bool, attn: bool) -> AblationRow:
    def configure(method: Any) -> Any:
        changes: dict[str, Any] = {}
        if not sd:
            changes.update(icl_weight=0.0, pcl_weight=0.0)
        if not attn:
            changes.update(selection="random", masking="random")
        return dataclasses.replace(method, **changes)

    return AblationRow(name, (("sd", sd), ("attn", attn)), configure)


ABLATIONS = {
    "medunic": Ablation(
        "Med-UniC Table 4",
        (
            _medunic_row("CVL + MLM", ssv=False, cvl=True, ctr=False, mlm=True),
            _medunic_row("SSV + CVL + MLM", ssv=True, cvl=True, ctr=False, mlm=True),
            _medunic_row("SSV + CVL + CTR", ssv=True, cvl=True, ctr=True, mlm=False),
            _medunic_row("SSV + CVL + CTR + MLM", ssv=True, cvl=True, ctr=True, mlm=True),
        ),
        (
            ("SSV + CVL + MLM", "CVL + MLM"),
            ("SSV + CVL + CTR + MLM", "SSV + CVL + MLM"),
            ("SSV + CVL + CTR + MLM", "SSV + CVL + CTR"),
        ),
    ),
    "prior": Ablation(
        "PRIOR ablation of the training stages",
        (
            _prior_row("Stage 1", spb=False, ccr=False),
            _prior_row("Stage 1 + SPB", spb=True, ccr=False),
            _prior_row("Stage 1 + SPB + CCR", spb=True, ccr=True),
        ),
        (("Stage 1 + SPB", "Stage 1"), ("Stage 1 + SPB + CCR", "Stage 1 + SPB")),
    ),
    "unimedi": Ablation(
        "UniMedI Table 7",
        (
            _unimedi_row("VL", sd=False, attn=False),
            _unimedi_row("VL + SD", sd=True, attn=False),
            _unimedi_row("VL + SD + Attn", sd=True, attn=True),
        ),
        (("VL + SD", "VL"), ("VL + SD + Attn", "VL + SD")),
        (*ABLATION_TASKS, "volume_probe", "slice_selection", "modality_gap"),
    ),
}
# Leaves of a row's metrics that the orderings are judged on (the paper tables' columns).
HEADLINE = (("zero_shot", "f1"), ("linear_probe", "value"), ("segmentation", "value"),
            ("volume_probe", "value"))


def method_ablation(cfg: Config) -> Ablation:
    """The ablation of `cfg`'s method; a method without one is a ConfigError."""
    if cfg.method.name not in ABLATIONS:
        raise ConfigError(f"unimed ablate has no ablation rows for method '{cfg.method.name}'; "
                          f"it has them for {', '.join(ABLATIONS)}")
    return ABLATIONS[cfg.method.name]


def row_config(cfg: Config, row: AblationRow, seed: int | None = None) -> Config:
    """The run config of `row`: its method section, text encoder with or without MLM."""
    method = row.configure(cfg.method)
    text = method.text
    if not row.mlm:
        if cfg.vocab.base_model is None:
            raise ConfigError("the row without MLM starts from vocab.base_model, which is not set")
        text = dataclasses.replace(text, encoder=resolve_encoder(cfg.vocab.base_model),
                                   tokenizer=str(cfg.run.dir / "vocab"))
    elif text.encoder is None:
        text = dataclasses.replace(text, encoder=str(cfg.run.dir / "mlm"))
    seed = cfg.run.seed if seed is None else seed
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}/ablation/{row.slug}/seed{seed}", seed=seed)
    return dataclasses.replace(cfg, run=run, method=dataclasses.replace(method, text=text))


def _check_same_config(row_cfg: Config, row: AblationRow) -> None:
    """A row resumes only a run made with the same config (else its checkpoint would be stale)."""
    saved = row_cfg.run.dir / "pretrain" / CONFIG_FILE
    if saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) != to_dict(row_cfg):
        raise ConfigError(
            f"ablation row '{row.name}' was pre-trained with another config ({saved}); "
            f"delete {row_cfg.run.dir} to train it again"
        )


def _training_sections(config: dict) -> tuple:
    """The method (text encoder paths aside), data (:func:`trained_data`) and train sections of a
    config dict."""
    method = dict(config.get("method") or {})
    method["text"] = {k: v for k, v in (method.get("text") or {}).items()
                      if k not in ("encoder", "tokenizer")}
    return method, trained_data(config), config.get("train")


def trained_as(run_dir: Path, row_cfg: Config) -> bool:
    """Whether the pre-training under `run_dir` used `row_cfg`'s method, data and train settings."""
    saved = run_dir / "pretrain" / CONFIG_FILE
    return saved.is_file() and _training_sections(
        yaml.safe_load(saved.read_text(encoding="utf-8"))) == _training_sections(to_dict(row_cfg))


def main_run_differs(run_dir: Path, row_cfg: Config) -> str | None:
    """Why the main run's pre-training under `run_dir` cannot stand for the row `row_cfg` trains
    (other settings, or its training not finished); None when it can."""
    if not trained_as(run_dir, row_cfg):
        return "was trained with other method, data or train settings"
    newest = latest_checkpoint(run_dir / "pretrain" / CHECKPOINT_DIR)
    if newest is None:
        return "holds no checkpoint"
    step, last = training_progress(newest)
    if last is not None and step < last:
        return f"stopped at step {step} of {last} ({newest.name})"
    return None


def run_row(cfg: Config, row: AblationRow, seed: int, *, progress: bool) -> dict:
    """Pre-train (unless the main run is this row and seed, trained to its end with the same
    settings) and evaluate one row; its metrics."""
    row_cfg = row_config(cfg, row, seed)
    checkpoint = cfg.run.dir / "pretrain" / CHECKPOINT_DIR
    main_run = row.full and seed == cfg.run.seed and checkpoint.is_dir()
    differs = main_run_differs(cfg.run.dir, row_cfg) if main_run else None
    if main_run and differs is None:
        log.info("ablation row '%s' is the main run: evaluating %s", row.name, checkpoint)
    else:
        if main_run:
            log.warning("ablation row '%s': the main run in %s %s; training the row", row.name,
                        cfg.run.dir, differs)
        _check_same_config(row_cfg, row)
        run_pretrain(row_cfg, resume=True, progress=progress)
        checkpoint = row_cfg.run.dir / "pretrain" / CHECKPOINT_DIR
    metrics = run_evaluation(row_cfg, checkpoint, method_ablation(cfg).tasks, progress=progress,
                             baselines=())
    return metrics["encoders"][cfg.method.name]["tasks"]


def aggregate(runs: Sequence[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation over seeds of every numeric leaf the runs share
    (structure of one run's metrics; intervals of single runs are dropped)."""
    first = runs[0]
    if isinstance(first, dict):
        mean, sd = {}, {}
        for key in first:
            if key == "ci" or not all(isinstance(r, dict) and key in r for r in runs):
                continue
            m, d = aggregate([r[key] for r in runs])
            if m is not None:
                mean[key], sd[key] = m, d
        return (mean, sd) if mean else (None, None)
    values = [r for r in runs if isinstance(r, int | float) and not isinstance(r, bool)]
    if len(values) != len(runs) or not all(math.isfinite(v) for v in values):
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def leaves(tree: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """Every numeric leaf of a metrics tree by its path."""
    if isinstance(tree, dict):
        return {p: v for key, sub in tree.items() for p, v in leaves(sub, (*path, key)).items()}
    return {path: float(tree)} if isinstance(tree, int | float) and not isinstance(tree, bool) else {}


def welch_interval(better: Sequence[float], worse: Sequence[float]) -> tuple[float, float, float]:
    """Difference of means and its Welch 95 % interval (scipy's unequal-variance t-test). A group
    whose seeds agree to float rounding (the same number summed in another order) counts as
    having no spread; without spread in either group the interval is the difference itself."""
    a, b = (np.asarray(g, float) for g in (better, worse))
    a, b = (np.full_like(g, g.mean()) if np.allclose(g, g[0], rtol=1e-12, atol=0.0) else g for g in (a, b))
    diff = float(a.mean() - b.mean())
    if a.var() == 0.0 and b.var() == 0.0:
        return diff, diff, diff
    with warnings.catch_warnings():  # scipy warns of precision loss on any group without spread
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return diff, float(interval.low), float(interval.high)


def orderings(rows: Sequence[dict], claims: Sequence[tuple[str, str]]) -> list[dict]:
    """Each claimed ordering (better, worse) on each headline metric: difference of seed means,
    Welch interval, verdict ("holds", "reversed", "tie"); needs two seeds or more per row."""
    by_name = {row["name"]: row for row in rows}
    out = []
    for better, worse in claims:
        if better not in by_name or worse not in by_name:
            continue
        runs = [[leaves(m) for m in by_name[name]["seeds"].values()] for name in (better, worse)]
        if min(len(r) for r in runs) < 2:
            continue
        for path in sorted(set(runs[0][0]) & set(runs[1][0])):
            if (path[0], path[-1]) not in HEADLINE or "per_class" in path:
                continue
            diff, lo, hi = welch_interval([r[path] for r in runs[0]], [r[path] for r in runs[1]])
            verdict = "holds" if lo > 0 else "reversed" if hi < 0 else "tie"
            out.append({"better": better, "worse": worse, "metric": "/".join(path),
                        "difference": diff, "ci": [lo, hi], "verdict": verdict})
    return out


def _run_metrics(cfg: Config) -> dict:
    """The run's evaluation (its metrics.json, with the bootstrap replicates its report reads), into
    which the ablation's table goes; a ConfigError naming a file that cannot be read."""
    path = cfg.run.dir / METRICS_FILE
    if not path.is_file():
        return {"run": cfg.run.name, "encoders": {}}
    read_replicates(cfg.run.dir)
    try:
        return read_metrics(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: the ablation writes its table into the run's metrics; evaluate the run "
                          "again, or move the file away") from None


def _seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")


@command("ablate", "the method's paper ablation (Med-UniC Table 4 objectives / MLM, PRIOR's "
                   "stages): pre-train and evaluate each row over seeds", _seeds)
def ablate(cfg: Config, args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    with holding(cfg.run.dir, "ablation"):
        table = method_ablation(cfg)
        for row in table.rows:  # a row the config cannot make fails before anything trains
            row_config(cfg, row)
        for task in table.tasks:  # its rows are scored on these tasks, whatever eval.tasks says
            empty = cfg.eval.empty_setting(task)
            if empty is not None:
                raise ConfigError(f"unimed ablate scores every row on {task}, but {empty} names no "
                                  "dataset: name one")
        check_datasets_present(cfg, table.tasks)  # as does a dataset the evaluations would miss
        _run_metrics(cfg)  # the table joins them: a damaged file stops here, not after the training
        seeds = [cfg.run.seed + k for k in range(args.seeds)]
        rows = []
        for row in table.rows:
            runs = {str(seed): run_row(cfg, row, seed, progress=args.progress) for seed in seeds}
            mean, sd = aggregate(list(runs.values()))
            rows.append({"name": row.name, "objectives": dict(row.switches), "metrics": mean, "sd": sd,
                         "seeds": runs})
        ablation = {"table": table.table, "rows": rows, "seeds": seeds,
                    "orderings": orderings(rows, table.orderings)}
        cfg.run.dir.mkdir(parents=True, exist_ok=True)
        (cfg.run.dir / ABLATION_FILE).write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
        metrics = {**_run_metrics(cfg), "ablation": ablation}
        write_outputs(metrics, cfg.run.dir, cfg.run.dir / EVAL_DIR)
        print_summary({"ablation": ablation}, cfg.run.dir, with_checks=False)
        if len(seeds) < 2:
            print("NOTE: one seed per row, so no ordering of the paper is judged (each needs a Welch "
                  "interval over 2 seeds or more: --seeds 2)")
        return 0
