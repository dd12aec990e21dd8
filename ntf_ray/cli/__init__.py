"""``ntf-ray`` command line. Every entry point is ``main(argv=None)``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from ntf_ray import __version__
from ntf_ray.scan.spec import ScanSpec, format_summary
from ntf_ray.ray_edge import console
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS
from ntf_ray.errors import STALL_S
from ntf_ray.storage import DEFAULT_MAX_BYTES, DEFAULT_READ_AHEAD_BYTES
from ntf_ray.cli.review import add_evaluation_actor_arguments, add_review_commands
from ntf_ray.nn.variants import VARIANTS

log = logging.getLogger("ntf_ray")
#: The commands that run on Ray, and the argument naming the folder their log file goes under
#: (``FOLDER/_logs``, see ``ntf_ray.ray_edge.console``).
LOG_FOLDER = {"train": "output", "evaluate": "output", "calibrate": "output", "scan": "output",
              "moderate": "output", "demo": "work"}
#: The folder each command writes into, checked before any work starts (``_check_output_folder``).
OUTPUT_FOLDER = {**LOG_FOLDER, "explain": "output", "report": "output", "synth": "out"}


def cmd_index(args: argparse.Namespace) -> int:
    from ntf_ray.training.datasets import index_root, write_manifest

    table = index_root(args.root, default_split=args.split, options=args.storage_options)
    write_manifest(table, args.out, args.storage_options)
    labels = table.column("label").to_pylist()
    print(f"indexed {table.num_rows} images ({labels.count(0)} real, {labels.count(1)} fake) -> {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ntf_ray.training.datasets import manifest_table, write_manifest
    from ntf_ray.synth import make_synthetic

    records = make_synthetic(args.out, n_real=args.n_real, n_fake=args.n_fake, size=args.size, seed=args.seed,
                             image_format=args.format, generators=_generators(args.generators))
    manifest = str(Path(args.out) / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    print(f"wrote {len(records)} synthetic images (test data, not a benchmark) to {args.out}; manifest {manifest}")
    return 0


def _generators(text: str) -> list[str]:
    """``--generators``: names, or the groups ``all``, ``upsampling``, ``full_res``."""
    from ntf_ray.synth import ALL_GENERATORS, FAMILY_KIND

    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "all":
            out += ALL_GENERATORS
        elif name in set(FAMILY_KIND.values()):
            out += [g for g in ALL_GENERATORS if FAMILY_KIND[g] == name]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def cmd_train(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge import train as ray_train
    from ntf_ray.ray_edge import runtime
    from ntf_ray.training.config import load_config

    cfg = load_config(args.config, _train_overrides(args))
    spec = ray_train.RunSpec(
        manifest=args.manifest, output=args.output, num_workers=args.num_workers, use_gpu=args.gpus,
        cpus_per_worker=args.cpus_per_worker, augment=args.augment_on, run_name=args.run_name or ray_train.new_run_name(),
        storage_path=args.storage, max_failures=args.max_failures, endpoint=args.storage_options.endpoint_url,
    )
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
    if args.gpus:
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
    s.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2)")
    s.add_argument("--gpus", action="store_true", help="one GPU per worker (default: CPU)")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    s.add_argument("--augment-on", choices=("auto", "tasks", "worker"), default="auto",
                   help="where images are decoded and augmented: Ray Data's CPU tasks, or each train worker, "
                        "batched on its device (default auto: the worker with --gpus, else the tasks)")
    s.add_argument("--backbone", choices=("resnet50", "resnet18", "tiny"), help="encoder (overrides the config)")
    s.add_argument("--pretrained", help="imagenet, none, or a local weights file (overrides the config)")
    s.add_argument("--epochs-stage1", type=int, help="stage-1 epochs (overrides the config)")
    s.add_argument("--epochs-stage2", type=int, help="stage-2 epochs (overrides the config)")
    s.add_argument("--batch-size", type=int, help="images per worker per step (overrides the config)")
    s.add_argument("--run-name", help="run name; submitting again under the same name resumes from its "
                                      "latest checkpoint (default: a new random name)")
    s.add_argument("--storage", help="Ray Train storage for checkpoints (default OUTPUT/ray)")
    s.add_argument("--max-failures", type=int, default=0,
                   help="worker failures to recover from, each from the latest checkpoint (default 0)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ntf_ray import storage
    from ntf_ray.ray_edge import evaluate as ray_evaluate
    from ntf_ray.ray_edge import runtime

    spec = ray_evaluate.EvaluateSpec(
        model=args.model, manifest=args.manifest, output=args.output, split=None if args.split == "all" else args.split,
        families=args.families, perturb=args.perturb, embeddings=args.embeddings, threshold=args.threshold,
        seed=args.seed, batch_size=args.batch_size, max_actors=args.max_actors, gpus_per_actor=args.gpus_per_actor,
        endpoint=args.storage_options.endpoint_url,
    )
    runtime.init_local_ray()
    metrics = ray_evaluate.evaluate(spec, command=storage.redact(" ".join(["ntf-ray", *_without_endpoint(args.argv)])))
    print(ray_evaluate.format_summary(metrics))
    print(f"report: {storage.join(args.output, 'report.md')}", flush=True)
    return 0


def _without_endpoint(argv: list[str]) -> list[str]:
    """The command line as a report records it: without the S3 endpoint, which may name internal hosts."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--s3-endpoint":
            skip = True
        elif not item.startswith("--s3-endpoint="):
            out.append(item)
    return out


def cmd_score(args: argparse.Namespace) -> int:
    from ntf_ray.detector.score_files import score_files
    from ntf_ray.detector.scorer import Scorer

    if args.card:
        from ntf_ray.detector.artifact import load_artifact
        from ntf_ray.detector.model_card import render

        # rendered from the verified model.json, not read from the folder's MODEL_CARD.md
        print(render(load_artifact(args.model, options=args.storage_options).metadata()), flush=True)
    if not args.inputs:
        if args.card:
            return 0
        raise ValueError("nothing to score: give image files or s3:// objects (or --card for the model card)")
    scorer = Scorer.from_artifact(args.model, device=args.device, threshold=args.threshold,
                                  options=args.storage_options, decoder=args.decoder)
    for row in score_files(scorer, args.inputs, options=args.storage_options, max_bytes=args.max_bytes):
        print(json.dumps(row, allow_nan=False), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge.demo import run_demo

    run_demo(work=args.work, n=args.n, seed=args.seed, overrides=args.set)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.ray_edge import runtime

    spec = ScanSpec(
        model=args.model, output=args.output, input=args.input, manifest=args.manifest, run_id=args.run_id,
        incremental=args.incremental, threshold=args.threshold, pattern=args.glob, limit=args.limit,
        batch_size=args.batch_size, min_actors=args.min_actors, max_actors=args.max_actors,
        gpus_per_actor=args.gpus_per_actor, decoder=args.decoder, max_bytes=args.max_bytes,
        max_pixels=args.max_pixels, stall_s=args.stall_timeout or None,
        read_block_rows=args.read_block_rows, read_block_bytes=args.read_block_bytes, streams=args.streams,
        read_ahead_bytes=args.read_ahead, endpoint=args.storage_options.endpoint_url,
    )
    runtime.init_local_ray()
    result = ray_scan.scan(spec)
    print(format_summary(result.summary), flush=True)
    return 0


def add_scan_arguments(s: argparse.ArgumentParser, *, incremental_default: bool) -> None:
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="what to scan: an s3://bucket/prefix or a local folder (all files below it)")
    what.add_argument("--manifest", help="or: scan the uris of a manifest (.parquet/.csv, local or s3://)")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("--output", required=True,
                   help="score table root (local or s3://); rows go to OUTPUT/dt=YYYY-MM-DD/run_id=ID/")
    s.add_argument("--run-id", help="run id (default: UTC time + random suffix); re-using one replaces that run")
    if incremental_default:
        s.set_defaults(incremental=True)
    else:
        s.add_argument("--incremental", action="store_true",
                       help="score only objects whose (uri, etag, last-modified) has no final row from this model "
                            "in a completed run")
    s.add_argument("--glob", help="only object names matching this pattern, e.g. '*.jpg' (case-insensitive)")
    s.add_argument("--threshold", type=_threshold, help="decision threshold for is_fake (default: the artifact's)")
    s.add_argument("--batch-size", type=int, help="images per detector call (default 256 on GPUs, 64 on CPUs)")
    s.add_argument("--min-actors", type=int,
                   help="detector actors to start with (default: --max-actors, a fixed pool; fewer lets "
                        "Ray Data add actors as the queue grows)")
    s.add_argument("--max-actors", type=int,
                   help="most detector actors (default: four per GPU in the cluster, or 2 on CPU)")
    s.add_argument("--gpus-per-actor", type=float,
                   help="GPUs per detector actor (default: 0.25, four actors per GPU, when the cluster has GPUs; "
                        "else 0 = CPU)")
    add_decoder_argument(s)
    s.add_argument("--limit", type=_positive_count, metavar="N", help="scan at most N objects, N >= 1 (a trial run)")
    add_max_bytes_argument(s, "skip objects larger than this without reading them (error row too_large:)")
    s.add_argument("--max-pixels", type=_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images whose header declares more pixels (error row too_large:); default 100000000")
    s.add_argument("--read-block-rows", type=int, default=128, metavar="N",
                   help="objects per read task (default 128): smaller blocks reach the detectors sooner")
    s.add_argument("--read-block-bytes", type=_byte_size, default=64 * 1024**2, metavar="SIZE",
                   help="listed bytes per read task, at most (default 64MiB; one object larger than this goes alone)")
    s.add_argument("--read-ahead", type=_byte_size, default=DEFAULT_READ_AHEAD_BYTES, metavar="SIZE",
                   help="most bytes the scan holds in Ray's object store, read but not yet scored and written "
                        "(default 2GiB)")
    s.add_argument("--stall-timeout", type=_seconds, default=STALL_S, metavar="SECONDS",
                   help="stop a run that lists no object and stages no row for this long, giving its lease "
                        f"back (default {STALL_S:.0f}; 0 never)")
    s.add_argument("--streams", type=int, metavar="N",
                   help="batches each GPU detector actor scores at once, each on its own CUDA stream "
                        "(default 2; CPU actors score one at a time)")


def add_max_bytes_argument(s: argparse.ArgumentParser, what: str) -> None:
    """``--max-bytes``, one cap for every command that reads images: the scan's default."""
    s.add_argument("--max-bytes", type=_byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help=f"{what}; e.g. 1048576, 128MiB or 1GB; default 128MiB")


def add_decoder_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--decoder", choices=("auto", "pil", "nvjpeg", "nvimgcodec"), default="auto",
                   help="pil: every image through the CPU decoder; nvjpeg: plain JPEGs decoded in batches on the "
                        "detector's GPU, everything else on the CPU (scores differ slightly from pil's); "
                        "nvimgcodec: the same on the GPU's hardware JPEG engines, with Pillow's pixels "
                        "(pip install 'ntf-ray[nvimgcodec]'); auto (default): nvimgcodec on GPUs when installed, else "
                        "nvjpeg; pil on CPUs. The table's decoder column says which ran")


def _threshold(text: str) -> float:
    """``--threshold``: a score is P(fake), so a decision threshold is a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is a number in [0, 1] (scores are P(fake))")
    return value


def _positive_count(text: str) -> int:
    """A count of objects: a whole number >= 1 (0 or -1 would not mean "none" or "all" to a list slice)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def _pixels(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a pixel limit must be at least 1")
    return value


def _size(text: str) -> int:
    value = int(text)
    if value < 8:
        raise argparse.ArgumentTypeError("size must be >= 8 pixels")
    return value


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _byte_size(text: str) -> int:
    """A byte count: ``4096``, ``128MiB``, ``1.5GB`` (case-insensitive; KiB = 1024, KB = 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and _BYTE_UNITS.get(match.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes: give e.g. 1048576, 128MiB or 1GB")
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return value


def _endpoint_parser() -> argparse.ArgumentParser:
    """The ``--s3-endpoint`` every command that touches storage takes (``parents=[...]``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph, moto); default: AWS_ENDPOINT_URL")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ntf-ray", description="Find AI-generated images at scale (Natural Trace Forensics on Ray).")
    p.add_argument("--version", action="version", version=f"ntf-ray {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="ntf-ray's debug lines, and Ray's own logs on the terminal too (they always go to "
                        "OUTPUT/_logs); -vv: the storage libraries' debug lines too (botocore, s3fs, urllib3). "
                        "Credentials are redacted everywhere")
    sub = p.add_subparsers(dest="command", required=True)
    endpoint = [_endpoint_parser()]

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

    s = sub.add_parser("synth", help="make a synthetic real/fake image set (test data, not a benchmark)",
                       description="Procedurally generated TEST DATA for the demo, tests and benchmarks: 'real' images with "
                                   "natural-image statistics and camera-like noise; 'fake' ones from upsampling generators "
                                   "(tconv, nnconv, bilinear_conv: the default) or full-resolution ones that keep the reals' "
                                   "detail and differ by one trace (fingerprint: a faint periodic pattern; noise_shape: "
                                   "coloured, channel-independent noise). It says nothing about accuracy on real-world "
                                   "images. Writes OUT/<split>/<generator>/{0_real,1_fake}/* and OUT/manifest.parquet "
                                   "(family column: upsampling or full_res); deterministic by --seed.")
    s.add_argument("out", help="output folder")
    s.add_argument("--n-real", type=int, default=200, help="number of real images (default 200)")
    s.add_argument("--n-fake", type=int, default=200, help="number of fake images (default 200)")
    s.add_argument("--size", type=_size, default=64, help="square image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=("png", "jpeg"), default="png", help="file format (default png)")
    s.add_argument("--generators", default="upsampling",
                   help="comma-separated fake generators, or all / upsampling / full_res (default upsampling: "
                        "tconv,nnconv,bilinear_conv)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("demo", help="run the whole product on this machine: synthetic data, training, a scan",
                       description="Make synthetic data in a work folder, train both NTF stages on local Ray with the "
                                   "tiny backbone on the CPU, evaluate the detector on the held-out split (a report in "
                                   "WORK/report), and scan the folder into a score table. A few minutes on a laptop.")
    s.add_argument("--work", default="ntf-work", help="work folder (default ./ntf-work)")
    s.add_argument("--n", type=int, default=1000, help="real and fake images each (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training config field")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train", parents=endpoint,
                       help="train both NTF stages on Ray Train (local Ray, or a cluster via RAY_ADDRESS)",
                       description="Train NTF with Ray Train: data streamed with Ray Data from the manifest, "
                                   "checkpoints every epoch, resumable under the same --run-name. The resolved "
                                   "config is written to OUTPUT/config.json; the detector to OUTPUT/detector.")
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("scan", parents=endpoint,
                       help="score every object under a prefix (or in a manifest) into a Parquet table",
                       description="A Ray Data job: list, read, decode and score in detector actors, and write one "
                                   "row per object to OUTPUT/dt=YYYY-MM-DD/run_id=ID/ (then _summary.json and "
                                   "_SUCCESS). Unreadable objects get an error row; the run goes on.")
    add_scan_arguments(s, incremental_default=False)
    s.set_defaults(func=cmd_scan)

    s = sub.add_parser("moderate", parents=endpoint,
                       help="an incremental scan: only objects new or changed since the last runs",
                       description="`scan --incremental`: scores only objects whose (uri, etag, last-modified) has no "
                                   "final row from the same model in a completed earlier run under OUTPUT. Made to run "
                                   "on a schedule.")
    add_scan_arguments(s, incremental_default=True)
    s.set_defaults(func=cmd_scan)

    s = sub.add_parser("evaluate", parents=endpoint,
                       help="the paper's metrics of a detector on a labelled manifest split, with a report",
                       description="Score a manifest split through the scan's Ray Data path (clean and, with --perturb, "
                                   "at every perturbation level), join the labels, and write OUTPUT/report.md, "
                                   "metrics.json, scores.parquet and PNG figures: per generator AP, ACC, FPR, FNR (fake = "
                                   "positive, the artifact's threshold), the image-weighted average and mAP, family "
                                   "averages, robustness curves, PR curves, score histograms and a t-SNE map.")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("--manifest", required=True, help="labelled manifest (.parquet/.csv, local or s3://)")
    s.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="manifest split to evaluate (default test; all: every labelled row)")
    s.add_argument("--output", required=True, help="report folder (local or s3://)")
    s.add_argument("--families", nargs="+", default=[], metavar="FAMILY=GEN,GEN",
                   help="average per generator family, e.g. --families gan=progan,stylegan dm=ddpm,ldm "
                        "(default: the manifest's family column, if any)")
    s.add_argument("--perturb", nargs="+", default=[], metavar="KIND=LEVEL,LEVEL",
                   help="robustness: e.g. --perturb blur=0,1,2,3 jpeg=100,75,50,30 noise=0,0.01,0.02 scale=1,0.5,0.25 "
                        "(blur sigma in px, JPEG quality, noise sigma in [0, 1] units, down-scaling factor); seeded")
    s.add_argument("--embeddings", type=int, default=0, metavar="N",
                   help="t-SNE map of N clean test images' features, coloured by generator and label (default 0: none)")
    s.add_argument("--threshold", type=_threshold, help="decision threshold for ACC/FPR/FNR (default: the artifact's)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise perturbation and the t-SNE sample (default 0)")
    add_evaluation_actor_arguments(s)
    s.set_defaults(func=cmd_evaluate)

    add_review_commands(sub, endpoint)

    s = sub.add_parser("score", parents=endpoint,
                       help="score images with a detector artifact, one JSON line per input")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("inputs", nargs="*", metavar="PATH_OR_URI", help="image files or s3:// objects")
    s.add_argument("--card", action="store_true",
                   help="print the detector's model card first (intended use, data, calibration, metrics, limits)")
    s.add_argument("--threshold", type=_threshold, help="decision threshold (default: the artifact's)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_decoder_argument(s)
    add_max_bytes_argument(s, "refuse inputs larger than this, reading no more than one byte past it (error "
                              "too_large:); devices, FIFOs and sockets are refused (error read:)")
    s.set_defaults(func=cmd_score)
    return p


def _check_output_folder(uri: str) -> None:
    """Refuse a local output folder that is, or lies below, something other than a folder: a
    write there fails with NotADirectoryError only after the work is done."""
    from ntf_ray import storage

    if storage.is_s3(uri):
        return
    path = Path(storage.normalize(uri))
    for at in (path, *path.parents):
        if at.is_dir():
            return
        if at.exists() or at.is_symlink():  # a file, a device, a dangling link
            raise ValueError(f"output folder {uri}: {at} is not a folder")


def _check_device(name: str | None) -> None:
    """``--device cuda`` on a machine without one: refused before the model is read."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")


def _storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the S3 client failing as a whole (no connection to the endpoint, no
    credentials, a timeout), not one object's error."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no S3 client installed: nothing of it can have failed
        return False
    return isinstance(exc, BotoCoreError)


def _say(exc: BaseException, endpoint: str | None) -> str:
    """An error as one line: no secrets, and not the endpoint, which may name internal hosts."""
    from ntf_ray.storage import read_error, redact

    if _storage_failure(exc):
        return read_error(exc)  # "read: EndpointConnectionError: Could not connect to the endpoint URL: <endpoint>"
    text = " ".join(redact(str(exc)).split())
    return text.replace(endpoint, "<endpoint>") if endpoint else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with console.terminal(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ntf_ray.errors import DetectorFault, RunStalled
    from ntf_ray.storage import StorageOptions

    # Resolved once, here: an absent --s3-endpoint means AWS_ENDPOINT_URL for every command.
    args.storage_options = StorageOptions.resolve(getattr(args, "s3_endpoint", None))
    endpoint = args.storage_options.endpoint_url
    folder = LOG_FOLDER.get(args.command)
    session = None
    try:
        _check_device(getattr(args, "device", None))
        if args.command in OUTPUT_FOLDER:
            _check_output_folder(getattr(args, OUTPUT_FOLDER[args.command]))
        if folder is None:
            return args.func(args)
        with console.session(getattr(args, folder), args.command, verbose=args.verbose,
                             options=args.storage_options) as session:
            return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 2
    except (DetectorFault, RunStalled) as exc:  # a broken detector, a stuck run: one line, not a traceback
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _storage_failure(exc):
            raise
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 1
    finally:
        if session is not None and session.kept:
            print(f"Ray's logs of this run: {session.kept}{'' if args.verbose else ' (-v shows them here)'}",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
