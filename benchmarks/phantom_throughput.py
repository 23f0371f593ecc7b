"""Phantom world throughput: studies/s per core, generation alone and generation + writing, per layout.

    python benchmarks/phantom_throughput.py --size 256 --studies 48 --workers 1 2

Prints a table; the target is >= 50 two-dimensional studies/s per core at 256x256 with images,
reports and labels on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from unimed.phantom.config import PhantomConfig
from unimed.phantom.generator import generate_study
from unimed.phantom.writers import LAYOUTS, LayoutWriter
from unimed.phantom.world import write_world


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: per-core rates that stay honest on a busy machine."""
    children = os.times()  # workers' CPU time, counted once they have been joined
    return time.process_time() + children.children_user + children.children_system


def time_layout(cfg: PhantomConfig, writer_cls: type[LayoutWriter], n: int, dest: Path) -> tuple[float, float]:
    """(CPU seconds to generate n studies, CPU seconds to generate and write them) for one layout."""
    writer = writer_cls(cfg, dest)

    def generate(index: int):
        return generate_study(cfg, writer.dataset, index, site=writer.site(index),
                              frontal_only=writer.frontal_only, enrich=writer.enrich)

    start = cpu_seconds()
    for index in range(n):
        generate(index)
    generated = cpu_seconds() - start
    start = cpu_seconds()
    rows = []
    for index in range(n):
        study = generate(index)
        rows += writer.write_study(study, writer.split(study)).rows
    writer.write_tables(rows)
    return generated, cpu_seconds() - start


def world_config(cfg: PhantomConfig, n: int, workers: int) -> PhantomConfig:
    counts = {w.count_field: n for w in LAYOUTS}
    return dataclasses.replace(cfg, workers=workers, **counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--studies", type=int, default=48, help="studies per layout")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for the whole world")
    args = parser.parse_args()
    cfg = PhantomConfig(image_size=args.size, seed=0)
    n = args.studies
    for site in ("boston", "alicante"):  # load language packs and caches outside the timed loops
        generate_study(cfg, "warm-up", 0, site=site)
    print(f"phantom throughput at {args.size}x{args.size}, {n} studies per layout, "
          "studies per CPU-second (= per core)\n")
    print(f"| {'layout':<14} | {'generate':>9} | {'gen+write':>9} | {'write ms/study':>14} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 16}|")
    total_gen = total_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for writer_cls in LAYOUTS:
            generated, written = time_layout(cfg, writer_cls, n, Path(tmp) / writer_cls.folder)
            total_gen, total_all = total_gen + generated, total_all + written
            print(f"| {writer_cls.folder:<14} | {n / generated:9.1f} | {n / written:9.1f} | "
                  f"{1000 * (written - generated) / n:14.2f} |")
        count = n * len(LAYOUTS)
        print(f"| {'all layouts':<14} | {count / total_gen:9.1f} | {count / total_all:9.1f} | "
              f"{1000 * (total_all - total_gen) / count:14.2f} |\n")
        print(f"| {'write_world':<14} | {'workers':>9} | {'wall st/s':>9} | {'per CPU-s':>14} |")
        print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 16}|")
        for workers in args.workers:
            world_cfg = world_config(cfg, n, workers)
            wall, cpu = time.perf_counter(), cpu_seconds()
            write_world(world_cfg, Path(tmp) / f"world{workers}", progress=False)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            print(f"| {'':<14} | {workers:9d} | {count / wall:9.1f} | {count / cpu:14.1f} |")


if __name__ == "__main__":
    main()
