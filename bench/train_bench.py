"""Ray Train throughput of both NTF stages through the whole ``ntf-ray train`` path.

Synthetic images (``ntf-ray synth``) are streamed through the same path as ``ntf-ray
train``: Ray Data reads them, then either Ray Data's CPU tasks decode and augment them
(``tasks``) or the train workers do, batched on their device (``worker``, the default on
GPUs); the workers run the core's epoch functions with ``gather=True``. Each stage runs
``--epochs`` epochs; the first warms up (worker start, Ray Data tasks) and the steady
figure is the mean of the later ones, as the workers report them (global images over the
epoch's wall time). Per epoch it also prints what the workers waited for: the first batch
(the input pipeline's start-up) and every batch (``input wait``, the share of the epoch the
training loop sat waiting for input).

    python bench/train_bench.py                              # CPU: 1 and 2 workers, tasks vs worker
    python bench/train_bench.py --n 2000 --epochs 4
    python bench/train_bench.py --gpus                       # one GPU: ResNet-50, 224 px, batch 256, JPEGs

``--gpus`` trains the paper's network (``jobs/configs/paper.yaml``, no pretrained weights)
on ``--n`` 256 px JPEGs with one worker per GPU, then times the engine's own step on the
same card in the same process (``bench/train_step_bench.py``'s batches, made on the device
up front), and prints the whole path's steady rate against it. GPU utilisation is sampled
with ``nvidia-smi`` while each stage trains, when it is there.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

from ntf_ray.ray_edge import runtime
from ntf_ray.ray_edge import train as ray_train
from ntf_ray.synth import make_synthetic
from ntf_ray.training.config import load_config
from ntf_ray.training.datasets import manifest_table, write_manifest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ntf_ray" / "training" / "configs" / "smoke.yaml"
PAPER = ROOT / "ntf_ray" / "training" / "configs" / "paper.yaml"


class GpuSampler:
    """``nvidia-smi``'s utilisation.gpu every ``interval`` s in a thread (nothing without it)."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.samples, self.stop = interval, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def summary(self) -> str:
        if not self.samples:
            return "GPU utilisation: not sampled"
        busy = sum(s >= 50 for s in self.samples) / len(self.samples)
        return (f"GPU utilisation over {len(self.samples)} samples: mean {statistics.mean(self.samples):.0f}%, "
                f"{busy:.0%} of samples >= 50%")


def run(stage: int, workers: int, augment: str, manifest: str, output: str, args) -> dict:
    if args.gpus:
        cfg = load_config(PAPER, ["pretrained=none", f"epochs_stage1={args.epochs}", f"epochs_stage2={args.epochs}",
                                  f"batch_size={args.batch}"])
    else:
        cfg = load_config(SMOKE, [f"epochs_stage1={args.epochs}", f"epochs_stage2={args.epochs}",
                                  f"batch_size={args.batch}", f"backbone={args.backbone}"])
    spec = ray_train.RunSpec(manifest=manifest, output=output, num_workers=workers, use_gpu=args.gpus, augment=augment,
                             cpus_per_worker=args.cpus_per_worker, run_name=f"bench-{augment}-w{workers}",
                             num_to_keep=args.epochs)
    start = time.perf_counter()
    with GpuSampler() as gpu:
        result = ray_train.run_stage(stage, cfg, spec)
    wall = time.perf_counter() - start
    # One checkpoint per epoch is kept, each with that epoch's metrics (epoch is 0-based).
    epochs = sorted((m for _, m in result.best_checkpoints or []), key=lambda m: m["epoch"])
    later = [m["images_per_s"] for m in epochs if m["epoch"] >= 1]
    if not later:
        raise RuntimeError(f"stage {stage}: no epoch after the warm-up reported metrics: {result.metrics}")
    return {"steady": sum(later) / len(later), "wall": wall, "epochs": epochs, "gpu": gpu.summary()}


def engine_step(stage: int, args) -> float:
    """The engine's own step on this GPU: images/s of stage 1 (views/s / 2) or stage 2."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from train_step_bench import batches_stage1, batches_stage2, timed

    from ntf_ray.nn.model import Stage1Model, Stage2Model, build_encoder
    from ntf_ray.training.engine import make_optimizer, prepare_stage2, train_stage1_epoch, train_stage2_epoch

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    kw = dict(device=device, amp=True, channels_last=True, log_every=0)
    s1 = Stage1Model(build_encoder("resnet50"), 128).to(device).to(memory_format=torch.channels_last)
    if stage == 1:
        opt = make_optimizer(s1.parameters(), lr=0.1)
        train_stage1_epoch(s1, batches_stage1(3, args.batch, 224, device), opt, epoch=0, **kw)
        _, secs = timed(lambda: train_stage1_epoch(s1, batches_stage1(15, args.batch, 224, device), opt, epoch=1, **kw),
                        device)
    else:
        s2 = Stage2Model.from_stage1(s1, 128).to(device)
        opt = make_optimizer(prepare_stage2(s2), lr=0.1)
        train_stage2_epoch(s2, batches_stage2(3, args.batch, 224, 32, device), opt, epoch=0, **kw)
        _, secs = timed(lambda: train_stage2_epoch(s2, batches_stage2(15, args.batch, 224, 32, device), opt, epoch=1,
                                                   **kw), device)
    return args.batch * 15 / secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", action="store_true", help="one GPU per worker, ResNet-50 at 224 px (see above)")
    p.add_argument("--n", type=int, help="synthetic images in all, half real (default 800; 14,000 with --gpus)")
    p.add_argument("--size", type=int, help="image side in pixels (default 64; 256 with --gpus)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per stage, the first one warms up (default 3)")
    p.add_argument("--batch", type=int, help="batch per worker (default 32; 256 with --gpus)")
    p.add_argument("--backbone", default="tiny", help="CPU runs only (default tiny)")
    p.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2; 1 with --gpus)")
    p.add_argument("--augment-on", nargs="+", choices=("tasks", "worker"),
                   help="where to decode and augment, each timed (default tasks worker; worker with --gpus)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = p.parse_args()
    gpu_defaults = dict(n=14000, size=256, batch=256, workers=[1], augment_on=["worker"])
    cpu_defaults = dict(n=800, size=64, batch=32, workers=[1, 2], augment_on=["tasks", "worker"])
    for key, value in (gpu_defaults if args.gpus else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch only warms up")
    logging.basicConfig(level=logging.WARNING)

    import torch

    card = torch.cuda.get_device_name(0) if args.gpus and torch.cuda.is_available() else "none"
    print(f"host: {platform.machine()}, {os.cpu_count()} cores; GPU {card}; torch {torch.__version__}; "
          f"ray {ray.__version__}; {'resnet50 bf16' if args.gpus else args.backbone}, {args.n} "
          f"{'JPEG' if args.gpus else 'PNG'} images of {args.size} px, batch {args.batch} per worker, "
          f"{args.epochs} epochs/stage", flush=True)
    runtime.init_local_ray()
    figures: dict[tuple[int, str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        records = make_synthetic(Path(tmp, "data"), n_real=args.n * 5 // 7 if args.gpus else args.n // 2,
                                 n_fake=args.n - (args.n * 5 // 7 if args.gpus else args.n // 2), size=args.size,
                                 seed=0, image_format="jpeg" if args.gpus else "png", splits={"train": 1.0})
        manifest = str(Path(tmp, "data", "manifest.parquet"))
        write_manifest(manifest_table(records), manifest)
        for augment in args.augment_on:
            for workers in args.workers:
                output = str(Path(tmp, f"out-{augment}-w{workers}"))
                for stage in (1, 2):
                    got = run(stage, workers, augment, manifest, output, args)
                    figures[(stage, augment, workers)] = got["steady"]
                    unit = "images/s (2 views each)" if stage == 1 else "images/s"
                    print(f"stage {stage}, {workers} worker(s), augment on {augment}: {got['steady']:8.1f} {unit} "
                          f"steady; stage wall time {got['wall']:.1f} s; {got['gpu']}", flush=True)
                    for m in got["epochs"]:
                        print(f"  epoch {m['epoch'] + 1}: {m['images_per_s']:8.1f} images/s over {m['seconds']:.1f} s; "
                              f"first batch after {m.get('first_batch_s', float('nan')):.1f} s; input wait "
                              f"{m.get('input_wait_share', float('nan')):.0%}"
                              + (f"; worker set-up {m['setup_s']:.1f} s" if "setup_s" in m else ""), flush=True)
    ray.shutdown()
    for stage in (1, 2):
        for augment in args.augment_on:
            base = min(args.workers)
            for workers in args.workers:
                if workers != base:
                    ratio = figures[(stage, augment, workers)] / figures[(stage, augment, base)]
                    print(f"scaling stage {stage}, augment on {augment}: {workers} workers / {base} = {ratio:.2f}x")
        if "tasks" in args.augment_on and "worker" in args.augment_on:
            for workers in args.workers:
                ratio = figures[(stage, "worker", workers)] / figures[(stage, "tasks", workers)]
                print(f"stage {stage}, {workers} worker(s): augment on worker / on tasks = {ratio:.2f}x")
    if args.gpus:
        for stage in (1, 2):
            step = engine_step(stage, args)
            whole = figures[(stage, args.augment_on[0], args.workers[0])]
            unit = "views/s" if stage == 1 else "images/s"
            k = 2 if stage == 1 else 1
            print(f"stage {stage}: engine step {k * step:,.0f} {unit}; whole ntf-ray train path {k * whole:,.0f} "
                  f"{unit} per GPU = {whole / step:.0%} of the step", flush=True)


if __name__ == "__main__":
    main()
