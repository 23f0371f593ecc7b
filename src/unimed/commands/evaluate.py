"""`unimed evaluate CHECKPOINT`: downstream tasks on a checkpoint and baselines, metrics.json, report.html.

The checkpoint's own resolved config (saved with its run) is used when no preset is given, so
`unimed evaluate runs/demo` needs nothing else; overrides still apply (e.g. `data.root=...`).

Beside metrics.json: bootstrap.npz, the bootstrap replicates of every metric keyed
"<encoder>/<task>/<path>/<metric>" (the paired comparisons of the checks read them; in the JSON they
would be thousands of numbers per metric), and under eval/ the published split files of the
evaluation sets, whose SHA-256 metrics.json and the report list. When a 3D task runs, the volume
viewer figure of each of its datasets goes there too (once per run: it shows data, not an encoder).
An evaluation never replaces an earlier one in place: that one moves to
previous_evaluations/<its creation time>/ first, and back if the new one fails
(:func:`replacing_evaluation`). Its finished jobs are kept in evaluation_jobs/ until it is written,
so one that stopped (Ctrl-C, a preempted job, a failed task) goes on where it stopped when run again
(:mod:`unimed.eval.jobs`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import shutil
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unimed.commands import command, holding, run_dir, say
from unimed.commands.train import text_encoder_dir, tokenizer_dir, trained_tokenizer_dir
from unimed.commands.tables import print_table
from unimed.config import CONFIG_FILE, Config, load_config, load_run_config, to_dict
from unimed.errors import ConfigError
from unimed.eval.config import TASK_NAMES, VOLUME_TASK_NAMES
from unimed.eval.report import read_metrics
from unimed.machine import software

if TYPE_CHECKING:
    from unimed.eval.jobs import JobStore
    from unimed.eval.volume_viewer import Regenerated

log = logging.getLogger(__name__)

# Baselines: "init" is the model as pre-training starts it (the preset's image weights, e.g. ImageNet,
# and the MLM-only text encoder); "random" the same with a randomly initialised image encoder.
BASELINE_LABELS = {"init": "{image} init / MLM-only", "random": "Random init / MLM-only"}
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
BOOTSTRAP_FILE = "bootstrap.npz"
EVAL_DIR = "eval"
PREVIOUS_DIR = "previous_evaluations"
SPILL_DIR = ".spill"
JOBS_DIR = "evaluation_jobs"
LOSS_FIGURE = "loss_curves.png"


def parse_tasks(text: str | None, cfg: Config) -> tuple[str, ...]:
    """`--tasks a,b` (or `eval.tasks` without the option), each checked against the known task
    names, each once (`zero_shot,zero_shot` ran it twice); `--tasks ""` names none (it ran every task)."""
    given = [t.strip() for t in text.split(",") if t.strip()] if text is not None else cfg.eval.tasks
    tasks = tuple(dict.fromkeys(given))
    valid = TASK_NAMES + VOLUME_TASK_NAMES
    unknown = [t for t in tasks if t not in valid]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {unknown or '(none given)'}; valid: {', '.join(valid)}")
    return tasks


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint folder `checkpoint` names (see find_checkpoint), checked intact; a missing
    one is a ConfigError naming it."""
    from unimed.train.checkpoint import find_checkpoint

    try:
        return find_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def build_encoders(cfg: Config, checkpoint: str | Path | None, baselines: tuple[str, ...],
                   also: Sequence[tuple[Config, str | Path]] = ()) -> list:
    """The checkpoint's encoder (when given, filed under the method's name), those of the further
    trained methods `also` (each with its own run config), then the requested baselines."""
    return _encoders(cfg, _resolve_trained(cfg, checkpoint, also), baselines)


def preset_encoders(cfg: Config, checkpoints: Sequence[str | Path], baselines: tuple[str, ...],
                    overrides: Sequence[str] = ()) -> list:
    """:func:`build_encoders` for a preset without a checkpoint of its own (the settings-choice
    benchmarks): the trained `checkpoints`, each with its run's saved config (`overrides` applied)
    and the preset's data section, then the `baselines` of the preset's method. Checkpoints of one
    method are numbered in order ("medunic_1", "medunic_2"; labels too): an encoder's name keys its
    cached features, so two runs of a method must not share one."""
    from unimed.train.checkpoint import checkpoint_config

    also = []
    for folder in checkpoints:
        path = resolve_checkpoint(folder)
        run_cfg = load_run_config(checkpoint_config(path), list(overrides))
        also.append((dataclasses.replace(run_cfg, data=cfg.data), path))
    encoders = _encoders(cfg, also, baselines)
    trained = encoders[:len(also)]
    for name, count in Counter(encoder.name for encoder in trained).items():
        if count > 1:
            same = [encoder for encoder in trained if encoder.name == name]
            for k, encoder in enumerate(same, 1):
                encoder.name, encoder.label = f"{name}_{k}", f"{encoder.label} {k}"
    return encoders


def _resolve_trained(cfg: Config, checkpoint: str | Path | None,
                     also: Sequence[tuple[Config, str | Path]]) -> list[tuple[Config, Path]]:
    """(run config, checked checkpoint folder or exported model folder) of `checkpoint` (when
    given) and of `also`."""
    from unimed.pretrained import is_export

    trained = ([(cfg, checkpoint)] if checkpoint is not None else []) + list(also)
    return [(run_cfg, Path(path) if is_export(path) else resolve_checkpoint(path))
            for run_cfg, path in trained]


def _encoders(cfg: Config, trained: Sequence[tuple[Config, Path]], baselines: tuple[str, ...]) -> list:
    """:func:`build_encoders` with the trained methods' checkpoint folders already resolved."""
    from unimed.eval.encoders import build_encoder
    from unimed.methods import method_label
    from unimed.pretrained import export_encoder, is_export

    unknown = [b for b in baselines if b not in BASELINE_LABELS]
    if unknown:
        raise ConfigError(f"eval.baselines: unknown {unknown}; valid: {', '.join(BASELINE_LABELS)}")
    encoders: list = [
        export_encoder(weights, run_cfg.data.max_length) if is_export(weights) else
        build_encoder(run_cfg.method.name, method_label(run_cfg.method.name), run_cfg.method,
                      weights=weights, text_encoder=text_encoder_dir(run_cfg),
                      tokenizer=trained_tokenizer_dir(run_cfg, weights), seed=run_cfg.run.seed,
                      max_length=run_cfg.data.max_length, for_inference=True)
        for run_cfg, weights in trained
    ]
    if not baselines:  # the baselines' text encoder (this run's MLM output) is not needed
        return encoders
    common = dict(text_encoder=text_encoder_dir(cfg), tokenizer=tokenizer_dir(cfg),
                  seed=cfg.run.seed, max_length=cfg.data.max_length, for_inference=True)
    image_cfg = cfg.method.image
    image = "ImageNet" if image_cfg.weights else "Random"
    for name in baselines:
        method_cfg = cfg.method if name == "init" else dataclasses.replace(
            cfg.method, image=dataclasses.replace(image_cfg, weights=None))
        if name == "random" and "init" in baselines and image_cfg.weights is None:
            log.info("baseline 'random' is the 'init' baseline here (no image weights): not repeated")
            continue
        label = BASELINE_LABELS[name].format(image=image)
        encoders.append(build_encoder(name, label, method_cfg, **common))
    return encoders


def run_evaluation(
    cfg: Config, checkpoint: str | Path | None, tasks: tuple[str, ...], *, progress: bool,
    baselines: tuple[str, ...] | None = None, also: Sequence[tuple[Config, str | Path]] = (),
    summary: bool = False,
) -> dict:
    """Evaluate the checkpoint, the further trained methods `also` (run config, checkpoint) and the
    baselines on `tasks`; metrics.json + report.html in the run dir. With `summary` the tables and
    checks are printed (:func:`print_summary`) while the evaluation still holds its folder, so its
    log ends with them too."""
    from unimed.eval.curves import LOG_FILE, plot_loss_curves
    from unimed.eval.data import EvalData
    from unimed.eval.metrics import CONFIDENCE
    from unimed.eval.runner import evaluate
    from unimed.eval.tasks import TaskContext
    from unimed.eval.volume_viewer import volume_datasets, write_volume_viewers
    from unimed.pretrained import is_export
    from unimed.train.checkpoint import unfinished, weights_sha256

    start = time.perf_counter()
    # A missing checkpoint fails before anything is written, then missing datasets; the weights are
    # loaded (and checked) under the evaluation's hold, so its log says which, or why they could not be.
    trained = _resolve_trained(cfg, checkpoint, also)
    check_datasets_present(cfg, tasks)
    out_dir = cfg.run.dir
    with holding(out_dir, "evaluation"):
        early = [line for _, path in trained if not is_export(path) and (line := unfinished(path))]
        encoders = _encoders(cfg, trained, cfg.eval.baselines if baselines is None else baselines)
        with replacing_evaluation(out_dir) as previous:
            figures = run_dir(cfg, EVAL_DIR)
            # Images, slice stacks and feature maps too large to hold go to disk beside the report
            # (unimed.eval.data), for this run only.
            spill_dir = figures / SPILL_DIR
            ctx = TaskContext(EvalData(cfg.data, progress=progress, spill_dir=spill_dir), cfg.eval, figures,
                              progress)
            store = job_store(cfg, out_dir)
            try:
                results = evaluate(encoders, ctx, tasks, store)
            finally:
                shutil.rmtree(spill_dir, ignore_errors=True)
            metrics = {
                "run": cfg.run.name,
                "method": cfg.method.name,
                "methods": [run_cfg.method.name for run_cfg, _ in trained],
                "checkpoint": str(checkpoint) if checkpoint is not None else None,
                "data_root": cfg.data.root,
                "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "software": software(),
                "weights": {encoder.name: {"path": str(path), "sha256": weights_sha256(path)}
                            for encoder, (_, path) in zip(encoders, trained)},
                **results,
                "bootstrap": {"resamples": cfg.eval.bootstrap_resamples, "confidence": CONFIDENCE,
                              "seed": cfg.eval.seed, "replicates": BOOTSTRAP_FILE},
                "splits": ctx.data.publish(figures),
            }
            if any(task in VOLUME_TASK_NAMES for task in tasks):
                metrics["volume_viewer"] = write_volume_viewers(ctx, volume_datasets(cfg.eval, tasks),
                                                                phantom_volume)
            log_path = cfg.run.dir / "pretrain" / LOG_FILE
            if log_path.is_file():
                metrics["pretraining"] = plot_loss_curves(log_path, figures / LOSS_FIGURE)
            for run_cfg, _ in also:
                name, method_log = run_cfg.method.name, run_cfg.run.dir / "pretrain" / LOG_FILE
                curves = (plot_loss_curves(method_log, figures / f"{name}_{LOSS_FIGURE}")
                          if method_log.is_file() else None)
                if curves is not None:
                    metrics.setdefault("pretraining_methods", {})[name] = curves
            if early:
                metrics["unfinished"] = early
            if "ablation" in previous:  # `unimed ablate`'s table (its own runs and seeds) stays in the report
                metrics["ablation"] = previous["ablation"]
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            write_outputs(metrics, out_dir, figures, ctx.replicates)
            store.clear()
        if summary:
            print_summary(metrics, out_dir)
    return metrics


def job_store(cfg: Config, out_dir: Path) -> JobStore:
    """The store of the finished jobs of an evaluation of `out_dir` under `cfg`: keyed by its
    evaluation and data config, the prompt files and unimed's own code (every module's source: a
    stopped evaluation run again after an upgrade runs every job again), with each job's encoder
    and tasks (:mod:`unimed.eval.jobs`)."""
    import unimed
    from unimed.eval.jobs import JobStore, context_identity
    from unimed.eval.prompts import PROMPT_DIR

    folders = {Path(section.prompt_dir or PROMPT_DIR) for section in (cfg.eval.zero_shot, cfg.eval.gradcam)}
    prompts = [file for folder in folders for file in folder.glob("*.yaml")]
    code = Path(unimed.__file__).parent.rglob("*.py")
    return JobStore(out_dir / JOBS_DIR, context_identity(to_dict(cfg.eval), to_dict(cfg.data),
                                                         files=[*prompts, *code]))


@contextlib.contextmanager
def replacing_evaluation(out_dir: Path) -> Iterator[dict]:
    """Around writing a new evaluation of the run in `out_dir`: the previous one, if any
    (metrics.json, bootstrap.npz, report.html and eval/), moves to ``previous_evaluations/<its
    creation time>/`` first and its metrics are yielded; an evaluation of a few tasks, or of an
    earlier checkpoint, would otherwise replace the whole evaluation in place (the report there
    embeds its figures). An evaluation that fails puts the previous one back as it was."""
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.is_file():
        yield {}
        return
    try:
        previous = read_metrics(metrics_path)
    except ConfigError:  # unreadable, or not an object: moved aside all the same
        previous = {}
    created = previous.get("created")
    if not isinstance(created, str):
        created = datetime.datetime.fromtimestamp(metrics_path.stat().st_mtime).isoformat(timespec="seconds")
    stamp = created.replace(":", "-")
    target = next(out_dir / PREVIOUS_DIR / name for name in [stamp, *(f"{stamp}_{n}" for n in range(2, 1000))]
                  if not (out_dir / PREVIOUS_DIR / name).exists())
    names = [name for name in (METRICS_FILE, BOOTSTRAP_FILE, REPORT_FILE, EVAL_DIR)
             if (out_dir / name).exists()]
    try:
        target.mkdir(parents=True)
        for name in names:
            shutil.move(out_dir / name, target / name)
    except OSError as exc:
        raise ConfigError(f"cannot keep the run's previous evaluation in {target} "
                          f"({exc.strerror or exc}); nothing was evaluated") from None
    log.info("the run's previous evaluation (created %s) moved to %s", created, target)
    try:
        yield previous
    except BaseException:
        for name in names:  # what the failed evaluation wrote goes; the previous one comes back
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
            elif (out_dir / name).exists():
                (out_dir / name).unlink()
            shutil.move(target / name, out_dir / name)
        target.rmdir()
        with contextlib.suppress(OSError):  # previous_evaluations/ itself, when it was made for this
            target.parent.rmdir()
        log.info("the evaluation failed: the run's previous evaluation is back in %s", out_dir)
        raise


def phantom_volume(folder: Path, key: str) -> Regenerated | None:
    """The phantom's CT study behind `<folder>/<key>` generated again, as the volume viewer takes it
    (the evaluation layer never imports the phantom, so the command wires the two)."""
    from unimed.eval.volume_viewer import Regenerated
    from unimed.phantom.ct.world import regenerate_ct_study

    study = regenerate_ct_study(folder.parent, folder.name, key)
    if study is None:
        return None
    masks = {lesion.name: lesion.mask.transpose(2, 1, 0) for lesion in study.lesions
             if lesion.mask is not None}
    return Regenerated(study.hu.transpose(2, 1, 0), study.affine(), masks)  # (X, Y, Z): RAS order


def read_replicates(out_dir: Path) -> dict[str, np.ndarray]:
    """The bootstrap replicates saved in `out_dir` (empty when there are none)."""
    path = out_dir / BOOTSTRAP_FILE
    if not path.is_file():
        return {}
    try:
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): evaluate the run again to write it") from None


def write_outputs(metrics: dict, out_dir: Path, figures: Path,
                  replicates: Mapping[str, np.ndarray] | None = None) -> None:
    """metrics.json, bootstrap.npz (when `replicates` are given; else the saved ones are read for
    the checks) and report.html in `out_dir` (figures embedded from `figures`)."""
    from unimed.eval.html_report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    if replicates is None:
        replicates = read_replicates(out_dir)
    else:
        np.savez_compressed(out_dir / BOOTSTRAP_FILE, **replicates)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(metrics, out_dir / REPORT_FILE, figures, replicates=replicates)


def print_summary(metrics: dict, out_dir: Path, *, with_checks: bool = True) -> None:
    """The paper-style tables (those `metrics` has data for) and, optionally, the quality checks
    followed by one line per failed or tied check with its likely cause and how many checks
    passed, failed and tied, per trained method."""
    from unimed.eval.checks import FAIL, TIE, all_quality_checks, tally_lines
    from unimed.eval.report import format_tables

    for title, header, rows in format_tables(metrics):
        print_table(title, header, rows)
    if with_checks:
        checks = all_quality_checks(metrics, read_replicates(out_dir))
        print_table("Quality checks", ["check", "result", "detail"],
                    [[c.name, c.status.upper() if c.status in (FAIL, TIE) else c.status, c.detail]
                     for c in checks])
        for check in checks:
            if check.status in (FAIL, TIE):
                say(f"{check.status.upper()}: {check.name} -- {check.cause}")
        say("\n".join(tally_lines(metrics, checks)))
    for line in metrics.get("unfinished", []):
        say(f"NOTE: {line}")
    say(f"report: {out_dir / REPORT_FILE}\nmetrics: {out_dir / METRICS_FILE}")


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, its checkpoints/ folder, a run folder, or a "
                                           "folder written by `unimed export`")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated subset of {','.join(TASK_NAMES + VOLUME_TASK_NAMES)} "
                             "(default: eval.tasks)")


def _checkpoint_config(args: argparse.Namespace) -> str | None:
    """The config saved with the checkpoint's run (or the exported model's), when the checkpoint
    can be found."""
    from unimed.pretrained import is_export
    from unimed.train.checkpoint import checkpoint_config

    if is_export(args.checkpoint):
        return str(Path(args.checkpoint) / CONFIG_FILE)
    try:
        return str(checkpoint_config(resolve_checkpoint(args.checkpoint)))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def check_datasets_present(cfg: Config, tasks: Sequence[str]) -> None:
    """One ConfigError naming every dataset the tasks read whose folder is not under data.root,
    with the tasks that read it, before any model is built (the evaluation stopped at the first,
    and a root holding few of the defaults took a run per missing dataset to find them all)."""
    from unimed.data.adapters import dataset_folder

    missing: dict[str, list[str]] = {}
    for task in tasks:
        for name in cfg.eval.task_datasets(task):
            if not dataset_folder(name, cfg.data.root).is_dir():
                missing.setdefault(name, []).append(task)
    if missing:
        listed = "; ".join(f"{name} ({', '.join(by)})" for name, by in missing.items())
        root = Path(cfg.data.root)
        where = f"{root} ({root.resolve()})" if not root.is_absolute() else str(root)
        raise ConfigError(f"{len(missing)} dataset(s) the tasks read are not under data.root "
                          f"{where}: {listed}. Point data.root at them, or name other datasets in "
                          "the tasks' eval.<task> settings")


def methods_beside(cfg: Config, checkpoint: str | Path) -> list[tuple[Config, Path]]:
    """When `checkpoint` is a run folder (its pre-training in ``pretrain/``), the further methods
    trained in it (the demo's ``<run>/<method>/`` runs) with their saved configs, so evaluating the
    run again keeps them, wherever ``run.output_dir`` / ``run.name`` put the evaluation."""
    run = Path(checkpoint)
    if not (run / "pretrain" / CONFIG_FILE).is_file():
        return []
    found = []
    for folder in sorted(p for p in run.iterdir() if p.is_dir()):
        saved = folder / "pretrain" / CONFIG_FILE
        if saved.is_file():
            other = load_run_config(saved)
            if other.method.name == folder.name != cfg.method.name:
                found.append((other, folder))
    return found


def exported_model_config(cfg: Config, folder: Path) -> Config:
    """`cfg` (the exported model's config, overrides applied) reading the prompts the model ships
    with and writing into `folder` (unless ``run.output_dir`` / ``run.name`` were overridden: the
    run folder its config names is the training machine's). The model is evaluated alone: the
    baselines would need its run's MLM-only text encoder, which an export does not hold."""
    from unimed.pretrained import PROMPTS_DIR

    changed = _changed(to_dict(cfg.method), to_dict(load_run_config(folder / CONFIG_FILE).method), "method")
    if changed:
        raise ConfigError(f"an exported model is evaluated as it was exported: {'; '.join(changed)}; "
                          "remove the method.* override")
    if not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root {cfg.data.root} is not a folder here (an exported model's config "
                          "names its training machine's): give data.root=/path/to/evaluation/data")
    if cfg.eval.baselines:
        log.info("%s is an exported model: evaluated without the baselines %s (they need its run's "
                 "MLM-only text encoder)", folder, ", ".join(cfg.eval.baselines))
    run = cfg.run
    if run.dir.resolve() in (load_config(folder / CONFIG_FILE).run.dir.resolve(), folder.resolve()):
        run = dataclasses.replace(run, output_dir=str(folder.resolve().parent), name=folder.resolve().name)
    prompts = str(folder / PROMPTS_DIR)
    ev = cfg.eval
    return dataclasses.replace(cfg, run=run, eval=dataclasses.replace(
        ev, zero_shot=dataclasses.replace(ev.zero_shot, prompt_dir=prompts),
        gradcam=dataclasses.replace(ev.gradcam, prompt_dir=prompts)))


def _changed(given: Mapping, saved: Mapping, prefix: str) -> list[str]:
    """'key=given (the model's: saved)' for each dotted key whose value differs."""
    out = []
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(saved.get(key), Mapping):
            out += _changed(value, saved[key], f"{prefix}.{key}")
        elif value != saved.get(key):
            out.append(f"{prefix}.{key}={value} (the model's: {saved.get(key)})")
    return out


@command("evaluate", "downstream evaluation of a checkpoint (and baselines): metrics.json + report.html",
         _eval_args, _checkpoint_config)
def evaluate_command(cfg: Config, args: argparse.Namespace) -> int:
    from unimed.pretrained import is_export

    tasks = parse_tasks(args.tasks, cfg)
    baselines = None
    if is_export(args.checkpoint):
        cfg, baselines = exported_model_config(cfg, Path(args.checkpoint)), ()
    run_evaluation(cfg, args.checkpoint, tasks, progress=args.progress, baselines=baselines,
                   also=methods_beside(cfg, args.checkpoint), summary=True)
    return 0
