"""Tiny stand-ins for the model, loss, method and data, so loop tests run in a fraction of a second."""

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
from unimed.methods.base import Method, StepContext
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


class ToyMethod(Method):
    """A model and a loss function as a method: the loss of the model's outputs."""

    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss

    def forward(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.loss_fn(**self.model(batch), rank=ctx.rank, world_size=ctx.world_size)


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
               shuffle: bool = True, seed: int = 3) -> DataLoader:
    sampler = PretrainSampler(dataset, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
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


def write_volume_records(root: Path, n: int = 8) -> list[Record]:
    """`n` tiny NIfTI CT volumes (HU, air included) with Spanish reports, BIMCV-like."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        path = root / f"vol{i}.nii.gz"
        array = rng.uniform(-1000.0, 400.0, (12, 12, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 4.0, 1.0])), str(path))
        out.append(Record(dataset="bimcv-covid19", image_path=path, patient_id=f"v{i}",
                          study_id=f"v{i}", split="train", report="derram izquierd . sin",
                          language="es", site="elche", ndim=3))
    return out


class StagedToyMethod(ToyMethod):
    """Two stages, as PRIOR's: "align" trains both towers with the contrastive loss; "teacher"
    adds a pull of the text tower towards an EMA teacher (a buffer the after-step hook updates)
    and trains only the text tower with its own optimizer (SGD, constant lr). A count of hook
    calls is kept as training state."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__(ToyModel(dropout=dropout), contrastive_loss)
        self.register_buffer("teacher", torch.zeros(4, DIM))
        self.hook_calls = 0
        self.started: list[str] = []

    def stages(self, train):
        from unimed.methods.base import Stage

        return [Stage("align", 1), Stage("teacher", 1)]

    def start_stage(self, stage) -> None:
        self.started.append(stage.name)

    def configure_optimizer(self, stage, train, total_steps):
        if stage.name == "align":
            return super().configure_optimizer(stage, train, total_steps)
        optimizer = torch.optim.SGD(self.model.text.parameters(), lr=0.05)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def forward(self, batch, ctx):
        out = super().forward(batch, ctx)
        if ctx.stage == "teacher":
            pull = (self.model.text.weight - self.teacher).pow(2).sum()
            out = {**out, "pull_loss": pull, "loss": out["loss"] + pull}
        return out

    def after_optimizer_step(self, ctx) -> None:
        with torch.no_grad():
            self.teacher.mul_(0.9).add_(0.1 * self.model.text.weight)
        self.hook_calls += 1

    def train_state(self) -> dict:
        return {"hook_calls": self.hook_calls}

    def load_train_state(self, state: dict) -> None:
        self.hook_calls = state["hook_calls"]


class LoaderRecorder(ToyMethod):
    """The toy method, noting which loader each micro-batch came from."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__(ToyModel(dropout=dropout), contrastive_loss)
        self.seen: list[str] = []

    def forward(self, batch, ctx):
        self.seen.append(ctx.loader)
        return super().forward(batch, ctx)
