"""The `unimed` command line: YAML preset + dotted overrides -> typed config -> library calls.

    unimed phantom --config configs/demo.yaml phantom.mimic_studies=2000
    unimed pretrain configs/demo.yaml train.epochs=2
    unimed evaluate runs/demo --tasks zero_shot,linear_probe
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator

import torch

import unimed
from unimed.commands import COMMANDS
from unimed.config import Config, load_config, load_run_config
from unimed.data.errors import DataError
from unimed.errors import ConfigError
from unimed.eval.errors import EvalError
from unimed.machine import set_malloc_for_training
from unimed.train.checkpoint import CHECKPOINT_DIR, CheckpointError, latest_checkpoint
from unimed.train.distributed import log_on_rank_zero
from unimed.train.stop import Terminated, TrainingDiverged, TrainingInterrupted, terminate_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per registered command, all sharing the preset + overrides arguments."""
    parser = argparse.ArgumentParser(prog="unimed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unimed {unimed.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help)
        spec.add_args(p)
        p.add_argument("config_path", nargs="?", default=None, help="YAML preset (or use --config)")
        p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=2")
        p.add_argument("--config", dest="config_flag", default=None, help="YAML preset")
        p.add_argument("--quiet", action="store_true",
                       help="no progress bars and no transformers warnings (progress bars are "
                            "also off when stderr is not a terminal)")
        p.add_argument("--system-malloc", action="store_true",
                       help="keep glibc's default malloc settings (by default freed memory is kept "
                            "for reuse: faster CPU steps, a higher resident peak; "
                            "unimed.machine.set_malloc_for_training)")
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The positional preset is optional: an argument containing '=' is an override instead."""
    overrides = list(args.overrides)
    path = args.config_flag
    if args.config_path is not None:
        if "=" in args.config_path:
            overrides.insert(0, args.config_path)
        elif path is None:
            path = args.config_path
        else:
            raise ConfigError(f"two presets given: {path} and {args.config_path}")
    return path, overrides


@contextlib.contextmanager
def library_output(*, quiet: bool, progress: bool) -> Iterator[None]:
    """While a command runs: transformers' warnings off when `quiet` (its LOAD REPORT tables are off
    anyway where unimed loads a text encoder: :func:`unimed.models.text.load_pretrained` checks the
    loading info itself), its and the model hub's progress bars off unless `progress`; restored
    afterwards."""
    from transformers.utils import logging as hf_logging

    from unimed.models.text import transformers_quiet

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with transformers_quiet() if quiet else contextlib.nullcontext():
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# What the machine, not the code, makes a read or write fail with: a full disk or quota, a
# read-only or forbidden folder, a file over the size limit. Any stage that meets one ends in one
# line naming the file; other OS errors are bugs and keep their traceback.
FILE_SYSTEM_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.EFBIG})


# How a command stopped by SIGINT / SIGTERM mid-training goes on (unimed.train.stop).
RESUME_HINT = "run the same command with --resume to continue from it"
RESUME_HINTS = {"ablate": "run the same command again to continue from it",
                "demo": "the main job starts its stages over when run again"}

# The settings that size what a command holds in memory at once, named when it runs out: a batch
# that does not fit is a config value too large for the machine, not a bug to read a traceback for.
_EVAL_MEMORY = ("eval.batch_size (the frozen towers' batches) or a task's own batch "
                "(eval.segmentation.batch_size, eval.detection.batch_size, eval.volume_finetune.batch_size, "
                "eval.volume_segmentation.batch_size)")
_STAGES_MEMORY = f"train.batch_size, mlm.batch_size, {_EVAL_MEMORY}"  # commands that run every stage
MEMORY_SETTINGS = {
    "pretrain": "train.batch_size (per process; train.grad_accum keeps the global batch), UniMedI's "
                "method.volume_batch_size, or data.image_size",
    "mlm": "mlm.batch_size or mlm.max_length",
    "evaluate": _EVAL_MEMORY,
    "demo": _STAGES_MEMORY,
    "ablate": _STAGES_MEMORY,
}


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that did not fit: torch's OutOfMemoryError (a GPU's memory)
    or the CPU allocator's failure, which torch raises as a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def _allocation(exc: BaseException) -> str:
    """What did not fit, from torch's message: "tried to allocate 2.00 GiB on the GPU"."""
    where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "CPU"
    asked = re.search(r"[Tt]ried to allocate (\d+(?:\.\d+)? [KMGTP]iB|(\d+) bytes)", str(exc))
    if asked is None:
        return f"the {where}'s memory is full"
    size = f"{int(asked.group(2)) / 2**30:.2f} GiB" if asked.group(2) else asked.group(1)
    return f"tried to allocate {size} on the {where}"


TRAINING_COMMANDS = ("pretrain", "mlm")
"""The commands that write checkpoints, each in the run folder's stage of its name."""


def _kept(command: str, cfg: Config | None) -> str:
    """What a training command stopped at once (a second Ctrl-C, which does not wait for the step
    to end and be saved) keeps: its newest checkpoint, named, or that none was saved; "" for
    other commands."""
    if command not in TRAINING_COMMANDS or cfg is None:
        return ""
    root = cfg.run.dir / command / CHECKPOINT_DIR
    try:
        newest = latest_checkpoint(root)
    except CheckpointError:
        newest = None
    if newest is None:
        return f" before any checkpoint was saved in {root}"
    return (f"; its newest checkpoint is {newest} (the steps after it are lost): "
            f"{RESUME_HINTS.get(command, RESUME_HINT)}")


def _check_launch(name: str, distributed: bool) -> None:
    """A command that runs as one process, launched by torchrun on several ranks, is a ConfigError
    (every rank would do the whole job and write the same files)."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not distributed and world_size not in ("", "1"):
        runs = ", ".join(sorted(n for n, c in COMMANDS.items() if c.distributed))
        raise ConfigError(f"unimed {name} runs as one process (WORLD_SIZE={world_size}); launch it "
                          f"without torchrun (commands that run under torchrun: {runs})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `unimed` console script; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not args.system_malloc:
        set_malloc_for_training()
    # argparse stops filling positionals at the first option, so overrides given after an option
    # (`evaluate runs/demo --tasks zero_shot data.root=...`) arrive here; anything else is an error.
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    # Progress bars redraw in place on a terminal; in a redirected log every redraw is a line.
    args.progress = not args.quiet and sys.stderr.isatty()
    cfg = None
    try:
        spec = COMMANDS[args.command]
        _check_launch(args.command, spec.distributed)
        if spec.distributed:
            log_on_rank_zero()
        path, overrides = _split_config_and_overrides(args)
        saved = None if path else spec.default_config(args)  # a run's own config, found from its folder
        cfg = load_run_config(saved, overrides) if saved else load_config(path, overrides)
        with library_output(quiet=args.quiet, progress=args.progress), terminate_as_interrupt():
            return spec.handler(cfg, args)
    except TrainingInterrupted as exc:
        hint = RESUME_HINTS.get(args.command, "nothing is left to train" if exc.complete else RESUME_HINT)
        print(f"unimed: interrupted: {exc}; {hint}", file=sys.stderr)
        return exc.exit_code
    except Terminated as exc:  # SIGTERM outside training
        print(f"unimed: terminated: unimed {args.command} stopped by SIGTERM", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (or twice in it): no traceback to read
        print(f"unimed: interrupted: unimed {args.command} stopped by Ctrl-C{_kept(args.command, cfg)}",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except ConfigError as exc:
        print(f"unimed: config error: {exc}", file=sys.stderr)
    except DataError as exc:
        print(f"unimed: data error: {exc}", file=sys.stderr)
    except EvalError as exc:
        print(f"unimed: evaluation error: {exc}", file=sys.stderr)
    except CheckpointError as exc:
        print(f"unimed: checkpoint error: {exc}", file=sys.stderr)
    except TrainingDiverged as exc:
        print(f"unimed: training diverged: {exc}", file=sys.stderr)
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_FAULTS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"unimed: file system error: {where}{exc.strerror}", file=sys.stderr)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        settings = MEMORY_SETTINGS.get(args.command, "the batch sizes of the config")
        if _out_of_memory(exc):
            print(f"unimed: out of memory: {_allocation(exc)}; lower {settings}", file=sys.stderr)
        elif str(exc).startswith("DataLoader worker") and "signal: Killed" in str(exc):  # SIGKILL
            print(f"unimed: out of memory: {str(exc).strip().splitlines()[0].rstrip('. ')} (the system "
                  f"ends a process so when memory runs out); lower data.num_workers or {settings}",
                  file=sys.stderr)
        else:
            raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
