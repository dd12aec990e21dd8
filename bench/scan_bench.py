"""Scan throughput: a naive single-process loop against the Ray Data scan, same detector, same JPEGs.

(a) naive: one process reads, decodes and scores the files in batches, one batch after
    another (the core's ``Scorer``, nothing overlapped);
(b) ray_scan: ``ntf-ray scan`` on local Ray (detector actors, Parquet table written).

Both score the same files with the same detector; the script checks that their scores
agree, then prints images/s for each and, as its last line, ``ratio ray_scan/naive``.
Before that, it lists 10,000 and 100,000 small files in child processes, as a scan does
(chunk by chunk into read blocks in Ray's object store), and prints the driver's private
memory (RssAnon: the object store's shared pages are not the driver's) before and after,
to show it stays flat in the number of objects.

    python bench/scan_bench.py                  # 8,000 JPEGs of 512x384, tiny backbone
    python bench/scan_bench.py --n 4000 --backbone resnet18

``--provenance-ratio`` measures instead what reading each image's claims costs
(``images.provenance``): the Ray Data scan of the same files with ``--no-provenance`` and
with provenance read, alternating, ``--rounds`` times each; it prints each run's images/s and,
as its last line, ``ratio provenance/none`` (the mean rates' ratio).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """Textured JPEGs (quality 90), different per file, cheap to make."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        small = np.roll(base, i, axis=(0, 1)) ^ np.uint8(i % 251)
        img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        noise = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(np.asarray(img) // 2 + noise)
        p = folder / f"img_{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


LISTING_CHILD = """
import sys
import ray
from ntf_ray import storage
from ntf_ray.scan.listing import list_objects
from ntf_ray.scan.spec import ScanSpec
from ntf_ray.ray_edge import scan as ray_scan

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
spec = ScanSpec(model="-", output="-", input=sys.argv[1])
before = mib("RssAnon:")
if sys.argv[2] == "table":  # the whole listing held as one table, as scans did before
    table = list_objects(spec, storage.StorageOptions())
    listed, blocks = table.num_rows, []
else:
    import tempfile
    from ntf_ray.ray_edge.scan.feed import ListingFeed
    feed = ListingFeed(spec, storage.StorageOptions(), None, tempfile.mkdtemp()).start()
    blocks = [ref for window in feed.windows() for ref in window]  # what the scan scores, unscored
    feed.join()
    listed = feed.listed
print(listed, len(blocks), before, mib("RssAnon:"))
"""


def listing_memory(root: Path, counts: list[int]) -> None:
    for n in counts:
        folder = root / f"listing-{n}"
        folder.mkdir()
        for i in range(n):
            sub = folder / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                sub.mkdir()
            (sub / f"f{i:06d}.jpg").write_bytes(b"x")
        for mode in ("table", "blocks"):
            out = subprocess.run([sys.executable, "-c", LISTING_CHILD, str(folder), mode], capture_output=True,
                                 text=True, check=True).stdout.split()
            rows, blocks, before, after = map(int, out)
            where = "one table in the driver" if mode == "table" else f"{blocks:,} read blocks in the object store"
            print(f"listing {rows:,} objects as {where}: driver private memory {before} MiB before, {after} MiB "
                  f"after (+{after - before} MiB)", flush=True)


def naive(paths: list[Path], model: str, batch: int) -> tuple[float, dict[str, float]]:
    from ntf_ray.detector.scorer import Scorer

    scorer = Scorer.from_artifact(model, device="cpu", batch_size=batch)
    scores: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        for p, r in zip(chunk, scorer.score_bytes([p.read_bytes() for p in chunk])):
            scores[str(p)] = r.score
    return time.perf_counter() - start, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8000, help="JPEGs to score (default 8000)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--backbone", default="tiny", help="detector backbone, random weights (default tiny)")
    p.add_argument("--batch", type=int, default=64, help="images per detector call (default 64)")
    p.add_argument("--listing", type=int, nargs="*", default=[10_000, 100_000],
                   help="object counts for the listing-memory check (default 10000 100000; none to skip)")
    p.add_argument("--provenance-ratio", action="store_true",
                   help="instead: the scan with and without provenance, alternating (see module)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each with --provenance-ratio (default 2)")
    args = p.parse_args()
    if args.provenance_ratio:
        provenance_ratio(args)
        return

    import pyarrow.dataset as pads
    import ray
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.scan.spec import ScanSpec

    print(f"host: {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"ray {ray.__version__}; backbone {args.backbone} (random weights), 224 px centre crop, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.listing:
            listing_memory(tmp, args.listing)
        paths = make_jpegs(tmp / "jpegs", args.n, args.width, args.height)
        print(f"{len(paths)} JPEGs of {args.width}x{args.height}, "
              f"{sum(q.stat().st_size for q in paths) / len(paths) / 1024:.0f} KiB each", flush=True)
        torch.manual_seed(0)
        model = str(tmp / "detector")
        save_artifact(model, Detector.build(args.backbone), input_size=224)

        naive_s, naive_scores = naive(paths, model, args.batch)
        naive_rate = len(paths) / naive_s
        print(f"naive loop: {naive_rate:8.1f} images/s ({naive_s:.1f} s)", flush=True)

        runtime.init_local_ray()
        start = time.perf_counter()
        result = ray_scan.scan(ScanSpec(model=model, output=str(tmp / "scores"), input=str(tmp / "jpegs"),
                                                 batch_size=args.batch))
        scan_s = time.perf_counter() - start
        scan_rate = len(paths) / scan_s
        table = pads.dataset(result.run_dir, format="parquet").to_table(columns=["uri", "score", "scanned_at"])
        stamps = table.column("scanned_at").to_pylist()
        steady = len(paths) / max((max(stamps) - min(stamps)).total_seconds(), 1e-9)
        got = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist()))
        diff = max(abs(got[k] - v) for k, v in naive_scores.items())
        if len(got) != len(paths) or diff > 1e-5:
            raise SystemExit(f"scan and naive loop disagree: {len(got)} rows, max score difference {diff:.2e}")
        print(f"ray_scan:   {scan_rate:8.1f} images/s ({scan_s:.1f} s, job start to _SUCCESS, table written); "
              f"scores equal to the naive loop's (max difference {diff:.1e})", flush=True)
        print(f"ray_scan steady state: {steady:8.1f} images/s (first to last scored block, start-up excluded); "
              f"steady-state ratio {steady / naive_rate:.2f}", flush=True)
        ray.shutdown()
    print(f"ratio ray_scan/naive = {scan_rate / naive_rate:.2f}")


def provenance_ratio(args: argparse.Namespace) -> None:
    import pyarrow.dataset as pads
    import ray
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.images.provenance import c2pa_available
    from ntf_ray.nn.model import Detector
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.scan.spec import ScanSpec

    print(f"host: {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"ray {ray.__version__}; backbone {args.backbone} (random weights), batch {args.batch}; "
          f"C2PA {'read' if c2pa_available() else 'not installed'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_jpegs(tmp / "jpegs", args.n, args.width, args.height)
        print(f"{len(paths)} JPEGs of {args.width}x{args.height}", flush=True)
        torch.manual_seed(0)
        model = str(tmp / "detector")
        save_artifact(model, Detector.build(args.backbone), input_size=224)
        runtime.init_local_ray()
        rates: dict[bool, list[float]] = {False: [], True: []}
        scores: dict[bool, dict] = {}
        for k in range(2 * args.rounds):
            on = bool(k % 2)
            start = time.perf_counter()
            result = ray_scan.scan(ScanSpec(model=model, output=str(tmp / f"scores-{k}"), input=str(tmp / "jpegs"),
                                            batch_size=args.batch, provenance=on))
            rate = len(paths) / (time.perf_counter() - start)
            rates[on].append(rate)
            table = pads.dataset(result.run_dir, format="parquet").to_table(columns=["uri", "score", "provenance_problem"])
            scores[on] = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist()))
            problems = table.column("provenance_problem").drop_null()
            print(f"provenance {'read' if on else 'off '}: {rate:8.1f} images/s "
                  f"({table.num_rows} rows, {len(problems)} with a provenance problem)", flush=True)
        diff = max(abs(scores[True][u] - v) for u, v in scores[False].items())
        if scores[True].keys() != scores[False].keys() or diff > 1e-5:
            raise SystemExit(f"the scores differ with provenance read (by {diff:.1e}): they must not depend on it")
        ray.shutdown()
    mean = {on: sum(r) / len(r) for on, r in rates.items()}
    print(f"ratio provenance/none = {mean[True] / mean[False]:.3f}")


if __name__ == "__main__":
    main()
