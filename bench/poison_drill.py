"""The poison drill: ordinary images with files built to blind a scan spread among them.

288 ordinary PNG, JPEG and WebP images (``--ordinary``) and nine poison objects, names
interleaved so that every read block of the default 128 objects holds some: the bombs of
``tests/bombs.py`` at full size (a BMP of absurd width, a 1 MB TIFF declaring a 32768 x 32768
tile, an 8192 x 8192 progressive JPEG of 6,000 scans, an ICO hiding a 12000 x 12000 PNG, a
99600 x 50 sliver, a JPEG cut in half with an end-of-image marker), one whose scoring
raises, one that kills its worker (the drill's detector exits on it) and a second BMP. Three
``moderate`` runs of a local folder on local Ray, default options otherwise. Prints, per
run: rows, ordinary images scored / total, error rows by kind, whether any ordinary image
has a ``worker_lost`` row, and the seconds the run took.

    python bench/poison_drill.py
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ordinary", type=int, default=288)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Ray's workers

    import pyarrow.dataset as pads
    from PIL import Image

    from ntf_ray.cli import main as cli
    from ntf_ray.ray_edge import scan as ray_scan
    from tests.awkward import texture
    from tests.bombs import bmp_absurd_width, bombs
    from tests.conftest import save_random_detector
    from tests.test_scan_isolation import KILL, RAISE, PoisonActor

    ray_scan.DetectorActor = PoisonActor
    with tempfile.TemporaryDirectory() as tmp:
        src, tmp = Path(tmp) / "src", Path(tmp)
        src.mkdir()
        ordinary = set()
        for i in range(args.ordinary):
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
            buf = io.BytesIO()
            Image.fromarray(texture(192, 256, seed=i)).save(buf, fmt)
            name = f"{i * 10:05d}.{ext}"
            (src / name).write_bytes(buf.getvalue())
            ordinary.add(name)
        plain = (src / "00010.jpg").read_bytes()
        poisons = {**bombs(small=False), "raises.png": plain + RAISE, "kills-its-worker.png": plain + KILL,
                   "absurd-width-2.bmp": bmp_absurd_width(2**31 + 5)}
        step = args.ordinary * 10 // len(poisons)
        for k, (name, data) in enumerate(poisons.items()):
            (src / f"{k * step + step // 2:05d}-{name}").write_bytes(data)  # sorts between two ordinary images
        model = save_random_detector(str(tmp / "model"), input_size=224)
        out = tmp / "out"
        print(f"{args.ordinary} ordinary images and {len(poisons)} poison objects: {', '.join(poisons)}", flush=True)
        for run in ("m1", "m2", "m3"):
            began = time.perf_counter()
            assert cli(["moderate", "--input", str(src), "--model", model, "--output", str(out), "--run-id", run]) == 0
            seconds = time.perf_counter() - began
            rows = [r for r in pads.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
                    if r["run_id"] == run]
            mine = {Path(r["uri"]).name: r for r in rows}
            scored = sum(1 for n in ordinary if n in mine and mine[n]["score"] is not None)
            kinds = Counter(r["error"].split(":")[0] for r in rows if r["error"])
            lost = sum(1 for n in ordinary if n in mine and (mine[n]["error"] or "").startswith("worker_lost"))
            print(f"{run}: {len(rows)} rows; ordinary scored {scored}/{sum(1 for n in ordinary if n in mine)} of those "
                  f"it had rows for; errors by kind {dict(sorted(kinds.items()))}; worker_lost rows of ordinary "
                  f"images {lost}; {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
