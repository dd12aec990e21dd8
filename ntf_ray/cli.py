"""``ntf-ray`` command line. Every entry point is ``main(argv=None)``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ntf_ray import __version__

log = logging.getLogger("ntf_ray")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_index(args: argparse.Namespace) -> int:
    from ntf_ray.datasets import index_folder, write_manifest
    from ntf_ray.storage import StorageOptions

    table = index_folder(args.root, default_split=args.split)
    write_manifest(table, args.out, StorageOptions.resolve(args.s3_endpoint))
    labels = table.column("label").to_pylist()
    print(f"indexed {table.num_rows} images ({labels.count(0)} real, {labels.count(1)} fake) -> {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ntf_ray.datasets import manifest_table, write_manifest
    from ntf_ray.synth import make_synthetic

    records = make_synthetic(args.out, n_real=args.n_real, n_fake=args.n_fake, size=args.size, seed=args.seed,
                             image_format=args.format)
    manifest = str(Path(args.out) / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    print(f"wrote {len(records)} synthetic images (test data, not a benchmark) to {args.out}; manifest {manifest}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ntf_ray import storage
    from ntf_ray.scoring import Scorer
    from ntf_ray.storage import StorageOptions

    options = StorageOptions.resolve(args.s3_endpoint)
    scorer = Scorer.from_artifact(args.model, device=args.device, threshold=args.threshold, options=options)
    for uri in args.inputs:
        uri = storage.normalize(uri)
        try:
            data = storage.read_bytes(uri, options)
        except (OSError, ValueError) as exc:
            row = {"uri": uri, "score": None, "is_fake": None, "error": f"read: {storage.redact(str(exc))[:200]}"}
        else:
            r = scorer.score_bytes([data])[0]
            row = {"uri": uri, "score": r.score, "is_fake": r.is_fake, "error": r.error}
        print(json.dumps(row), flush=True)
    return 0


def _size(text: str) -> int:
    value = int(text)
    if value < 8:
        raise argparse.ArgumentTypeError("size must be >= 8 pixels")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ntf-ray", description="Find AI-generated images at scale (Natural Trace Forensics on Ray).")
    p.add_argument("--version", action="version", version=f"ntf-ray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="build a dataset manifest from a CNNDetection-layout folder",
                       description="Write a manifest (uri, label, generator, split) for ROOT/[split/]<generator>/.../{0_real,1_fake}/*. "
                                   "The output format follows the extension: .parquet or .csv.")
    s.add_argument("root", help="local folder in the CNNDetection layout")
    s.add_argument("--out", required=True, help="manifest to write (.parquet or .csv; local path or s3://)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split for files not under a train/val/test folder (default: test)")
    s.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph, moto); default: AWS_ENDPOINT_URL")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("synth", help="make a synthetic real/fake image set (test data, not a benchmark)",
                       description="Procedurally generated TEST DATA for the demo, tests and benchmarks: 'real' images with "
                                   "natural-image statistics and 'fake' ones from upsampling generators (tconv, nnconv, "
                                   "bilinear_conv). It says nothing about accuracy on real-world images. Writes "
                                   "OUT/<split>/<generator>/{0_real,1_fake}/* and OUT/manifest.parquet; deterministic by --seed.")
    s.add_argument("out", help="output folder")
    s.add_argument("--n-real", type=int, default=200, help="number of real images (default 200)")
    s.add_argument("--n-fake", type=int, default=200, help="number of fake images (default 200)")
    s.add_argument("--size", type=_size, default=64, help="square image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=("png", "jpeg"), default="png", help="file format (default png)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("score", help="score images with a detector artifact, one JSON line per input")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("inputs", nargs="+", metavar="PATH_OR_URI", help="image files or s3:// objects")
    s.add_argument("--threshold", type=float, help="decision threshold (default: the artifact's)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph, moto); default: AWS_ENDPOINT_URL")
    s.set_defaults(func=cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        from ntf_ray.storage import redact

        print(f"ntf-ray {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
