"""`unimed phantom`: write the phantom world in every layout, then read it back through the adapters."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unimed.commands import command, holding, run_dir
from unimed.commands.tables import print_table
from unimed.config import Config

log = logging.getLogger(__name__)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preview", action="store_true", help="also write a contact-sheet PNG")


def read_back(cfg: Config, root: Path, *, progress: bool) -> dict:
    """Every dataset of the world read through its adapter: dataset name -> DatasetRead."""
    from unimed.data.adapters import DATASET_FOLDERS, load_dataset
    from unimed.phantom.world import SPLIT_DIR

    return {
        name: load_dataset(
            name,
            root / folder,
            on_error=cfg.data.on_error,
            min_report_tokens=cfg.data.min_report_tokens,
            split_seed=cfg.data.split_seed,
            split_dir=root / SPLIT_DIR,
            progress=progress,
        )
        for name, folder in DATASET_FOLDERS.items()
    }


def _positives(summary: dict, name: str) -> int | None:
    """How many records the adapter read as positive for `name` (a label or a class target)."""
    if name in summary["labels"]:
        return summary["labels"][name]["positive"]
    return summary["target"].get(name)


def compare_with_manifest(read, expected, min_report_tokens: int) -> list[str]:
    """Differences between an adapter's read-back and what the generator wrote (empty when equal).

    Every frontal image must come back as a record unless the report-length filter dropped it; the
    per-site, per-language and per-label counts are compared where that filter dropped nothing.
    """
    summary = read.summary()
    filtered = read.dropped.get(f"report under {min_report_tokens} tokens", 0)
    if len(read.records) + filtered != expected.views["frontal"]:
        return [f"{len(read.records)} records + {filtered} filtered, "
                f"{expected.views['frontal']} frontal images written"]
    if filtered:
        return []
    problems = []
    if "unset" not in summary["site"] and summary["site"] != expected.sites:
        problems.append(f"site counts {summary['site']} != written {expected.sites}")
    if "unset" not in summary["language"] and summary["language"] != expected.languages:
        problems.append(f"language counts {summary['language']} != written {expected.languages}")
    for name, count in expected.positives.items():
        got = _positives(summary, name)
        if got is not None and got != count:
            problems.append(f"'{name}': {got} positive, {count} written")
    return problems


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "-"


def _summary_rows(reads: dict, manifest, min_report_tokens: int) -> tuple[list[list[str]], list[str]]:
    by_dataset = {m.dataset: m for m in manifest.datasets.values()}
    rows, failures = [], []
    for name, read in reads.items():
        summary = read.summary()
        problems = compare_with_manifest(read, by_dataset[name], min_report_tokens)
        failures += [f"{name}: {p}" for p in problems]
        rows.append([
            name, str(len(read.records)), _fmt(summary["split"]), _fmt(summary["language"]),
            _fmt(summary["site"]), _fmt(summary["view"]), _fmt(read.dropped),
            "matches" if not problems else f"{len(problems)} difference(s)",
        ])
    return rows, failures


def _prevalence_rows(reads: dict) -> list[list[str]]:
    rows = []
    for name, read in reads.items():
        summary = read.summary()
        labels = sorted(summary["labels"].items(), key=lambda kv: -kv[1]["positive"])
        n = max(len(read.records), 1)
        text = ", ".join(f"{k} {v['positive'] / n:.0%}" for k, v in labels if v["positive"])
        if not labels and set(summary["target"]) != {"unset"}:
            text = _fmt(summary["target"])
        boxes = sum(len(r.boxes) for r in read.records)
        masks = sum(r.mask_rle not in (None, "-1") for r in read.records)
        rows.append([name, text or "-", str(boxes), str(masks)])
    return rows


def read_back_ct(cfg: Config, root: Path, manifest, *, progress: bool) -> tuple[list[list[str]], list[str]]:
    """The 3D layouts read through their adapters: table rows and differences from the CT manifest.
    The datasets read from another's folder (LUNA16's candidates) are read too, so that their split
    files are written with the world's, and listed without a comparison (the manifest counts
    volumes)."""
    from unimed.data.adapters import SHARED_FOLDERS, VOLUME_FOLDERS, load_dataset
    from unimed.phantom.world import SPLIT_DIR

    rows, failures = [], []
    for name, folder in {**VOLUME_FOLDERS, **SHARED_FOLDERS}.items():
        read = load_dataset(name, root / folder, on_error=cfg.data.on_error,
                            min_report_tokens=cfg.data.min_report_tokens, split_seed=cfg.data.split_seed,
                            split_dir=root / SPLIT_DIR, progress=progress)
        summary, expected = read.summary(), manifest.datasets[folder]
        row = [name, str(len(read.records)), _fmt(summary["split"]), _fmt(summary["language"]),
               _fmt(expected.sites), _fmt(read.dropped)]
        if name in SHARED_FOLDERS:
            rows.append([*row, f"rows of {folder}'s table"])
            continue
        filtered = read.dropped.get(f"report under {cfg.data.min_report_tokens} tokens", 0)
        if len(read.records) + filtered != expected.studies:
            failures.append(f"{name}: {len(read.records)} records + {filtered} filtered, "
                            f"{expected.studies} volumes written")
        rows.append([*row, "matches" if len(read.records) + filtered == expected.studies else "differs"])
    return rows, failures


@command("phantom", "generate the phantom world in every dataset layout and read it back", _add_args)
def phantom(cfg: Config, args: argparse.Namespace) -> int:
    from unimed.phantom.world import make_root, write_world

    root = Path(cfg.phantom.root)
    make_root(root)  # a root that cannot be a folder is named by its key before it is held
    with holding(root, "phantom world", setting="phantom.root", logged=False):  # a world is its files alone
        out = run_dir(cfg)
        manifest = write_world(cfg.phantom, progress=args.progress)
        if args.preview:
            from unimed.phantom.preview import write_preview

            print(f"preview: {write_preview(cfg.phantom, out / 'phantom_preview.png')}")
        reads = read_back(cfg, root, progress=args.progress)
        rows, failures = _summary_rows(reads, manifest, cfg.data.min_report_tokens)
        print_table(
            f"Phantom world at {root}, read back through the adapters",
            ["dataset", "records", "split", "language", "site", "view", "dropped", "vs generated"],
            rows,
        )
        print_table(
            "Finding prevalence (share of records labelled positive), boxes and masks",
            ["dataset", "prevalence", "boxes", "masks"],
            _prevalence_rows(reads),
        )
        if cfg.phantom.ct.enabled:
            from unimed.phantom.ct.world import write_ct_world

            ct_manifest = write_ct_world(cfg.phantom, progress=args.progress)
            ct_rows, ct_failures = read_back_ct(cfg, root, ct_manifest, progress=args.progress)
            failures += ct_failures
            print_table(
                f"Phantom CT world at {root} ({'x'.join(map(str, cfg.phantom.ct.shape))} volumes), read back",
                ["dataset", "records", "split", "language", "sites written", "dropped", "vs generated"],
                ct_rows,
            )
        for failure in failures:
            log.error("read-back differs from what was generated: %s", failure)
        return 1 if failures else 0
