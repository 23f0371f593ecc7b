"""Is the phantom world learnable but not trivial at the default difficulty?

Generates frontal studies from both sites, trains a small supervised CNN on the ground-truth finding
targets, and compares it with the same CNN frozen at random init + logistic regression. Prints one
AUC table. Run:  python benchmarks/phantom_learnability.py [--train 3000 --test 1000 --epochs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study

TARGETS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly",),
    "pleural_effusion": ("pleural_effusion",),
    "pneumothorax": ("pneumothorax",),
    "consolidation/pneumonia": ("consolidation", "pneumonia"),
    "atelectasis": ("atelectasis",),
    "edema": ("edema",),
    "nodule/mass": ("nodule", "mass"),
    "devices/foreign object": ("support_devices", "foreign_object"),
    "fracture": ("fracture",),
    "covid": ("covid",),
    "hilar_enlargement": ("hilar_enlargement",),
    "vascular_redistribution": ("vascular_redistribution",),
    "pleural_thickening": ("pleural_thickening",),
}
# Balanced-ish prevalence so every target has enough positives in a few thousand studies.
ENRICH = {name: 0.2 for names in TARGETS.values() for name in names} | {"covid": 0.15, "pneumonia": 0.15}


def make_split(cfg: PhantomConfig, dataset: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, S, S) float32, targets (N, K) float32) of n frontal studies, sites alternating."""
    images, targets = [], []
    for i in tqdm(range(n), desc=dataset, leave=False):
        study = generate_study(cfg, dataset, i, site=("boston", "alicante")[i % 2], frontal_only=True, enrich=ENRICH)
        present = {f.name for f in study.findings}
        images.append(study.image[None])
        targets.append([float(bool(present & set(names))) for names in TARGETS.values()])
    return np.stack(images), np.asarray(targets, dtype=np.float32)


def small_cnn(k: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), *block(64, 96),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, k))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, features: bool = False) -> np.ndarray:
    model.eval()
    body = model[:-1] if features else model
    return torch.cat([body(torch.from_numpy(x[i:i + 256])) for i in range(0, len(x), 256)]).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (-(-len(x) // 64)))
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in tqdm(range(epochs), desc="train"):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            batch = xt[idx]
            batch = torch.where(torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5, batch, batch.flip(-1))
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def aucs(y: np.ndarray, scores: np.ndarray) -> list[float]:
    return [roc_auc_score(y[:, k], scores[:, k]) for k in range(y.shape[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--difficulty", type=float, default=PhantomConfig().difficulty)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(PhantomConfig(), seed=args.seed, image_size=args.size, difficulty=args.difficulty)
    start = time.perf_counter()
    x_train, y_train = make_split(cfg, "learnability-train", args.train)
    x_test, y_test = make_split(cfg, "learnability-test", args.test)
    gen_s = time.perf_counter() - start

    frozen = small_cnn(len(TARGETS))
    f_train, f_test = predict(frozen, x_train, features=True), predict(frozen, x_test, features=True)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    random_scores = np.stack([
        LogisticRegression(max_iter=2000).fit((f_train - mean) / std, y_train[:, k]).decision_function((f_test - mean) / std)
        for k in range(len(TARGETS))
    ], axis=1)
    model = small_cnn(len(TARGETS))
    train(model, x_train, y_train, args.epochs, args.seed)
    supervised = predict(model, x_test)

    print(f"difficulty {args.difficulty}, {args.train} train / {args.test} test studies at {args.size} px "
          f"(generation {gen_s:.1f} s, {(args.train + args.test) / gen_s:.0f} studies/s), {args.epochs} epochs")
    print(f"| {'finding':<24} | {'test prev.':>10} | {'random-init + LR':>16} | {'supervised CNN':>14} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 18}|{'-' * 16}|")
    for name, prev, a, b in zip(TARGETS, y_test.mean(0), aucs(y_test, random_scores), aucs(y_test, supervised)):
        print(f"| {name:<24} | {prev:>10.3f} | {a:>16.3f} | {b:>14.3f} |")


if __name__ == "__main__":
    main()
