"""Choose `eval.volume_finetune.lr` on the validation splits: train -> valid only, no test number.

For each learning rate of `--lrs` and each dataset of `eval.volume_finetune.datasets`, the 3D
fine-tuning of :mod:`unimed.eval.volume_finetune` runs on the training split of each encoder and
selects its state on the validation split, as the task does; the table prints the validation
metric of the kept state (CC-CCII accuracy, LUNA16 AUC), the validation loss and the epoch. The
test split is never read. Run from the repository root:

    python benchmarks/volume_finetune_lr.py configs/demo.yaml data.root=/tmp/ft3d-data \\
        method.text.encoder=runs/demo/mlm --lrs 1e-4,3e-4,1e-3 --baselines init

Encoders: the `--baselines` of the preset's method (the model as pre-training starts it) and any
`--checkpoint` folders (each evaluated with its run's saved config and the preset's data section).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from unimed.commands.evaluate import preset_encoders
from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.eval.data import EvalData
from unimed.eval.tasks import TaskContext
from unimed.eval.volume_finetune import dataset_target, fine_tune, split_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML preset")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated learning rates")
    parser.add_argument("--baselines", default="init", help="comma-separated baselines (or empty)")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a trained checkpoint folder (repeatable)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    baselines = tuple(b for b in args.baselines.split(",") if b)
    encoders = preset_encoders(cfg, args.checkpoint, baselines, args.overrides)
    ctx = TaskContext(EvalData(cfg.data, progress=False), cfg.eval, cfg.run.dir / "lr_choice")
    rows = []
    for encoder in encoders:
        for dataset in cfg.eval.volume_finetune.datasets:
            target = dataset_target(ctx, dataset)
            splits = split_data(encoder, ctx, dataset, target, ("train", "valid"))
            for lr in (float(v) for v in args.lrs.split(",")):
                section = dataclasses.replace(cfg.eval.volume_finetune, lr=lr)
                start = time.perf_counter()
                fitted = fine_tune(encoder, splits["train"], splits["valid"], target, section,
                                   seed=cfg.eval.seed, desc=f"{encoder.name} {dataset} lr {lr:g}",
                                   progress=True)
                value = "–" if fitted.valid_value is None else f"{fitted.valid_value:.3f}"
                rows.append([encoder.label, dataset, f"{lr:g}", f"{fitted.selected_by} {value}",
                             f"{fitted.valid_loss:.3f}", f"{fitted.epoch}/{fitted.epochs_run}",
                             f"{time.perf_counter() - start:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    sizes = ", ".join(f"{d} {s} {len(ctx.data.require(d, s))}"
                      for d in cfg.eval.volume_finetune.datasets for s in ("train", "valid"))
    print_table(f"Validation only ({cfg.eval.volume_finetune.trainable}; volumes: {sizes})",
                ["Encoder", "Dataset", "lr", "validation metric", "validation loss", "epoch / run",
                 "seconds"], rows)


if __name__ == "__main__":
    main()
