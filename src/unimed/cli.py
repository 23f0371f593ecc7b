"""The `unimed` command line: YAML preset + dotted overrides -> typed config -> library calls.

    unimed phantom --config configs/demo.yaml phantom.mimic_studies=2000
    unimed pretrain configs/demo.yaml train.epochs=2
"""

from __future__ import annotations

import argparse
import logging
import sys

from unimed.commands import COMMANDS
from unimed.config import ConfigError, load_config
from unimed.data.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per registered command, all sharing the preset + overrides arguments."""
    parser = argparse.ArgumentParser(prog="unimed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config_path", nargs="?", default=None, help="YAML preset (or use --config)")
        p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=2")
        p.add_argument("--config", dest="config_flag", default=None, help="YAML preset")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_args(p)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `unimed` console script; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        path, overrides = _split_config_and_overrides(args)
        cfg = load_config(path, overrides)
        _, handler, _ = COMMANDS[args.command]
        return handler(cfg, args)
    except ConfigError as exc:
        print(f"unimed: config error: {exc}", file=sys.stderr)
    except DataError as exc:
        print(f"unimed: data error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
