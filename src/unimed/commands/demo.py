"""`unimed demo`: the main job — phantom world, cross-lingual vocabulary, MLM, pre-training of the
configured method (Med-UniC in configs/demo.yaml), evaluation of every downstream task against the
ImageNet-init and random-init baselines, report."""

from __future__ import annotations

import argparse
import json
import time

from unimed.commands import command, run_dir
from unimed.commands.evaluate import print_summary, run_evaluation
from unimed.commands.train import (
    MLM_CHECK_FILE,
    mlm_check_line,
    print_loss_summary,
    run_mlm,
    run_pretrain,
    run_vocab,
)
from unimed.commands.phantom import phantom
from unimed.commands.tables import print_table
from unimed.config import Config
from unimed.methods import method_label


@command("demo", "the main job: phantom world -> vocabulary -> MLM -> pre-training -> "
                 "evaluation -> report")
def demo(cfg: Config, args: argparse.Namespace) -> int:
    run_dir(cfg)
    progress = args.progress
    times: list[list[str]] = []

    def timed(name: str, fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        times.append([name, f"{time.perf_counter() - start:.1f}"])
        return out

    args.preview = True
    if timed("phantom world", phantom, cfg, args) != 0:
        return 1
    timed("vocabulary", run_vocab, cfg, progress=progress)
    timed("cross-lingual MLM", run_mlm, cfg, progress=progress)
    result = timed(f"{method_label(cfg.method.name)} pre-training", run_pretrain, cfg, resume=False,
                   progress=progress)
    print_loss_summary(result.history)
    metrics = timed("evaluation and report", run_evaluation, cfg, cfg.run.dir, cfg.eval.tasks,
                    progress=progress)
    print_summary(metrics, cfg.run.dir)
    mlm_check = cfg.run.dir / "mlm" / MLM_CHECK_FILE
    if mlm_check.is_file():
        print(mlm_check_line(json.loads(mlm_check.read_text(encoding="utf-8"))))
    print_table("Demo stages", ["stage", "seconds"], times)
    print(f"outputs: {cfg.run.dir}")
    return 0
