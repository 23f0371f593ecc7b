"""CLI sub-commands: each turns a resolved Config into library calls and prints a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from unimed.config import Config, save_config

Handler = Callable[[Config, argparse.Namespace], int]
ArgAdder = Callable[[argparse.ArgumentParser], None]


def _no_args(parser: argparse.ArgumentParser) -> None:
    """Sub-commands without options of their own."""


COMMANDS: dict[str, tuple[str, Handler, ArgAdder]] = {}


def command(name: str, help_text: str, add_args: ArgAdder = _no_args) -> Callable[[Handler], Handler]:
    """Register a sub-command handler under `name`."""

    def decorator(fn: Handler) -> Handler:
        COMMANDS[name] = (help_text, fn, add_args)
        return fn

    return decorator


def run_dir(cfg: Config, subdir: str | None = None) -> Path:
    """The run's output directory, created, with the resolved config saved in it."""
    out = cfg.run.dir if subdir is None else cfg.run.dir / subdir
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    return out


from unimed.commands import phantom  # noqa: E402,F401  (each module registers its sub-commands)
from unimed.commands import medunic  # noqa: E402,F401
from unimed.commands import demo  # noqa: E402,F401
