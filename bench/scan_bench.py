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
(``images.provenance``): the Ray Data scan of the same files (``--format`` jpeg, png or webp)
with ``--no-provenance`` and with provenance read, alternating, ``--rounds`` times each; it
prints what one thread spends reading one file's claims, each run's images/s and, as its
last line, ``ratio provenance/none`` (the mean rates' ratio).

    python bench/scan_bench.py --provenance-ratio --format png --n 1000

``--window-ratio`` measures instead what decoding only the centre window of each JPEG saves
(``images.jpeg_window``, libjpeg-turbo 3; ``--turbojpeg PATH`` names the library when the
system's is older): first the pixel parity on up to ``--parity`` files (each window against
the whole frame's centre, bit for bit), then one thread decoding and cropping each file both
ways, then the Ray Data scan with ``NTF_RAY_TURBOJPEG=off`` and with the region decode,
alternating, ``--rounds`` times each (a fresh local Ray each run, so the actors see the
setting; ``--rounds 0``: the decode figures only); last line ``ratio window/whole`` (the
scans' mean rates). Where the system's
library is TurboJPEG 2 it also times the lossless crop of the covering MCUs followed by a
decode, the one crop that version has.

    python bench/scan_bench.py --window-ratio --width 1024 --height 768 --n 2000
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


#: ``--format``: Pillow's name, the file extension, the options it is saved with.
FORMATS = {"jpeg": ("JPEG", "jpg", {"quality": 90}), "png": ("PNG", "png", {}), "webp": ("WEBP", "webp", {"quality": 90})}


def make_images(folder: Path, n: int, width: int, height: int, fmt: str = "jpeg") -> list[Path]:
    """Textured images (JPEGs of quality 90 by default; ``fmt`` of ``FORMATS``), different per
    file, cheap to make."""
    name, ext, options = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        small = np.roll(base, i, axis=(0, 1)) ^ np.uint8(i % 251)
        img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        noise = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(np.asarray(img) // 2 + noise)
        p = folder / f"img_{i:05d}.{ext}"
        img.save(p, name, **options)
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
    p.add_argument("--format", choices=sorted(FORMATS), default="jpeg",
                   help="what the files are with --provenance-ratio (default jpeg)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each with --provenance-ratio or --window-ratio (default 2)")
    p.add_argument("--window-ratio", action="store_true",
                   help="instead: the centre window decoded as a region against the whole frame (see module)")
    p.add_argument("--parity", type=int, default=1000, help="files checked pixel by pixel with --window-ratio")
    p.add_argument("--turbojpeg", default=None, help="the TurboJPEG 3 library for --window-ratio (default: found)")
    args = p.parse_args()
    if args.provenance_ratio:
        provenance_ratio(args)
        return
    if args.window_ratio:
        window_ratio(args)
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
        paths = make_images(tmp / "jpegs", args.n, args.width, args.height)
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
    from ntf_ray.images.provenance import c2pa_available, provenance_of
    from ntf_ray.nn.model import Detector
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.scan.spec import ScanSpec

    print(f"host: {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"ray {ray.__version__}; backbone {args.backbone} (random weights), batch {args.batch}; "
          f"C2PA {'read' if c2pa_available() else 'not installed'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "jpegs", args.n, args.width, args.height, args.format)
        kib = sum(q.stat().st_size for q in paths) / len(paths) / 1024
        print(f"{len(paths)} {FORMATS[args.format][0]} files of {args.width}x{args.height}, {kib:.0f} KiB each",
              flush=True)
        blobs = [q.read_bytes() for q in paths[:200]]
        began = time.perf_counter()
        for blob in blobs:
            provenance_of(blob)
        print(f"one thread reading claims: {(time.perf_counter() - began) / len(blobs) * 1e3:.2f} ms per file "
              f"(mean of {len(blobs)})", flush=True)
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
                  f"({table.num_rows} rows, {len(problems)} with a provenance problem; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
        diff = max(abs(scores[True][u] - v) for u, v in scores[False].items())
        if scores[True].keys() != scores[False].keys() or diff > 1e-5:
            raise SystemExit(f"the scores differ with provenance read (by {diff:.1e}): they must not depend on it")
        ray.shutdown()
    mean = {on: sum(r) / len(r) for on, r in rates.items()}
    print(f"ratio provenance/none = {mean[True] / mean[False]:.3f}")


def _timed_rate(fn, items, repeat: int = 2) -> float:
    """Items per second of ``fn`` over ``items``, the best of ``repeat`` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def _lossless_crop(size: int):
    """``fn(bytes)`` -> the centre window through TurboJPEG 2's lossless crop of the covering
    MCUs (one MCU of margin) and a decode of the small JPEG; None without the library."""
    import ctypes
    import ctypes.util

    import simplejpeg

    name = ctypes.util.find_library("turbojpeg")
    if not name:
        return None
    lib = ctypes.CDLL(name)

    class Region(ctypes.Structure):
        _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]

    class Transform(ctypes.Structure):
        _fields_ = [("r", Region), ("op", ctypes.c_int), ("options", ctypes.c_int), ("data", ctypes.c_void_p),
                    ("filter", ctypes.c_void_p)]

    lib.tjInitTransform.restype = ctypes.c_void_p
    lib.tjDestroy.argtypes = lib.tjFree.argtypes = [ctypes.c_void_p]
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + [ctypes.POINTER(ctypes.c_int)] * 4
    lib.tjTransform.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
                                ctypes.POINTER(Transform), ctypes.c_int]
    mcu = {0: (8, 8), 1: (16, 8), 2: (16, 16), 3: (8, 8), 4: (8, 16), 5: (32, 8)}

    def crop(data: bytes):
        handle = lib.tjInitTransform()
        try:
            w, h, sub, space = (ctypes.c_int() for _ in range(4))
            if lib.tjDecompressHeader3(handle, data, len(data), w, h, sub, space):
                raise ValueError("header")
            w, h, (mw, mh) = w.value, h.value, mcu[sub.value]
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            x0, y0 = max(0, left - mw) // mw * mw, max(0, top - mh) // mh * mh
            x1, y1 = min(w, left + size + mw), min(h, top + size + mh)
            t = Transform(Region(x0, y0, x1 - x0, y1 - y0), 0, 4 | 64, None, None)  # TJXOPT_CROP | TJXOPT_COPYNONE
            out, n = ctypes.c_void_p(), ctypes.c_ulong()
            if lib.tjTransform(handle, data, len(data), 1, ctypes.byref(out), ctypes.byref(n), ctypes.byref(t),
                               8192 | 16384):  # TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS
                raise ValueError("transform")
            small = ctypes.string_at(out, n.value)
            lib.tjFree(out)
        finally:
            lib.tjDestroy(handle)
        pixels = simplejpeg.decode_jpeg(small, colorspace="RGB", strict=True)
        return pixels[top - y0 : top - y0 + size, left - x0 : left - x0 + size]

    return crop


def window_ratio(args: argparse.Namespace) -> None:
    if args.turbojpeg:
        os.environ["NTF_RAY_TURBOJPEG"] = args.turbojpeg
    import pyarrow.dataset as pads
    import ray
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.images import jpeg_window
    from ntf_ray.images.decode import decode
    from ntf_ray.nn.model import Detector
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.scan.spec import ScanSpec

    size = 224
    chosen = os.environ.get("NTF_RAY_TURBOJPEG")
    print(f"host: {os.cpu_count()} cores; torch {torch.__version__}; ray {ray.__version__}; "
          f"backbone {args.backbone} (random weights), batch {args.batch}; {jpeg_window.describe()}")
    if jpeg_window.library() is None:
        raise SystemExit("no TurboJPEG 3 library: nothing to compare (--turbojpeg PATH names one)")

    def centre(image):
        h, w = image.shape[:2]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return image[top : top + size, left : left + size]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "jpegs", args.n, args.width, args.height)
        blobs = [q.read_bytes() for q in paths]
        print(f"{len(paths)} JPEGs of {args.width}x{args.height}, {sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB "
              "each (quality 90, 4:2:0, baseline)", flush=True)
        checked = blobs[-args.parity:]  # the files the scans below also score, the last ones first made
        equal = flips = regions = 0
        worst = 0
        for data in checked:
            whole, part = decode(data), decode(data, window=size)
            regions += part.window
            a, b = centre(whole.image).astype(np.int16), (part.image if part.window else centre(part.image))
            diff = int(np.abs(a - b).max())
            worst = max(worst, diff)
            equal += diff == 0
            flips += (whole.error is None) != (part.error is None)
        print(f"parity: {equal} of {len(checked)} windows equal to the whole frame's centre bit for bit "
              f"({regions} decoded as a region), max |difference| {worst}, ok/error flips {flips}", flush=True)
        if equal != len(checked) or flips:
            raise SystemExit("the region decode changed pixels or outcomes")

        sample = blobs[: min(len(blobs), 500)]
        whole_rate = _timed_rate(lambda d: np.ascontiguousarray(centre(decode(d).image)), sample)
        part_rate = _timed_rate(lambda d: decode(d, window=size).image, sample)
        print(f"one thread, decode + centre crop: whole frame {whole_rate:8.1f} images/s, region {part_rate:8.1f} "
              f"images/s: {part_rate / whole_rate:.2f}x", flush=True)
        lib, margin = jpeg_window.library(), 16
        top, left = int(round((args.height - size) / 2.0)), int(round((args.width - size) / 2.0))
        x0, y0 = (left - margin) // 16 * 16, top - margin
        width = min(args.width, left + size + margin) - x0
        short_rate = _timed_rate(lambda d: lib.region(d, x0, y0, width, size + 2 * margin), sample)
        print(f"one thread, a region that stops at the window's last row (not used: a file cut short below its "
              f"window would be scored): {short_rate:8.1f} images/s: {short_rate / whole_rate:.2f}x", flush=True)
        lossless = _lossless_crop(size)
        if lossless is not None:
            try:
                assert all(np.array_equal(lossless(d), centre(decode(d).image)) for d in sample[:50])
                crop_rate = _timed_rate(lossless, sample)
                print(f"one thread, TurboJPEG 2 lossless crop + decode: {crop_rate:8.1f} images/s: "
                      f"{crop_rate / whole_rate:.2f}x the whole frame (same pixels)", flush=True)
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                print(f"TurboJPEG 2 lossless crop: not measured ({type(exc).__name__})")

        if args.rounds == 0:
            return  # the decode figures only
        torch.manual_seed(0)
        model = str(tmp / "detector")
        save_artifact(model, Detector.build(args.backbone), input_size=size)
        rates: dict[bool, list[float]] = {False: [], True: []}
        scores: dict[bool, dict] = {}
        for k in range(2 * args.rounds):
            on = bool(k % 2)
            os.environ["NTF_RAY_TURBOJPEG"] = (chosen or "") if on else "off"
            runtime.init_local_ray()
            start = time.perf_counter()
            result = ray_scan.scan(ScanSpec(model=model, output=str(tmp / f"scores-{k}"), input=str(tmp / "jpegs"),
                                            batch_size=args.batch))
            rate = len(paths) / (time.perf_counter() - start)
            ray.shutdown()
            rates[on].append(rate)
            table = pads.dataset(result.run_dir, format="parquet").to_table(columns=["uri", "score"])
            scores[on] = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist()))
            print(f"scan, {'region decode' if on else 'whole frame  '}: {rate:8.1f} images/s ({table.num_rows} rows)",
                  flush=True)
        if scores[True] != scores[False]:
            raise SystemExit("the scores differ with the region decode: they must not")
        print("scores: identical with and without the region decode")
    mean = {on: sum(r) / len(r) for on, r in rates.items()}
    print(f"ratio window/whole = {mean[True] / mean[False]:.3f}")


if __name__ == "__main__":
    main()
