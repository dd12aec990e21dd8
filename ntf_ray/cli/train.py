"""The commands that make data and detectors: ``index`` (a manifest of a folder), ``synth`` (test
data), ``demo`` (the whole product on this machine) and ``train`` (both NTF stages on Ray Train)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ntf_ray.cli.arguments import (
    count,
    cpus_reserved,
    epochs,
    failures,
    positive_count,
    seed,
    size,
    spec_from_args,
    workers,
)
from ntf_ray.nn.variants import VARIANTS


def cmd_index(args: argparse.Namespace) -> int:
    from ntf_ray.training.datasets import index_root, write_manifest

    table = index_root(args.root, default_split=args.split, options=args.storage_options)
    write_manifest(table, args.out, args.storage_options)
    labels = table.column("label").to_pylist()
    print(f"indexed {table.num_rows} images ({labels.count(0)} real, {labels.count(1)} fake) -> {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ntf_ray.synth import make_synthetic
    from ntf_ray.training.datasets import manifest_table, write_manifest

    records = make_synthetic(args.out, n_real=args.n_real, n_fake=args.n_fake, size=args.size, seed=args.seed,
                             image_format=args.format, generators=_generators(args.generators))
    manifest = str(Path(args.out) / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    print(f"wrote {len(records)} synthetic images (test data, not a benchmark) to {args.out}; manifest {manifest}")
    return 0


def _generators(text: str) -> list[str]:
    """``--generators``: names, or the groups ``all``, ``upsampling``, ``full_res``, ``headroom``."""
    from ntf_ray.synth import ALL_GENERATORS, FAMILY_KIND, KNOWN_GENERATORS

    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "all":
            out += ALL_GENERATORS
        elif name in set(FAMILY_KIND.values()):
            out += [g for g in KNOWN_GENERATORS if FAMILY_KIND[g] == name]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def cmd_demo(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge.demo import run_demo

    run_demo(work=args.work, n=args.n, seed=args.seed, overrides=args.set)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import train as ray_train
    from ntf_ray.training.config import load_config

    cfg = load_config(args.config, _train_overrides(args))
    spec = spec_from_args(ray_train.RunSpec, args, run_name=args.run_name or ray_train.new_run_name(),
                          endpoint=args.storage_options.endpoint_url)
    runtime.init_local_ray()
    print(f"training {cfg.variant} stage {args.stage} as run {spec.run_name!r} with {spec.num_workers} workers "
          f"({'GPU' if spec.use_gpu else 'CPU'}); outputs in {spec.output}", flush=True)
    metrics = ray_train.train(args.stage, cfg, spec)
    for stage, m in metrics.items():
        print(f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    if args.stage in ("2", "both"):
        from ntf_ray import storage

        print(f"detector artifact: {storage.join(args.output, ray_train.DETECTOR)}")
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """``--set KEY=VALUE`` items, then the config fields that have their own flags."""
    overrides = list(args.set)
    for flag in ("backbone", "pretrained", "epochs_stage1", "epochs_stage2", "batch_size", "variant"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{flag}={value}")
    if args.use_gpu:
        overrides.append("device=cuda")
    return overrides


def add_train_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--stage", choices=("1", "2", "both"), default="both",
                   help="1: natural-trace learning on real images; 2: soft contrastive transfer from OUTPUT/stage1; "
                        "both: 1 then 2 (default)")
    s.add_argument("--manifest", required=True, help="dataset manifest (.parquet/.csv, local or s3://)")
    s.add_argument("--output", required=True,
                   help="output folder (local or s3://): config.json, stage1/, detector/, ray/ (checkpoints)")
    s.add_argument("--config", help="YAML with TrainConfig fields (e.g. ntf_ray/training/configs/paper.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field; repeatable (e.g. --set lr=0.05 --set variant=no-orth)")
    s.add_argument("--variant", choices=tuple(VARIANTS),
                   help="which of the paper's detectors to train (overrides the config; default ntf): "
                        + "; ".join(f"{v.name}: {v.summary}" for v in VARIANTS.values()))
    s.add_argument("--num-workers", type=workers, default=2, help="Ray Train workers (default 2)")
    s.add_argument("--gpus", dest="use_gpu", action="store_true", help="one GPU per worker (default: CPU)")
    s.add_argument("--cpus-per-worker", type=cpus_reserved, default=1.0, help="CPUs reserved per worker (default 1)")
    s.add_argument("--augment-on", dest="augment", choices=("auto", "tasks", "worker"), default="auto",
                   help="where images are decoded and augmented: Ray Data's CPU tasks, or each train worker, "
                        "batched on its device (default auto: the worker with --gpus, else the tasks)")
    s.add_argument("--backbone", choices=("resnet50", "resnet18", "tiny"), help="encoder (overrides the config)")
    s.add_argument("--pretrained", help="imagenet, none, or a local weights file (overrides the config)")
    s.add_argument("--epochs-stage1", type=epochs, help="stage-1 epochs (overrides the config)")
    s.add_argument("--epochs-stage2", type=epochs, help="stage-2 epochs (overrides the config)")
    s.add_argument("--batch-size", type=positive_count, help="images per worker per step (overrides the config)")
    s.add_argument("--run-name", help="run name; submitting again under the same name resumes from its "
                                      "latest checkpoint (default: a new random name)")
    s.add_argument("--storage", dest="storage_path", metavar="STORAGE", help="Ray Train storage for checkpoints (default OUTPUT/ray)")
    s.add_argument("--max-failures", type=failures, default=0,
                   help="worker failures to recover from, each from the latest checkpoint (default 0; -1: no limit)")


def add_index(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("index", parents=endpoint,
                       help="build a dataset manifest from a CNNDetection- or GenImage-layout folder",
                       description="Write a manifest (uri, label, generator, split) for ROOT/[split/]<generator>/.../{0_real,1_fake}/* "
                                   "(CNNDetection) or ROOT/[<generator>/...]/{train,val}/{ai,nature}/* (GenImage; its val is "
                                   "written as split test). The output format follows the extension: .parquet or .csv.")
    s.add_argument("root", help="local folder or s3://bucket/prefix, in the CNNDetection or GenImage layout")
    s.add_argument("--out", required=True, help="manifest to write (.parquet or .csv; local path or s3://)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split for CNNDetection files not under a train/val/test folder (default: test)")
    s.set_defaults(func=cmd_index)


def add_synth(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("synth", help="make a synthetic real/fake image set (test data, not a benchmark)",
                       description="Procedurally generated TEST DATA for the demo, tests and benchmarks: 'real' images with "
                                   "natural-image statistics and camera-like noise; 'fake' ones from upsampling generators "
                                   "(tconv, nnconv, bilinear_conv: the default) or full-resolution ones that keep the reals' "
                                   "detail and differ by one trace (fingerprint: a faint periodic pattern; noise_shape: "
                                   "coloured, channel-independent noise). It says nothing about accuracy on real-world "
                                   "images. Writes OUT/<split>/<generator>/{0_real,1_fake}/* and OUT/manifest.parquet "
                                   "(family column: upsampling or full_res); deterministic by --seed.")
    s.add_argument("out", help="output folder")
    s.add_argument("--n-real", type=count, default=200, help="number of real images (default 200)")
    s.add_argument("--n-fake", type=count, default=200, help="number of fake images (default 200)")
    s.add_argument("--size", type=size, default=64, help="square image side in pixels (default 64)")
    s.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=("png", "jpeg"), default="png", help="file format (default png)")
    s.add_argument("--generators", default="upsampling",
                   help="comma-separated fake generators, or all / upsampling / full_res (default upsampling: "
                        "tconv,nnconv,bilinear_conv)")
    s.set_defaults(func=cmd_synth)


def add_demo(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("demo", help="run the whole product on this machine: synthetic data, training, a scan",
                       description="Make synthetic data in a work folder, train both NTF stages on local Ray with the "
                                   "tiny backbone on the CPU, evaluate the detector on the held-out split (a report in "
                                   "WORK/report), and scan the folder into a score table. A few minutes on a laptop.")
    s.add_argument("--work", default="ntf-work", help="work folder (default ./ntf-work)")
    s.add_argument("--n", type=positive_count, default=1000, help="real and fake images each (default 1000)")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training config field")
    s.set_defaults(func=cmd_demo)


def add_train(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("train", parents=endpoint,
                       help="train both NTF stages on Ray Train (local Ray, or a cluster via RAY_ADDRESS)",
                       description="Train NTF with Ray Train: data streamed with Ray Data from the manifest, "
                                   "checkpoints every epoch, resumable under the same --run-name. The resolved "
                                   "config is written to OUTPUT/config.json; the detector to OUTPUT/detector.")
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)
