"""`unimed demo`: the main job — phantom world, cross-lingual vocabulary, MLM, pre-training of the
configured method (Med-UniC in configs/demo.yaml) and of the further methods `demo.methods` names
(PRIOR), evaluation of every downstream task against the ImageNet-init and random-init baselines,
report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from unimed.commands import command, holding, run_dir, say, to_job_logs
from unimed.commands.evaluate import run_evaluation
from unimed.commands.phantom import phantom
from unimed.commands.tables import print_table
from unimed.commands.train import (
    MLM_CHECK_FILE,
    mlm_check_line,
    print_loss_summary,
    run_mlm,
    run_pretrain,
    run_vocab,
    start_stage_over,
    text_encoder_dir,
    tokenizer_dir,
)
from unimed.config import Config, DemoConfig, load_config
from unimed.errors import ConfigError
from unimed.machine import DEMO_SIZED_ON_FLOPS, gemm_peak
from unimed.methods import method_label


def method_presets(cfg: Config) -> list[Config]:
    """The presets `demo.methods` names, read before any work starts (a bad one fails at once)."""
    presets = []
    for preset in cfg.demo.methods:
        if not Path(preset).is_file():
            raise ConfigError(f"demo.methods: preset {preset} not found (paths are relative to the "
                              "working directory)")
        other = load_config(preset)
        if other.method.name in [cfg.method.name, *(p.method.name for p in presets)]:
            raise ConfigError(f"demo.methods: {preset} trains method '{other.method.name}', which "
                              "the demo already trains")
        presets.append(other)
    return presets


def method_run(cfg: Config, preset: Config) -> Config:
    """The run of a further demo method: `preset`'s method and train sections and its pre-training
    datasets (UniMedI adds the CT reports) on this run's data, MLM text encoder and evaluation,
    written to ``<run dir>/<method name>``."""
    text = dataclasses.replace(preset.method.text, encoder=text_encoder_dir(cfg),
                               tokenizer=tokenizer_dir(cfg))
    run = dataclasses.replace(cfg.run, output_dir=str(cfg.run.dir), name=preset.method.name)
    data = dataclasses.replace(cfg.data, pretrain_datasets=preset.data.pretrain_datasets)
    return dataclasses.replace(cfg, run=run, method=dataclasses.replace(preset.method, text=text),
                               data=data, train=preset.train, demo=DemoConfig())


def machine_line(peaks: tuple[float, float], threads: int) -> str:
    """What the stage times above are relative to: this CPU's fp32 GEMM peak before the first stage
    and after the last (a shared machine's speed drifts), beside the one the job's 20 minutes were
    sized on. Measured: on slower machines the stages grew by at least that ratio (1.8-2.4x where
    it was 1.6-1.8x); on a faster one they shrank by less (0.65x where it was 0.38-0.45x: the
    memory-bound work does not speed up with the GEMM)."""
    ratios = sorted(DEMO_SIZED_ON_FLOPS / peak for peak in peaks)
    here = f"{ratios[0]:.1f}-{ratios[1]:.1f}x here"
    scaling = (f"its stage times grow at least as their ratio ({here})" if ratios[1] > 1 else
               f"a faster GEMM shortens its stages by less than their ratio ({here})")
    return (f"machine: fp32 GEMM peak {peaks[0] / 1e9:.0f} GFLOP/s before the first stage and "
            f"{peaks[1] / 1e9:.0f} after the last, on {threads} CPU thread(s); the job's 20 minutes "
            f"were sized on 2 cores measuring about {DEMO_SIZED_ON_FLOPS / 1e9:.0f} GFLOP/s, and "
            f"{scaling}")


def start_over(cfg: Config, presets: list[Config]) -> None:
    """The main job trains every stage afresh: the checkpoints an earlier demo left in this run's
    training stages (MLM, the method's pre-training, each further method's) go first
    (:func:`unimed.commands.train.start_stage_over`)."""
    for stage in (cfg.run.dir / "mlm", cfg.run.dir / "pretrain",
                  *(cfg.run.dir / preset.method.name / "pretrain" for preset in presets)):
        start_stage_over(stage)


@command("demo", "the main job: phantom world -> vocabulary -> MLM -> pre-training -> "
                 "evaluation -> report")
def demo(cfg: Config, args: argparse.Namespace) -> int:
    with holding(cfg.run.dir, "demo"):
        presets = method_presets(cfg)
        run_dir(cfg)
        start_over(cfg, presets)
        progress = args.progress
        times: list[list[str]] = []

        def timed(name: str, fn, *a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            times.append([name, f"{time.perf_counter() - start:.1f}"])
            return out

        args.preview = True
        peak = gemm_peak(torch.device("cpu"), sizes=(2048,))
        if timed("phantom world", phantom, cfg, args) != 0:
            return 1
        timed("vocabulary", run_vocab, cfg, progress=progress)
        timed("cross-lingual MLM", run_mlm, cfg, progress=progress)
        also = []
        for run_cfg in [cfg, *(method_run(cfg, preset) for preset in presets)]:
            result = timed(f"{method_label(run_cfg.method.name)} pre-training", run_pretrain, run_cfg,
                           resume=False, progress=progress)
            print_loss_summary(result.history, method_label(run_cfg.method.name))
            if run_cfg is not cfg:
                also.append((run_cfg, run_cfg.run.dir))
        timed("evaluation and report", run_evaluation, cfg, cfg.run.dir, cfg.eval.tasks,
              progress=progress, also=also, summary=True)
        mlm_check = cfg.run.dir / "mlm" / MLM_CHECK_FILE
        if mlm_check.is_file():
            say(mlm_check_line(json.loads(mlm_check.read_text(encoding="utf-8"))))
        print_table("Demo stages", ["stage", "seconds"], times)
        to_job_logs("demo stages (seconds): " + ", ".join(f"{name} {seconds}" for name, seconds in times))
        peaks = (peak, gemm_peak(torch.device("cpu"), sizes=(2048,)))
        say(machine_line(peaks, torch.get_num_threads()))
        say(f"outputs: {cfg.run.dir}")
        return 0
