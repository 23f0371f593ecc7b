"""CLI sub-commands: each turns a resolved Config into library calls and prints a summary."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

from unimed.config import Config, save_config
from unimed.errors import ConfigError

Handler = Callable[[Config, argparse.Namespace], int]
ArgAdder = Callable[[argparse.ArgumentParser], None]
DefaultConfig = Callable[[argparse.Namespace], str | None]


def _no_args(parser: argparse.ArgumentParser) -> None:
    """Sub-commands without arguments of their own."""


def _no_default(args: argparse.Namespace) -> None:
    """Sub-commands whose config comes only from a preset and overrides."""


@dataclasses.dataclass(frozen=True)
class Command:
    """A sub-command: its help, handler, own arguments (added before the shared preset and
    overrides, so they may be positional), the preset used when none is given, and whether it runs
    under torchrun (one process per rank) or only as one process."""

    help: str
    handler: Handler
    add_args: ArgAdder = _no_args
    default_config: DefaultConfig = _no_default
    distributed: bool = False


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help_text: str, add_args: ArgAdder = _no_args, default_config: DefaultConfig = _no_default,
    *, distributed: bool = False,
) -> Callable[[Handler], Handler]:
    """Register a sub-command handler under `name`."""

    def decorator(fn: Handler) -> Handler:
        COMMANDS[name] = Command(help_text, fn, add_args, default_config, distributed)
        return fn

    return decorator


def run_dir(cfg: Config, subdir: str | None = None) -> Path:
    """The run's output directory, created, with the resolved config saved in it; a folder that
    cannot be written is a ConfigError naming it."""
    out = cfg.run.dir if subdir is None else cfg.run.dir / subdir
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {out} ({exc.strerror or exc}); "
                          "set run.output_dir to a writable folder") from None
    return out


from unimed.commands import phantom  # noqa: E402,F401  (each module registers its sub-commands)
from unimed.commands import train  # noqa: E402,F401
from unimed.commands import evaluate  # noqa: E402,F401
from unimed.commands import ablate  # noqa: E402,F401
from unimed.commands import demo  # noqa: E402,F401
from unimed.commands import check_data  # noqa: E402,F401
from unimed.commands import inference  # noqa: E402,F401
