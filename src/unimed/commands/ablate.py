"""`unimed ablate`: the rows of Med-UniC Table 4 — which objectives and whether MLM came first.

Each row pre-trains its own model under `<run>/ablation/<row>` (same data, seed and schedule) and is
evaluated on the Table 4 tasks; the full row is the main run's checkpoint when one exists. Rows
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

import yaml

from unimed.commands import command
from unimed.commands.evaluate import (
    EVAL_DIR,
    METRICS_FILE,
    print_summary,
    run_evaluation,
    write_outputs,
)
from unimed.commands.medunic import resolve_encoder, run_pretrain
from unimed.config import CONFIG_FILE, Config, ConfigError, to_dict

log = logging.getLogger(__name__)

ABLATION_FILE = "ablation.json"
ABLATION_TASKS = ("zero_shot", "linear_probe", "segmentation")


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One row of Table 4: which objectives are on and whether the text encoder went through MLM."""

    name: str
    ssv: bool
    cvl: bool
    ctr: bool
    mlm: bool

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" + ", "_").replace(" ", "_")


ROWS = (
    AblationRow("CVL + MLM", ssv=False, cvl=True, ctr=False, mlm=True),
    AblationRow("SSV + CVL + MLM", ssv=True, cvl=True, ctr=False, mlm=True),
    AblationRow("SSV + CVL + CTR", ssv=True, cvl=True, ctr=True, mlm=False),
    AblationRow("SSV + CVL + CTR + MLM", ssv=True, cvl=True, ctr=True, mlm=True),
)


def row_config(cfg: Config, row: AblationRow) -> Config:
    """The run config of `row`: loss weights switched, text encoder with or without MLM."""
    model = dataclasses.replace(
        cfg.model,
        ssv_weight=cfg.model.ssv_weight if row.ssv else 0.0,
        cvl_weight=cfg.model.cvl_weight if row.cvl else 0.0,
        ctr_weight=cfg.model.ctr_weight if row.ctr else 0.0,
    )
    if not row.mlm:
        if cfg.vocab.base_model is None:
            raise ConfigError("the row without MLM starts from vocab.base_model, which is not set")
        model = dataclasses.replace(model, text_encoder=resolve_encoder(cfg.vocab.base_model),
                                    tokenizer=str(cfg.run.dir / "vocab"))
    elif model.text_encoder is None:
        model = dataclasses.replace(model, text_encoder=str(cfg.run.dir / "mlm"))
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}/ablation/{row.slug}")
    return dataclasses.replace(cfg, run=run, model=model)


def _check_same_config(row_cfg: Config, row: AblationRow) -> None:
    """A row resumes only a run made with the same config (else its checkpoint would be stale)."""
    saved = row_cfg.run.dir / "pretrain" / CONFIG_FILE
    if saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) != to_dict(row_cfg):
        raise ConfigError(
            f"ablation row '{row.name}' was pre-trained with another config ({saved}); "
            f"delete {row_cfg.run.dir} to train it again"
        )


def run_row(cfg: Config, row: AblationRow, *, progress: bool) -> dict:
    """Pre-train (unless the main run is this row) and evaluate one row; its metrics."""
    row_cfg = row_config(cfg, row)
    checkpoint = cfg.run.dir / "pretrain" / "checkpoints"
    if all((row.ssv, row.cvl, row.ctr, row.mlm)) and checkpoint.is_dir():
        log.info("ablation row '%s' is the main run: evaluating %s", row.name, checkpoint)
    else:
        _check_same_config(row_cfg, row)
        run_pretrain(row_cfg, resume=True, progress=progress)
        checkpoint = row_cfg.run.dir / "pretrain" / "checkpoints"
    metrics = run_evaluation(row_cfg, checkpoint, ABLATION_TASKS, progress=progress, baselines=())
    return metrics["encoders"]["medunic"]["tasks"]


@command("ablate", "Med-UniC Table 4: pre-train and evaluate each objective / MLM ablation row")
def ablate(cfg: Config, args: argparse.Namespace) -> int:
    rows = []
    for row in ROWS:
        objectives = {k: getattr(row, k) for k in ("ssv", "cvl", "ctr", "mlm")}
        rows.append({"name": row.name, "objectives": objectives,
                     "metrics": run_row(cfg, row, progress=not args.quiet)})
    ablation = {"rows": rows}
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.dir / ABLATION_FILE).write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
    metrics_path = cfg.run.dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {
        "run": cfg.run.name, "encoders": {}}
    metrics["ablation"] = ablation
    write_outputs(metrics, cfg.run.dir, cfg.run.dir / EVAL_DIR)
    print_summary({"ablation": ablation}, cfg.run.dir, with_checks=False)
    return 0
