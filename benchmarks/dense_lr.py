"""Choose the learning rate of a dense head (`eval.detection.lr`, `eval.segmentation.lr`) on the
validation splits: train -> valid only, no test number.

For each encoder, dataset of `eval.<task>.datasets`, label fraction of `eval.fractions`, learning
rate of `--lrs` and head seed of `--seeds`, the task's own fitting (:func:`~unimed.eval.detection.
fit_detector` on FCOS, :func:`~unimed.eval.segmentation.fit_decoder` on the U-Net decoder) trains
on the fraction's seeded training subset of the frozen encoder's cached maps and keeps its state of
best validation metric, as the task does. The table prints that validation metric (mAP or Dice, %)
per seed and its mean over seeds; the test split is never read. Run from the repository root:

    python benchmarks/dense_lr.py detection runs/demo/config.yaml --lrs 5e-4,2e-3,5e-3,1e-2 \\
        --seeds 0 1 --baselines init,random --checkpoint runs/demo/pretrain/checkpoints

Encoders: the `--baselines` of the preset's method (the model as pre-training starts it) and any
`--checkpoint` folders (each evaluated with its run's saved config and the preset's data section).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch

from unimed.commands.evaluate import preset_encoders
from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.eval import detection, segmentation
from unimed.eval.data import EvalData, fraction_indices
from unimed.eval.encoders import Encoder
from unimed.eval.tasks import TaskContext, fraction_label

METRICS = {"detection": "mAP", "segmentation": "Dice"}


def fitter(task: str, encoder: Encoder, ctx: TaskContext, dataset: str
           ) -> tuple[int, Callable[[np.ndarray, Any, int], float]]:
    """(training images, fit(index, section, seed) -> best validation metric) of one dataset."""
    module = detection if task == "detection" else segmentation
    (train_maps, train_labels), valid = (module.split_maps(encoder, ctx, dataset, s)
                                         for s in ("train", "valid"))
    size = ctx.dense_size(getattr(ctx.cfg, task))

    def fit_detection(index: np.ndarray, section: Any, seed: int) -> float:
        _, best = detection.fit_detector(
            ([m[index] for m in train_maps], [train_labels[i] for i in index]), valid, section,
            strides=[size // m.shape[-1] for m in train_maps], image_size=size, seed=seed,
            device=encoder.device)
        return best

    def fit_segmentation(index: np.ndarray, section: Any, seed: int) -> float:
        subset = torch.from_numpy(index)
        train = ([m[subset] for m in train_maps], train_labels[subset])
        return segmentation.fit_decoder(train, valid, section, seed=seed, device=encoder.device).dice

    return len(train_labels), fit_detection if task == "detection" else fit_segmentation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(METRICS), help="which dense head")
    parser.add_argument("config", help="YAML preset (e.g. a run's config.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--lrs", default="5e-4,2e-3,5e-3", help="comma-separated learning rates")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="eval seeds: each draws its own training subset and head initialisation")
    parser.add_argument("--baselines", default="init,random", help="comma-separated baselines (or empty)")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a trained checkpoint folder (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    section = getattr(cfg.eval, args.task)
    ctx = TaskContext(EvalData(cfg.data, progress=False), cfg.eval, cfg.run.dir / "lr_choice")
    lrs = [float(v) for v in args.lrs.split(",")]
    rows = []
    baselines = tuple(b for b in args.baselines.split(",") if b)
    for encoder in preset_encoders(cfg, args.checkpoint, baselines, args.overrides):
        for dataset in section.datasets:
            n_train, fit = fitter(args.task, encoder, ctx, dataset)
            for fraction in cfg.eval.fractions:
                for lr in lrs:
                    start = time.perf_counter()
                    values = []
                    for seed in args.seeds:
                        index = fraction_indices(n_train, fraction, cfg.eval.min_train_images, seed)
                        values.append(100 * fit(index, dataclasses.replace(section, lr=lr), seed))
                    rows.append([encoder.label, dataset, fraction_label(fraction), f"{lr:g}",
                                 " / ".join(f"{v:.1f}" for v in values), f"{np.mean(values):.1f}",
                                 f"{time.perf_counter() - start:.0f}"])
                    print(" | ".join(rows[-1]), flush=True)
    sizes = ", ".join(f"{d} {s} {len(ctx.data.require(d, s))}"
                      for d in section.datasets for s in ("train", "valid"))
    print_table(f"{args.task}: validation {METRICS[args.task]} (%) of the kept state, seeds "
                f"{' / '.join(map(str, args.seeds))} (images: {sizes}; epochs {section.epochs}, "
                f"patience {section.patience})",
                ["Encoder", "Dataset", "fraction", "lr", "per seed", "mean", "seconds"], rows)


if __name__ == "__main__":
    main()
