"""Is each 3D phantom task learnable but not trivial at the default difficulty?

Generates CT volumes in memory with `generate_ct_study` at the phantom's default size and
difficulty, trains a small supervised 3D network per task on the ground truth, and compares it with
the same network frozen at its random init plus a linear classifier. Prints one table and a verdict
per task. Run:  python benchmarks/phantom3d_learnability.py [--train 200 --test 100 --epochs 10]

Tasks, each scored against the generator's ground truth:

* CC-CCII-like: NCP / CP / Normal of a chest volume (`CTStudy.ccii_class`), accuracy; the trivial
  level is the training set's majority class predicted for every test volume.
* LUNA-like: nodule present or not, AUC; chance 0.5. Twice: learnt from the volume label alone, and
  at nodule scale from the nodule centres (LUNA16's `annotations.csv`), as below. And the task the
  framework evaluates (the ``luna16-candidates`` dataset): each candidate of `candidates.csv` (every
  nodule and the phantom detector's FALSE_CANDIDATES nodule-like structures per volume) as the
  CANDIDATE_CUBE_MM cube around it (`crop_cube`), resized to CUBE_INPUT, nodule or not.
* slice-level: does an axial slice of the network input cut any finding (`Lesion.slices`), AUC over
  all test slices; the trivial level scores each slice by how often its position held a finding in
  training (where findings lie, without looking at the image).
* BCV-like: the seven organ label maps (`CTStudy.organs`), mean Dice over organs (MONAI); the
  trivial level is an atlas, each voxel's most frequent training label.

The chest tasks share one set of volumes that cycles through the six chest CT sites (BIMCV-,
CC-CCII- and LUNA16-like) with the CC-CCII enrichment (covid and pneumonia 1/3 each) and the LUNA16
one (nodule 1/2), so acquisition chains differ within every task and nodules co-occur with
infections (unlike in LUNA16). Segmentation uses BCV's two abdominal sites. Every volume goes
through the project's 3D input path (`prepare_volume`: `resize_volume` to the network input,
then an HU window to [0, 1]: the lung window -1000..400 of the project's 3D evaluation for the
chest, the usual soft-tissue window -175..250 for the abdomen); the input defaults to 16x64x64, half
the generated resolution along every axis, for CPU speed.

Supervised: four Conv3d-BN-ReLU blocks (8 to 64 channels) trained from scratch per classification
task; for slices the blocks keep the depth and a 1x1 convolution gives one logit per slice; MONAI's
BasicUNet with a Dice + cross-entropy loss for the organs. Random features: the same network at the
same random init, frozen; scikit-learn logistic regression on its standardised pooled features
(per volume or per slice); for the organs only BasicUNet's final 1x1x1 convolution is trained (same
loss and epochs) on the frozen decoder features, a per-voxel linear classifier on random features.

The nodule-scale learner: the same small CNN classifies NODULE_PATCH crops of the network input
(4 x 12 x 12 voxels, 8 x 24 x 24 generated): NODULE_CROPS jittered crops around each training
nodule's centre against NODULE_NEGATIVES random crops per training volume clear of every nodule; a
test volume scores the maximum of the network's output over its windows (WINDOW_STRIDE apart). Its
random features are the frozen network at its init with a logistic probe on the same patches,
scored the same way. At 16 x 64 x 64 a nodule covers about ten voxels of 65,536, which a network
that sees the whole volume with one label does not find from 200 volumes; these settings were
chosen on volumes drawn under other dataset names than the benchmark's.

A task is learnable when the supervised score beats both the random features and the trivial level
by at least MARGIN, and not trivial when the supervised score stays below CEILING.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import BasicUNet
from monai.networks.utils import one_hot
from scipy import stats
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from unimed.data.adapters.luna16 import CANDIDATE_CUBE_MM
from unimed.data.volumes import Volume, crop_cube, prepare_volume
from unimed.phantom.ct.anatomy import ORGANS
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.writers import (FALSE_CANDIDATES, BcvWriter, BimcvWriter, CcciiWriter, Luna16Writer,
                                       false_candidates)

CHEST_SITES: tuple[str, ...] = BimcvWriter.sites + CcciiWriter.sites + Luna16Writer.sites
CHEST_ENRICH: dict[str, float] = {**CcciiWriter.enrich, **Luna16Writer.enrich}
ABDOMEN_SITES: tuple[str, ...] = BcvWriter.sites
CCII_CLASSES: tuple[str, ...] = ("NCP", "CP", "Normal")
ORGAN_NAMES: tuple[str, ...] = tuple(sorted(ORGANS, key=ORGANS.get))
ORGAN_LABELS = np.array([0, *(ORGANS[name] for name in ORGAN_NAMES)])
"""BCV label of each segmentation class: 0 (background), then the organs in BCV order."""
LUNG_WINDOW = (-1000.0, 400.0)
"""HU window of the chest volumes: `prepare_volume`'s default, the one the project's 3D evaluation uses."""
SOFT_TISSUE_WINDOW = (-175.0, 250.0)
"""HU window of the abdominal volumes, the usual one for BCV organ segmentation."""
MARGIN = 0.05
CEILING = 0.99
NODULE_PATCH = np.array((4, 12, 12))  # (d, h, w) input voxels around a nodule, 8 x 24 x 24 generated
NODULE_CROPS = 4  # jittered crops per annotated nodule
NODULE_NEGATIVES = 8  # random crops clear of every nodule per training volume
WINDOW_STRIDE = (1, 2, 2)  # of the windows a volume is scored on
CUBE_INPUT = (16, 16, 16)  # (d, h, w) network input of a candidate's cube: 3 mm voxels


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated volume as the networks see it, with its ground truth."""

    image: np.ndarray  # (1, D, H, W) float32 in [0, 1]
    organs: np.ndarray  # (D, H, W) uint8 segmentation class (index into ORGAN_LABELS)
    ccii: int  # index into CCII_CLASSES
    nodule: int
    slices: np.ndarray  # (D,) float32: 1 where the input slice cuts a finding
    nodules: np.ndarray  # (K, 3) float32: each nodule's centre in input voxels (d, h, w)
    cubes: np.ndarray  # (C, 1, *CUBE_INPUT) float32 in [0, 1]: the cube around each candidate
    cube_labels: np.ndarray  # (C,) float32: 1 for a nodule's cube


@dataclasses.dataclass(frozen=True)
class Row:
    """One task's line of the table."""

    task: str
    metric: str
    trivial: float
    random: float
    supervised: float
    counts: str
    seconds: float

    @property
    def learnable(self) -> bool:
        """The supervised network beats both the random features and the trivial level by MARGIN."""
        return self.supervised >= max(self.trivial, self.random) + MARGIN

    @property
    def nontrivial(self) -> bool:
        """The supervised network does not solve the task (stays below CEILING)."""
        return self.supervised < CEILING

    def verdict(self) -> str:
        """One line: learnable or not, trivial or not, with the numbers behind both."""
        learn = "learnable" if self.learnable else "NOT learnable"
        hard = "not trivial" if self.nontrivial else "TRIVIAL"
        return (f"{self.task}: {learn} (supervised {self.supervised:.3f} vs random features {self.random:.3f}, "
                f"trivial {self.trivial:.3f}, margin {MARGIN}); {hard} (supervised "
                f"{'<' if self.nontrivial else '>='} {CEILING})")


@dataclasses.dataclass(frozen=True)
class Job:
    """Which study to generate and how to present it to the networks."""

    cfg: CTConfig
    seed: int
    dataset: str
    index: int
    site: str
    enrich: Mapping[str, float] | None
    shape: tuple[int, int, int]  # network input (D, H, W)
    window: tuple[float, float]  # HU mapped to [0, 1]


def make_sample(job: Job) -> Sample:
    """Generate one CT study and turn it into network input and targets."""
    study = generate_ct_study(job.cfg, job.seed, job.dataset, job.index, site=job.site, enrich=job.enrich)
    size = job.shape[::-1]  # prepare_volume works on (X, Y, Z)
    where = Path(job.dataset, str(job.index))
    volume = Volume(study.hu.T.astype(np.float32), study.affine(), where)
    image = prepare_volume(volume, shape=size, window=job.window)
    nodule_voxels = [lesion.centre_voxel for lesion in study.lesions if lesion.name == "nodule"]
    centres = [*nodule_voxels, *false_candidates(study, FALSE_CANDIDATES)]  # (z, y, x)
    cubes = [prepare_volume(crop_cube(volume, (study.affine() @ np.array([x, y, z, 1.0]))[:3], CANDIDATE_CUBE_MM),
                            shape=CUBE_INPUT[::-1], window=job.window).permute(0, 3, 2, 1).numpy()
             for z, y, x in centres]
    organs = prepare_volume(Volume(study.organs.T, study.affine(), where), shape=size, labels=True)
    hit = np.zeros(study.hu.shape[0], np.float32)
    for lesion in study.lesions:
        hit[list(lesion.slices)] = 1.0
    slices = nn.functional.adaptive_max_pool1d(torch.from_numpy(hit)[None, None], job.shape[0])[0, 0]
    scale = np.array(job.shape) / np.array(study.hu.shape)  # voxel centres stay centres under the resize
    nodules = [(np.array(lesion.centre_voxel) + 0.5) * scale - 0.5 for lesion in study.lesions if lesion.name == "nodule"]
    return Sample(
        image=image.permute(0, 3, 2, 1).contiguous().numpy(),
        organs=np.searchsorted(ORGAN_LABELS, organs[0].permute(2, 1, 0).round().int().numpy()).astype(np.uint8),
        ccii=CCII_CLASSES.index(study.ccii_class),
        nodule=int(any(lesion.name == "nodule" for lesion in study.lesions)),
        slices=slices.numpy(),
        nodules=np.array(nodules, np.float32).reshape(-1, 3),
        cubes=np.array(cubes, np.float32).reshape(-1, 1, *CUBE_INPUT),
        cube_labels=np.array([1.0] * len(nodule_voxels) + [0.0] * (len(centres) - len(nodule_voxels)), np.float32),
    )


def _one_thread() -> None:
    """Generation workers run one torch thread each, so that they do not oversubscribe the cores."""
    torch.set_num_threads(1)


def generate(cfg: CTConfig, seed: int, dataset: str, n: int, sites: Sequence[str], enrich: Mapping[str, float] | None,
             shape: tuple[int, int, int], window: tuple[float, float], workers: int) -> list[Sample]:
    """Studies 0..n-1 of `dataset`, sites taken in turn, by `workers` processes (one thread each)."""
    jobs = [Job(cfg, seed, dataset, i, sites[i % len(sites)], enrich, shape, window) for i in range(n)]
    if workers <= 1:
        return [make_sample(job) for job in jobs]
    with multiprocessing.Pool(workers, initializer=_one_thread) as pool:
        return pool.map(make_sample, jobs, chunksize=4)


def small_cnn3d(outputs: int, *, per_slice: bool) -> nn.Sequential:
    """Four Conv3d-BN-ReLU blocks (8, 16, 32, 64 channels), each halving H and W (and D unless
    `per_slice`), then `pool` (features per volume, or per slice with `per_slice`) and a linear `head`:
    (N, outputs) logits, (N,) when `outputs` is 1, or (N, D) per-slice logits."""
    stride = (1, 2, 2) if per_slice else (2, 2, 2)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm3d(cout), nn.ReLU(),
                nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]

    body = nn.Sequential(*block(1, 8), *block(8, 16), *block(16, 32), *block(32, 64))
    if per_slice:
        pool = nn.Sequential(nn.AdaptiveAvgPool3d((None, 1, 1)), nn.Flatten(2))  # (N, 64, D)
        head = nn.Sequential(nn.Conv1d(64, 1, 1), nn.Flatten(1))
    else:
        pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten())
        head = nn.Sequential(nn.Linear(64, outputs), nn.Flatten(0)) if outputs == 1 else nn.Linear(64, outputs)
    return nn.Sequential(collections.OrderedDict(body=body, pool=pool, head=head))


def organ_unet() -> BasicUNet:
    """A small 3D U-Net (MONAI BasicUNet, 8-64 channels) with one output per segmentation class."""
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=len(ORGAN_LABELS), features=(8, 8, 16, 32, 64, 8))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The model's outputs for `x` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          *, epochs: int, seed: int, batch: int, lr: float, flip: bool) -> None:
    """AdamW with a one-cycle schedule; `flip` mirrors random volumes left-right (targets unchanged)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * (-(-len(x) // batch)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb = x[idx]
            if flip:
                xb = torch.where(torch.rand(len(idx), 1, 1, 1, 1, generator=gen) < 0.5, xb, xb.flip(-1))
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def linear_probe(f_train: np.ndarray, y_train: np.ndarray) -> Pipeline:
    """Logistic regression on standardised features."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(f_train, y_train)


def majority_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of always predicting the training set's most frequent class."""
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(y_train), 1)), y_train)
    return float(accuracy_score(y_test, dummy.predict(np.zeros((len(y_test), 1)))))


def position_prior_auc(s_train: np.ndarray, s_test: np.ndarray) -> float:
    """AUC of scoring each test slice (N, D) by its position's rate of findings in training."""
    return float(roc_auc_score(s_test.ravel(), np.broadcast_to(s_train.mean(0), s_test.shape).ravel()))


def organ_dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """Dice per foreground class (classes 1..classes-1) of (N, D, H, W) label maps, averaged over the
    volumes whose truth holds the class (NaN for a class no truth holds)."""
    def hot(labels: np.ndarray) -> torch.Tensor:
        return one_hot(torch.from_numpy(labels.astype(np.int64))[:, None], classes)

    dice = compute_dice(hot(pred), hot(truth), include_background=False, ignore_empty=True)
    return torch.nanmean(dice, dim=0).numpy()


def mean_dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean over foreground classes of :func:`organ_dice`."""
    return float(np.nanmean(organ_dice(pred, truth, classes)))


def cnn_scores(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, *, classes: int,
               per_slice: bool, epochs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(random-feature probe, supervised CNN) test predictions: class labels when `classes` > 2,
    else positive-class scores, one per volume or (flattened) one per slice with `per_slice`."""
    torch.manual_seed(seed)
    model = small_cnn3d(classes if classes > 2 else 1, per_slice=per_slice)
    features = nn.Sequential(model.body, model.pool)
    f_train, f_test = (predict(features, x).numpy() for x in (x_train, x_test))
    if per_slice:  # (N, C, D) -> one row per slice
        f_train, f_test = (f.transpose(0, 2, 1).reshape(-1, f.shape[1]) for f in (f_train, f_test))
    probe = linear_probe(f_train, y_train.ravel())
    random = probe.predict(f_test) if classes > 2 else probe.predict_proba(f_test)[:, 1]
    if classes > 2:
        loss, target = nn.functional.cross_entropy, torch.from_numpy(y_train).long()
    else:
        loss, target = nn.functional.binary_cross_entropy_with_logits, torch.from_numpy(y_train).float()
    train(model, x_train, target, loss, epochs=epochs, seed=seed, batch=16, lr=2e-3, flip=True)
    out = predict(model, x_test)
    supervised = out.argmax(1).numpy() if classes > 2 else out.numpy().ravel()
    return random, supervised


def stack(samples: Sequence[Sample], field: str) -> np.ndarray:
    """One field of every sample as an array with a leading sample axis."""
    return np.stack([getattr(s, field) for s in samples])


def crop(image: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The NODULE_PATCH of a (1, D, H, W) image around `centre`, shifted inside the image."""
    lo = np.clip(np.round(centre - NODULE_PATCH / 2).astype(int), 0, np.array(image.shape[1:]) - NODULE_PATCH)
    d, h, w = lo
    return image[:, d:d + NODULE_PATCH[0], h:h + NODULE_PATCH[1], w:w + NODULE_PATCH[2]]


def nodule_patches(samples: Sequence[Sample], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training patches as LUNA16's annotations allow: NODULE_CROPS crops per nodule centre, jittered
    by up to half a voxel in depth and one in-plane (label 1), and NODULE_NEGATIVES random crops per
    volume clear of every nodule (label 0)."""
    rng = np.random.default_rng(seed)
    patches, labels = [], []
    for sample in samples:
        for centre in sample.nodules:
            for _ in range(NODULE_CROPS):
                patches.append(crop(sample.image, centre + rng.uniform(-1, 1, 3) * (0.5, 1, 1)))
                labels.append(1.0)
        bounds = np.array(sample.image.shape[1:]) - NODULE_PATCH / 2
        for centre in rng.uniform(NODULE_PATCH / 2, bounds, (NODULE_NEGATIVES, 3)):
            if not np.any(np.all(np.abs(sample.nodules - centre) < NODULE_PATCH / 2, axis=1)):
                patches.append(crop(sample.image, centre))
                labels.append(0.0)
    return torch.from_numpy(np.stack(patches)), torch.tensor(labels)


def windows(image: np.ndarray) -> torch.Tensor:
    """Every NODULE_PATCH window of a (1, D, H, W) image at WINDOW_STRIDE: (windows, 1, d, h, w)."""
    out = torch.from_numpy(image)[None]
    for axis, (size, step) in enumerate(zip(NODULE_PATCH, WINDOW_STRIDE), start=2):
        out = out.unfold(axis, int(size), step)
    return out.reshape(-1, 1, *NODULE_PATCH)


def nodule_row(train_set: Sequence[Sample], test_set: Sequence[Sample], epochs: int, seed: int) -> Row:
    """Nodule yes / no learnt at nodule scale: the small CNN classifies patches (:func:`nodule_patches`)
    and a volume scores the maximum over its windows (:func:`windows`); the random features are the
    same network at its init, frozen, with a linear probe on the same patches, scored the same way."""
    start = time.perf_counter()
    x_train, y_train = nodule_patches(train_set, seed)
    y_test = stack(test_set, "nodule")
    torch.manual_seed(seed)
    model = small_cnn3d(1, per_slice=False)
    features = copy.deepcopy(nn.Sequential(model.body, model.pool))  # frozen at the init
    probe = linear_probe(predict(features, x_train, batch=512).numpy(), y_train.numpy())
    train(model, x_train, y_train, nn.functional.binary_cross_entropy_with_logits, epochs=epochs, seed=seed,
          batch=64, lr=2e-3, flip=True)
    random, supervised = [], []
    for sample in test_set:  # a volume's windows are built once and scored by both
        patches = windows(sample.image)
        random.append(probe.predict_proba(predict(features, patches, batch=512).numpy())[:, 1].max())
        supervised.append(predict(model, patches, batch=512).max().item())
    return Row("LUNA nodule yes/no, patches", "AUC", 0.5, roc_auc_score(y_test, random),
               roc_auc_score(y_test, supervised), f"{len(x_train)} patches/{len(test_set)} vol",
               time.perf_counter() - start)


def candidate_row(train_set: Sequence[Sample], test_set: Sequence[Sample], epochs: int, seed: int) -> Row:
    """Nodule or not of each candidate's cube (the framework's ``luna16-candidates`` task): the small
    CNN on the cubes against the same network frozen at its init with a linear probe."""
    start = time.perf_counter()
    x_train, x_test = (torch.from_numpy(np.concatenate([s.cubes for s in split])) for split in (train_set, test_set))
    y_train, y_test = (np.concatenate([s.cube_labels for s in split]) for split in (train_set, test_set))
    random, supervised = cnn_scores(x_train, y_train, x_test, classes=2, per_slice=False, epochs=epochs, seed=seed)
    return Row("LUNA candidates nodule/not, cubes", "AUC", 0.5, roc_auc_score(y_test, random),
               roc_auc_score(y_test, supervised), f"{len(x_train)}/{len(x_test)} cubes ({int(y_test.sum())} nodules)",
               time.perf_counter() - start)


def chest_rows(train_set: Sequence[Sample], test_set: Sequence[Sample], epochs: int, seed: int) -> list[Row]:
    """The CC-CCII-like, LUNA-like (per volume, per patch and per candidate) and slice-level rows."""
    x_train, x_test = (torch.from_numpy(stack(s, "image")) for s in (train_set, test_set))
    counts = f"{len(train_set)}/{len(test_set)} vol"
    rows = []

    start = time.perf_counter()
    y_train, y_test = stack(train_set, "ccii"), stack(test_set, "ccii")
    random, supervised = cnn_scores(x_train, y_train, x_test, classes=3, per_slice=False, epochs=epochs, seed=seed)
    rows.append(Row("CC-CCII NCP/CP/Normal", "accuracy", majority_accuracy(y_train, y_test),
                    accuracy_score(y_test, random), accuracy_score(y_test, supervised), counts,
                    time.perf_counter() - start))

    start = time.perf_counter()
    y_train, y_test = stack(train_set, "nodule"), stack(test_set, "nodule")
    random, supervised = cnn_scores(x_train, y_train, x_test, classes=2, per_slice=False, epochs=epochs, seed=seed)
    rows.append(Row("LUNA nodule yes/no", "AUC", 0.5, roc_auc_score(y_test, random), roc_auc_score(y_test, supervised),
                    counts, time.perf_counter() - start))
    rows.append(nodule_row(train_set, test_set, epochs, seed))
    rows.append(candidate_row(train_set, test_set, epochs, seed))

    start = time.perf_counter()
    s_train, s_test = stack(train_set, "slices"), stack(test_set, "slices")
    random, supervised = cnn_scores(x_train, s_train, x_test, classes=2, per_slice=True, epochs=epochs, seed=seed)
    rows.append(Row("slice cuts a finding", "AUC", position_prior_auc(s_train, s_test),
                    roc_auc_score(s_test.ravel(), random), roc_auc_score(s_test.ravel(), supervised),
                    f"{s_train.size}/{s_test.size} slices", time.perf_counter() - start))
    return rows


def organ_row(train_set: Sequence[Sample], test_set: Sequence[Sample], epochs: int, seed: int) -> tuple[Row, np.ndarray]:
    """The BCV-like row and the supervised U-Net's Dice per organ."""
    start = time.perf_counter()
    classes = len(ORGAN_LABELS)
    x_train, x_test = (torch.from_numpy(stack(s, "image")) for s in (train_set, test_set))
    y_train, y_test = stack(train_set, "organs"), stack(test_set, "organs")
    target = torch.from_numpy(y_train.astype(np.int64))[:, None]
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    atlas = stats.mode(y_train, axis=0, keepdims=True).mode

    torch.manual_seed(seed)
    unet = organ_unet()
    frozen = copy.deepcopy(unet)
    frozen.final_conv = nn.Identity()
    f_train, f_test = predict(frozen, x_train, batch=4), predict(frozen, x_test, batch=4)
    head = copy.deepcopy(unet.final_conv)  # the network's own last layer, at its own init
    train(head, f_train, target, loss, epochs=epochs, seed=seed, batch=2, lr=1e-2, flip=False)
    random = predict(head, f_test).argmax(1).numpy()

    train(unet, x_train, target, loss, epochs=epochs, seed=seed, batch=2, lr=1e-2, flip=False)
    supervised = predict(unet, x_test, batch=4).argmax(1).numpy()
    per_organ = organ_dice(supervised, y_test, classes)
    row = Row("BCV organ segmentation", "mean Dice", mean_dice(np.broadcast_to(atlas, y_test.shape), y_test, classes),
              mean_dice(random, y_test, classes), float(np.nanmean(per_organ)), f"{len(train_set)}/{len(test_set)} vol",
              time.perf_counter() - start)
    return row, per_organ


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    head = ("task", "metric", "chance/trivial", "random features", "supervised", "train/test", "seconds")
    lines = [f"| {' | '.join(head)} |", f"|{'|'.join('-' * (len(h) + 2) for h in head)}|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.metric} | {r.trivial:.3f} | {r.random:.3f} | {r.supervised:.3f} | "
                     f"{r.counts} | {r.seconds:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = CTConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200, help="chest training volumes")
    parser.add_argument("--test", type=int, default=100, help="chest test volumes")
    parser.add_argument("--seg-train", type=int, default=24, help="abdominal training volumes")
    parser.add_argument("--seg-test", type=int, default=12, help="abdominal test volumes")
    parser.add_argument("--shape", type=int, nargs=3, default=default.shape, help="generated D H W")
    parser.add_argument("--input", type=int, nargs=3, default=(16, 64, 64),
                        help="network input D H W (multiples of 16: the U-Net halves each four times)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seg-epochs", type=int, default=40)
    parser.add_argument("--difficulty", type=float, default=default.difficulty)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="generation processes")
    args = parser.parse_args(argv)
    if any(s % 16 for s in args.input):
        parser.error(f"--input sizes must be multiples of 16, got {args.input}")
    return args


def run(args: argparse.Namespace) -> tuple[str, list[Row], np.ndarray]:
    """Generate, train and score every task: (header line, table rows, supervised Dice per organ)."""
    cfg = dataclasses.replace(CTConfig(), shape=tuple(args.shape), difficulty=args.difficulty)
    shape = tuple(args.input)
    start = time.perf_counter()
    chest = [generate(cfg, args.seed, f"learnability3d-chest-{split}", n, CHEST_SITES, CHEST_ENRICH, shape,
                      LUNG_WINDOW, args.workers) for split, n in (("train", args.train), ("test", args.test))]
    abdomen = [generate(cfg, args.seed, f"learnability3d-abdomen-{split}", n, ABDOMEN_SITES, None, shape,
                        SOFT_TISSUE_WINDOW, args.workers) for split, n in (("train", args.seg_train), ("test", args.seg_test))]
    gen_s = time.perf_counter() - start
    n = args.train + args.test + args.seg_train + args.seg_test
    header = (f"difficulty {args.difficulty}, generated at {'x'.join(map(str, args.shape))}, network input "
              f"{'x'.join(map(str, shape))} (resize_volume), {args.epochs} epochs ({args.seg_epochs} for the U-Net), "
              f"seed {args.seed}; {n} volumes generated in {gen_s:.0f} s")
    rows = chest_rows(*chest, args.epochs, args.seed)
    organ, per_organ = organ_row(*abdomen, args.seg_epochs, args.seed)
    return header, [*rows, organ], per_organ


def main() -> None:
    header, rows, per_organ = run(parse_args())
    print(header)
    print(table(rows))
    print("supervised Dice per organ: " + ", ".join(f"{name} {d:.3f}" for name, d in zip(ORGAN_NAMES, per_organ)))
    for row in rows:
        print(row.verdict())


if __name__ == "__main__":
    main()
