"""Tiny stand-ins for the model, loss and data, so loop tests run in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import BertTokenizerFast

from unimed.data.pretrain import PretrainSampler
from unimed.data.records import Record
from unimed.train.config import TrainConfig

DIM = 6


class ToyDataset(Dataset):
    """Fixed random pairs (x, y); noise drawn from the per-sample seed the sampler hands out."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = torch.randn(n, DIM, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        noise = torch.randn(DIM, generator=torch.Generator().manual_seed(seed)) * 0.1
        return {"x": self.x[index] + noise, "y": self.y[index], "index": torch.tensor(index)}


class ToyModel(nn.Module):
    """Two towers whose features meet in the loss; dropout makes resume depend on the RNG."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 4))
        self.text = nn.Linear(DIM, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image_features": self.image(batch["x"]), "text_features": self.text(batch["y"])}


class ToyMedUniC(ToyModel):
    """The toy towers with every output MedUniCLoss reads; the second image view and the two CTR
    views come from fixed perturbations, so no RNG differs between ranks."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.ctr = nn.Linear(DIM, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(batch)
        out["image_aug_features"] = self.image(batch["x"].flip(-1))
        out["ctr_a"] = self.ctr(batch["y"])
        out["ctr_b"] = self.ctr(batch["y"] * 0.9)
        return out


def gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather with gradient (as the contrastive losses do), identity with one process."""
    if world_size == 1:
        return x
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


def contrastive_loss(image_features, text_features, *, rank: int, world_size: int):
    """InfoNCE over the global batch plus an MSE term: a loss whose value needs every rank."""
    img = F.normalize(gather(image_features, world_size), dim=-1)
    txt = F.normalize(gather(text_features, world_size), dim=-1)
    logits = img @ txt.T / 0.1  # (N, N)
    target = torch.arange(len(logits))
    ctr = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    mse = F.mse_loss(image_features, text_features)
    return {"loss": ctr + mse, "cvl_loss": ctr, "mse_loss": mse}


def mse_loss(image_features, text_features, *, rank: int, world_size: int):
    """A per-sample loss (no batch coupling), for gradient-accumulation equivalence."""
    mse = F.mse_loss(image_features, text_features)
    return {"loss": mse, "mse_loss": mse}


def toy_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
               shuffle: bool = True) -> DataLoader:
    sampler = PretrainSampler(dataset, rank=rank, world_size=world_size, shuffle=shuffle, seed=3)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def tiny_cfg(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=1e-2, weight_decay=0.01, warmup_ratio=0.25, grad_clip=1.0,
                log_every=1, checkpoint_every=1, keep_checkpoints=2, tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


WORDS = ["no", "pleural", "effusion", "cardiomegaly", "derram", "izquierd", "sin", "."]


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a handful of report words, built offline."""
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


def write_records(root: Path, n: int = 8) -> list[Record]:
    """`n` tiny grey PNGs with alternating English (even) / Spanish (odd) reports and sites."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 28), dtype=np.uint8)).save(path)
        english = i % 2 == 0
        out.append(Record(
            dataset="mimic-cxr" if english else "padchest", image_path=path, patient_id=str(i),
            study_id=f"s{i}", split="train",
            report="no pleural effusion . cardiomegaly" if english else "derram izquierd .",
            language="en" if english else "es", site="mimic" if english else "padchest",
        ))
    return out
