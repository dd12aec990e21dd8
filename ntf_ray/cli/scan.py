"""The scanning commands: ``scan`` (a bucket audit), ``moderate`` (the incremental scan) and
``score`` (a few files, one JSON line each)."""

from __future__ import annotations

import argparse
import json

from ntf_ray.cli.arguments import (
    actors,
    add_decoder_argument,
    add_max_bytes_argument,
    add_provenance_arguments,
    byte_size,
    cpus,
    default_of,
    glob_pattern,
    gpus,
    pixels,
    positive_count,
    seconds_or_never,
    spec_from_args,
    threshold,
)
from ntf_ray.errors import STALL_S
from ntf_ray.scan.spec import ScanSpec, format_summary


def cmd_scan(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan

    spec = scan_spec(args)
    runtime.init_local_ray()
    result = ray_scan.scan(spec)
    print(format_summary(result.summary), flush=True)
    return 0


def scan_spec(args: argparse.Namespace) -> ScanSpec:
    """The ``ScanSpec`` of a parsed scan or moderate command line (each option by its field's name)."""
    return spec_from_args(ScanSpec, args, endpoint=args.storage_options.endpoint_url)


def add_scan_arguments(s: argparse.ArgumentParser, *, incremental_default: bool) -> None:
    """The options of scan and moderate. Each sets the ``ScanSpec`` field its ``dest`` names."""
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="what to scan: an s3://bucket/prefix or a local folder (all files below it)")
    what.add_argument("--manifest", help="or: scan the uris of a manifest (.parquet/.csv, local or s3://)")
    what.add_argument("--inventory", metavar="MANIFEST_JSON",
                      help="or: scan the objects of an S3 Inventory report (its manifest.json, s3:// or a local copy; "
                           "CSV, Parquet or ORC), with no LIST or HEAD call; latest versions only")
    s.add_argument("--inventory-max-bytes", type=byte_size, default=default_of(ScanSpec, "inventory_max_bytes"),
                   metavar="SIZE", help="with --inventory: refuse a data file that inflates to more than this "
                                        "(default 512MiB)")
    s.add_argument("--inventory-max-rows", type=positive_count, default=default_of(ScanSpec, "inventory_max_rows"),
                   metavar="N", help="with --inventory: refuse a data file of more rows than this (default 4000000)")
    s.add_argument("--allow-unchecked-inventory", action="store_true",
                   help="with --inventory: read data files the manifest gives no MD5checksum for (refused by "
                        "default: nothing else shows such a file is whole)")
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
    s.add_argument("--glob", dest="pattern", type=glob_pattern, metavar="GLOB",
                   help="only object names matching this pattern, e.g. '*.jpg' (case-insensitive)")
    s.add_argument("--list-concurrency", type=positive_count, default=default_of(ScanSpec, "list_concurrency"),
                   metavar="N", help="listers at once on an S3 prefix, each on its own folders (default 1: one "
                                     "lister; 8-32 for prefixes of millions of objects)")
    s.add_argument("--threshold", type=threshold, help="decision threshold for is_fake (default: the artifact's)")
    s.add_argument("--batch-size", type=positive_count, help="images per detector call (default 256 on GPUs, 64 on CPUs)")
    s.add_argument("--min-actors", type=actors,
                   help="detector actors to start with (default: --max-actors, a fixed pool; fewer lets "
                        "Ray Data add actors as the queue grows)")
    s.add_argument("--max-actors", type=actors,
                   help="most detector actors (default: four per GPU in the cluster, or 2 on CPU)")
    s.add_argument("--gpus-per-actor", type=gpus,
                   help="GPUs per detector actor (default: 0.25, four actors per GPU, when the cluster has GPUs; "
                        "else 0 = CPU)")
    s.add_argument("--cpus-per-actor", type=cpus, default=default_of(ScanSpec, "cpus_per_actor"), metavar="N",
                   help="CPUs each detector actor reserves (default 1; a fraction leaves room for Ray Data's read "
                        "tasks on a small machine)")
    add_decoder_argument(s)
    s.add_argument("--limit", type=positive_count, metavar="N", help="scan at most N objects, N >= 1 (a trial run)")
    add_max_bytes_argument(s, "skip objects larger than this without reading them (error row too_large:)")
    s.add_argument("--max-pixels", type=pixels, default=default_of(ScanSpec, "max_pixels"), metavar="N",
                   help="refuse images whose header declares more pixels (error row too_large:); default 100000000")
    s.add_argument("--read-block-rows", type=positive_count, default=default_of(ScanSpec, "read_block_rows"), metavar="N",
                   help="objects per read task (default 128): smaller blocks reach the detectors sooner")
    s.add_argument("--read-block-bytes", type=byte_size, default=default_of(ScanSpec, "read_block_bytes"),
                   metavar="SIZE",
                   help="listed bytes per read task, at most (default 64MiB; one object larger than this goes alone)")
    s.add_argument("--read-ahead", dest="read_ahead_bytes", type=byte_size,
                   default=default_of(ScanSpec, "read_ahead_bytes"), metavar="SIZE",
                   help="most bytes the scan holds in Ray's object store, read but not yet scored and written "
                        "(default 2GiB)")
    s.add_argument("--stall-timeout", dest="stall_s", type=seconds_or_never, default=default_of(ScanSpec, "stall_s"),
                   metavar="SECONDS",
                   help="stop a run that lists no object and stages no row for this long, giving its lease "
                        f"back (default {STALL_S:.0f}; 'never' for no limit)")
    s.add_argument("--streams", type=positive_count, metavar="N",
                   help="batches each GPU detector actor scores at once, each on its own CUDA stream "
                        "(default 2; CPU actors score one at a time)")
    add_provenance_arguments(s)


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
    from ntf_ray.images.provenance import C2paTrust

    trust = C2paTrust.from_files(args.c2pa_trust) if args.provenance else None
    for row in score_files(scorer, args.inputs, options=args.storage_options, max_bytes=args.max_bytes,
                           provenance=trust):
        print(json.dumps(row, allow_nan=False), flush=True)
    return 0


def add_scan(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("scan", parents=endpoint,
                       help="score every object under a prefix (or in a manifest) into a Parquet table",
                       description="A Ray Data job: list, read, decode and score in detector actors, and write one "
                                   "row per object to OUTPUT/dt=YYYY-MM-DD/run_id=ID/ (then _summary.json and "
                                   "_SUCCESS). Unreadable objects get an error row; the run goes on.")
    add_scan_arguments(s, incremental_default=False)
    s.set_defaults(func=cmd_scan)


def add_moderate(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("moderate", parents=endpoint,
                       help="an incremental scan: only objects new or changed since the last runs",
                       description="`scan --incremental`: scores only objects whose (uri, etag, last-modified) has no "
                                   "final row from the same model in a completed earlier run under OUTPUT. Made to run "
                                   "on a schedule.")
    add_scan_arguments(s, incremental_default=True)
    s.set_defaults(func=cmd_scan)


def add_score(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("score", parents=endpoint,
                       help="score images with a detector artifact, one JSON line per input")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("inputs", nargs="*", metavar="PATH_OR_URI", help="image files or s3:// objects")
    s.add_argument("--card", action="store_true",
                   help="print the detector's model card first (intended use, data, calibration, metrics, limits)")
    s.add_argument("--threshold", type=threshold, help="decision threshold (default: the artifact's)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_decoder_argument(s)
    add_max_bytes_argument(s, "refuse inputs larger than this, reading no more than one byte past it (error "
                              "too_large:); devices, FIFOs and sockets are refused (error read:)")
    add_provenance_arguments(s)
    s.set_defaults(func=cmd_score)
