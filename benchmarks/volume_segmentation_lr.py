"""Choose `eval.volume_segmentation`'s lr and epochs on the validation split: train -> valid only.

For each encoder, each dataset of `eval.volume_segmentation.datasets` and each `--schedules` entry
(lr and epochs, patience = epochs so that every epoch runs), the UNETR decoder of
:mod:`unimed.eval.volume_segmentation` trains on the whole training split of the encoder's cached 3D
maps and the table prints the best validation mean Dice over organs and the seconds it took. The
test split is never read. Run from the repository root, after `make demo`:

    python benchmarks/volume_segmentation_lr.py configs/demo.yaml method.text.encoder=runs/demo/mlm \\
        --schedules 1e-3:12,1e-3:40,3e-3:40,1e-2:40 --baselines init

Encoders: the `--baselines` of the preset's method (the model as pre-training starts it).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from unimed.commands.evaluate import build_encoders
from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.eval.data import EvalData
from unimed.eval.tasks import TaskContext
from unimed.eval.volume_segmentation import fit_decoder, load_split, relabel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML preset")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--schedules", default="1e-3:12,3e-3:40",
                        help="comma-separated lr:epochs pairs")
    parser.add_argument("--baselines", default="init", help="comma-separated baselines")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    try:
        schedules = [(float(lr), int(epochs)) for lr, epochs in
                     (pair.split(":") for pair in args.schedules.split(","))]
    except ValueError:
        parser.error(f"--schedules must be lr:epochs pairs such as 1e-3:12,3e-3:40, got {args.schedules!r}")
    encoders = build_encoders(cfg, None, tuple(b for b in args.baselines.split(",") if b), [])
    ctx = TaskContext(EvalData(cfg.data, progress=False), cfg.eval, cfg.run.dir / "lr_choice")
    rows = []
    for encoder in encoders:
        for dataset in cfg.eval.volume_segmentation.datasets:
            train, valid = (load_split(encoder, ctx, dataset, s) for s in ("train", "valid"))
            organs = sorted(int(v) for v in train[2].unique() if v > 0)
            train, valid = ((v, m, relabel(y, organs)) for v, m, y in (train, valid))
            for lr, epochs in schedules:
                section = dataclasses.replace(cfg.eval.volume_segmentation, lr=lr, epochs=epochs,
                                              patience=epochs)
                start = time.perf_counter()
                _, best = fit_decoder(train, valid, len(organs) + 1, section, seed=cfg.eval.seed,
                                      device=encoder.device, desc=f"{encoder.name} {dataset} lr {lr:g}",
                                      progress=True)
                rows.append([encoder.label, dataset, f"{lr:g}", str(epochs), f"{best:.3f}",
                             f"{time.perf_counter() - start:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    sizes = ", ".join(f"{d} {s} {len(ctx.data.require(d, s))}"
                      for d in cfg.eval.volume_segmentation.datasets for s in ("train", "valid"))
    print_table(f"Validation only (volumes: {sizes})",
                ["Encoder", "Dataset", "lr", "epochs", "validation mean Dice", "seconds"], rows)


if __name__ == "__main__":
    main()
