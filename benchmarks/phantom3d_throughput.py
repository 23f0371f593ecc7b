"""Phantom CT world throughput: volumes per CPU-second, generation alone and generation + writing,
per 3D layout, and the wall time of the whole 3D world.

    python benchmarks/phantom3d_throughput.py --volumes 8 --shape 32 128 128

Prints a table. CPU seconds (this process and its joined workers) keep per-core rates honest on a
busy machine; the last line is the wall time of `write_ct_world` at the default study counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.world import write_ct_world
from unimed.phantom.ct.writers import CT_LAYOUTS


def cpu_seconds() -> float:
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8, help="volumes timed per layout")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--world", action="store_true", help="also write the whole 3D world at default counts")
    args = parser.parse_args()
    cfg = PhantomConfig(ct=CTConfig(enabled=True, shape=tuple(args.shape)))
    print(f"{'layout':<15}{'volumes':>8}{'gen vol/CPU-s':>15}{'gen+write vol/CPU-s':>21}{'MB written':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for writer_cls in CT_LAYOUTS:
            writer = writer_cls(cfg, Path(tmp) / writer_cls.folder)
            start = cpu_seconds()
            studies = [generate_ct_study(cfg.ct, cfg.seed, writer.dataset, i, site=writer.site(i),
                                         enrich=writer.enrich) for i in range(args.volumes)]
            generated = cpu_seconds() - start
            for study in studies:
                writer.write_study(study)
            total = cpu_seconds() - start
            size = sum(p.stat().st_size for p in writer.dest.rglob("*") if p.is_file()) / 2**20
            print(f"{writer_cls.folder:<15}{args.volumes:>8}{args.volumes / generated:>15.2f}"
                  f"{args.volumes / total:>21.2f}{size:>12.1f}")
        if args.world:
            world = dataclasses.replace(cfg, root=str(Path(tmp) / "world"))
            start, cpu = time.perf_counter(), cpu_seconds()
            manifest = write_ct_world(world, progress=False)
            n = sum(d.studies for d in manifest.datasets.values())
            print(f"whole 3D world: {n} volumes written in {time.perf_counter() - start:.1f} s wall, "
                  f"{cpu_seconds() - cpu:.1f} CPU-s ({n / (cpu_seconds() - cpu):.2f} volumes/CPU-s)")


if __name__ == "__main__":
    main()
