"""Ray Train throughput of both NTF stages: 1 vs 2 CPU workers, tiny backbone, local Ray.

Synthetic images (``ntf-ray synth``) are streamed through the same path as ``ntf-ray
train``: Ray Data reads, decodes and augments on CPU tasks, the workers run the core's
epoch functions with ``gather=True``. Each stage runs ``--epochs`` epochs; the first
warms up (worker start, Ray Data tasks, byte cache) and the figure is the mean images/s
of the later ones, as the workers report them (global images over the epoch's wall time).

    python bench/train_bench.py                 # 1 and 2 workers, 800 images, 64 px
    python bench/train_bench.py --n 2000 --epochs 4

The last lines print the scaling ratio (2 workers / 1 worker) per stage. On a machine
with few cores, Ray Data's decode tasks and the workers share the same cores, so the
ratio says how much of the machine the second worker can still use.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import ray

from ntf_ray import ray_train
from ntf_ray.config import load_config
from ntf_ray.datasets import manifest_table, write_manifest
from ntf_ray.synth import make_synthetic

SMOKE = Path(__file__).resolve().parents[1] / "ntf_ray" / "configs" / "smoke.yaml"


def run(stage: int, workers: int, manifest: str, output: str, args) -> tuple[float, float]:
    cfg = load_config(SMOKE, [f"epochs_stage1={args.epochs}", f"epochs_stage2={args.epochs}",
                              f"batch_size={args.batch}", f"backbone={args.backbone}"])
    spec = ray_train.RunSpec(manifest=manifest, output=output, num_workers=workers,
                             run_name=f"bench-w{workers}", num_to_keep=args.epochs)
    start = time.perf_counter()
    result = ray_train.run_stage(stage, cfg, spec)
    wall = time.perf_counter() - start
    # One checkpoint per epoch is kept, each with that epoch's metrics (epoch is 0-based).
    later = [m["images_per_s"] for _, m in result.best_checkpoints or [] if m["epoch"] >= 1]
    if not later:
        raise RuntimeError(f"stage {stage}: no epoch after the warm-up reported metrics: {result.metrics}")
    return sum(later) / len(later), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=800, help="synthetic images in all, half real (default 800)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per stage, the first one warms up (default 3)")
    p.add_argument("--batch", type=int, default=32, help="global batch size (default 32)")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch only warms up")
    logging.basicConfig(level=logging.WARNING)

    print(f"host: {platform.machine()}, {os.cpu_count()} cores; ray {ray.__version__}; "
          f"backbone {args.backbone}, {args.n} images of {args.size} px, batch {args.batch}, {args.epochs} epochs/stage")
    ray_train.init_local_ray()
    figures: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        records = make_synthetic(Path(tmp, "data"), n_real=args.n // 2, n_fake=args.n - args.n // 2,
                                 size=args.size, seed=0)
        manifest = str(Path(tmp, "data", "manifest.parquet"))
        write_manifest(manifest_table(records), manifest)
        for workers in args.workers:
            output = str(Path(tmp, f"out-w{workers}"))
            for stage in (1, 2):
                rate, wall = run(stage, workers, manifest, output, args)
                figures[(stage, workers)] = rate
                unit = "images/s (2 views each)" if stage == 1 else "images/s"
                print(f"stage {stage}, {workers} worker(s): {rate:8.1f} {unit}; stage wall time {wall:.1f} s",
                      flush=True)
    base = min(args.workers)
    for stage in (1, 2):
        for workers in args.workers:
            if workers != base:
                ratio = figures[(stage, workers)] / figures[(stage, base)]
                print(f"scaling stage {stage}: {workers} workers / {base} worker = {ratio:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
