"""`unimed check-data`: read a data root through the adapters and say, per dataset, what was found,
what was dropped and why, without training or writing anything."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from unimed.commands import command
from unimed.commands.tables import print_table
from unimed.config import Config
from unimed.errors import ConfigError


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None, help="data root to check (default: data.root)")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated dataset names (default: every dataset under the root)")
    parser.add_argument("--no-image-check", action="store_true",
                        help="only check that images exist, not that they open (faster)")


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def check_dataset(name: str, cfg: Config, check_images: bool):
    """(DatasetRead, None), or (None, the error) when the dataset cannot be read at all. Bad rows
    are skipped and counted; a generic text-only table is read as the text stages read it, and a
    split file in ``data.split_dir`` as the stages read it (one the data no longer matches is the
    dataset's error; none is written)."""
    from unimed.data.adapters import dataset_folder, load_dataset
    from unimed.data.adapters.generic import find_table, is_generic, is_text_only, read_rows
    from unimed.data.errors import DataError
    from unimed.data.splits import split_file_path

    folder = dataset_folder(name, cfg.data.root)
    split_dir = cfg.data.split_dir
    if split_dir is not None and not split_file_path(split_dir, name).is_file():
        split_dir = None  # the stages would carve the splits as this read does, and write the file
    try:
        text_only = is_generic(folder) and is_text_only(read_rows(find_table(folder))[0])
        read = load_dataset(name, folder, on_error="skip", min_report_tokens=cfg.data.min_report_tokens,
                            split_seed=cfg.data.split_seed, split_dir=split_dir, check_images=check_images,
                            require_images=not text_only,
                            candidate_negatives=cfg.data.candidate_negatives)
    except DataError as err:
        return None, str(err)
    return read, "text-only" if text_only else None


@command("check-data", "read a data root through the adapters and print, per dataset, what was "
         "found and what was dropped and why (no training)", _args)
def check_data(cfg: Config, args: argparse.Namespace) -> int:
    from unimed.data.adapters import find_datasets
    from unimed.data.splits import leaking_patients

    if args.root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.root))
    root = Path(cfg.data.root)
    if not root.is_dir():
        where = "" if root.is_absolute() else f", {root.absolute()} from the working folder"
        raise ConfigError(f"data root not found: {root} (data.root or --root{where})")
    names = ([n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets is not None
             else find_datasets(root))
    if args.datasets is not None and not names:  # "" or "," checked every dataset, or said none was there
        raise ConfigError(f"--datasets {args.datasets!r} names no dataset: give names separated by "
                          "commas, or leave the option out to check every dataset under the root")
    if not names:
        raise ConfigError(f"no dataset under {root}: no official layout folder and no sub-folder "
                          "with a records.csv / records.jsonl (see docs/LAYOUTS.md)")
    rows, problems, failed, skipped = [], [], False, False
    for name in names:
        read, note = check_dataset(name, cfg, check_images=not args.no_image_check)
        if read is None:
            rows.append([name, "FAILED", "-", "-", "-", "-", "-", "-"])
            problems.append(f"{name}: {note}")
            failed = True
            continue
        summary = read.summary()
        bad = {reason: read.dropped[reason] for reason in read.examples}
        filtered = {k: v for k, v in read.dropped.items() if k not in bad}
        keys = [(r.image_path.as_posix() if r.image_path else r.study_id, r.patient_id, r.split)
                for r in read.records]
        leaking = leaking_patients(keys)
        rows.append([name + (f" ({note})" if note else ""), str(len(read.records)),
                     _counts(summary["split"]), _counts(summary["language"]), _counts(summary["site"]),
                     str(len(summary["labels"])), _counts(filtered), _counts(bad)])
        for reason, messages in read.examples.items():
            shown = "".join(f"\n  {m}" for m in messages)
            problems.append(f"{name}: {bad[reason]} x {reason}"
                            f"{', e.g.' if bad[reason] > len(messages) else ':'}{shown}")
        if leaking:
            problems.append(f"{name}: {len(leaking)} patient(s) in more than one split, e.g. {leaking[:3]}")
        failed, skipped = failed or bool(bad) or bool(leaking), skipped or bool(bad)
    print_table(f"Datasets under {root}, read through the adapters (bad rows skipped and counted)",
                ["dataset", "records", "split", "language", "site", "label columns", "filtered",
                 "bad input (skipped)"], rows)
    for line in problems:
        print(line)
    for setting, configured in (("data.pretrain_datasets", cfg.data.pretrain_datasets),
                                ("data.text_datasets", cfg.data.text_datasets)):
        absent = [name for name in configured if name not in names]
        if absent and args.datasets is None:
            print(f"NOTE: {setting} names {', '.join(absent)}, not under {root}: the stages that read "
                  f"{'it' if len(absent) == 1 else 'them'} would stop there")
    print("OK: every row read" if not failed else
          f"{len(problems)} problem(s); fix them"
          + (", or set data.on_error=skip to train without the rows skipped here" if skipped else ""))
    return 1 if failed else 0
