"""How much of an encoder's frozen image features is per-image intensity rather than findings?

For each encoder and each linear-probe dataset (`eval.linear_probe.datasets`), the pooled features
of the training split (F_v, as the linear probe reads them) are standardised per dimension, as
the probe standardises them. The table prints the share of their total variance that a
least-squares fit on six intensity statistics of each image explains (mean, standard deviation,
5th / 50th / 95th percentile, mean absolute Laplacian: brightness, contrast and noise or
sharpness). It also prints that share over the ten leading principal components, where a probe
trained on a few images mostly looks, and the share the probe's own labels explain, one indicator
per class. Only training images are read.
Run from the repository root:

    python benchmarks/feature_nuisance.py configs/demo.yaml \\
        --checkpoint runs/abl3/ablation/cvl_mlm/seed0/pretrain \\
        --checkpoint runs/abl3/ablation/ssv_cvl_mlm/seed0/pretrain --baselines init

Encoders: any `--checkpoint` folders (each with its run's saved config and the preset's data
section), then the `--baselines` of the preset's method.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from unimed.commands.evaluate import preset_encoders
from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.eval.data import EvalData
from unimed.eval.linear_probe import PROBE_TARGETS, label_target, standardiser, targets
from unimed.eval.tasks import TaskContext

LEADING_COMPONENTS = 10
LAPLACIAN = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])


def intensity_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 6) statistics of (N, 1, H, W) grey images: mean, sd, 5th / 50th / 95th percentile and
    mean absolute Laplacian."""
    flat = images.flatten(1).float()
    quantiles = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95]), dim=1).T
    laplacian = F.conv2d(images.float(), LAPLACIAN).abs().flatten(1).mean(1, keepdim=True)
    return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), quantiles, laplacian], 1)


def explained_share(predictors: torch.Tensor, features: torch.Tensor) -> float:
    """Share of the total variance of (N, D) `features` that a least-squares fit on (N, P)
    `predictors` (with an intercept) explains: sum of fitted variances / sum of variances."""
    centred = features - features.mean(0)
    design = predictors - predictors.mean(0)
    fitted = design @ torch.linalg.lstsq(design, centred).solution
    return float(fitted.pow(2).sum() / centred.pow(2).sum())


def leading_components(features: torch.Tensor, k: int = LEADING_COMPONENTS) -> torch.Tensor:
    """(N, k) scores of the `k` principal components of largest variance."""
    centred = features - features.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:k].T


def label_matrix(labels: torch.Tensor) -> torch.Tensor:
    """(N, C) float indicators: multi-label targets as they are, class indices one-hot."""
    return labels.float() if labels.ndim == 2 else F.one_hot(labels.long()).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML preset (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a trained checkpoint or run folder (repeatable)")
    parser.add_argument("--baselines", default="", help="comma-separated baselines (e.g. init,random)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    ctx = TaskContext(EvalData(cfg.data, progress=False), cfg.eval, cfg.run.dir / "feature_nuisance")
    baselines = tuple(b for b in args.baselines.split(",") if b)
    encoders = preset_encoders(cfg, args.checkpoint, baselines, args.overrides)
    names = list(args.checkpoint) + [encoder.label for encoder in encoders[len(args.checkpoint):]]
    predictors = {}  # dataset: (intensity statistics, label indicators) of its training images
    for dataset in cfg.eval.linear_probe.datasets:
        records = ctx.data.require(dataset, "train")
        target = PROBE_TARGETS.get(dataset) or label_target(records, dataset)
        predictors[dataset] = (intensity_statistics(ctx.data.images(dataset, "train")),
                               label_matrix(targets(records, target, dataset)))
    rows = []
    for name, encoder in zip(names, encoders):
        for dataset, (stats, labels) in predictors.items():
            features = ctx.image_features(encoder, dataset, "train", "pooled")
            z = standardiser(features)(features)
            rows.append([name, dataset, len(z), f"{100 * explained_share(stats, z):.1f}",
                         f"{100 * explained_share(stats, leading_components(z)):.1f}",
                         f"{100 * explained_share(labels, z):.1f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print_table("Share of the standardised pooled-feature variance explained (%), training splits",
                ["Encoder", "Dataset", "images", "intensity", f"intensity, top {LEADING_COMPONENTS} PCs",
                 "labels"], rows)


if __name__ == "__main__":
    main()
