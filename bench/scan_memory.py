"""Peak memory of one detector actor scoring a batch: ordinary JPEGs against a batch with large images.

A detector actor (``ntf_ray.ray_edge.scan.actor.DetectorActor``) hands each block's bytes to
``Scorer.score_bytes``, then reads each image's claims (``images.provenance.provenance_of``,
as a scan does unless ``--no-provenance``). This script does the same work in a fresh process per case: load a
tiny-backbone detector (random weights) from an artifact, read the files, score one small
image to warm up, reset the kernel's high-water mark of the RSS to the current RSS
(``/proc/self/clear_refs``; otherwise the imports' and the model load's transient peaks
would hide the batch), note it (``VmHWM``, which is ``ru_maxrss`` without the forking
parent's share, see ``CHILD``), score the batch, note it again. The figure is the
difference: what scoring the batch added to the process's peak. Linux only.

Cases, ``--batch`` images each (64 by default):

- ``ordinary``: JPEGs of 1024x768 (quality 90);
- ``large mixed``: the same batch with three of them replaced by a 5000x5000 RGBA PNG with
  partial alpha (about 100 KiB), an 8000x6000 JPEG and a 1x20000 PNG sliver;
- ``bombs mixed``: the same batch with seven replaced by files built to hold a decoder
  (``tests/bombs.py``, full size): a BMP declaring a width of 2**32 - 127, a 1 MB deflate TIFF
  declaring a 32768 x 32768 tile for 16 x 16 pixels, an 8192 x 8192 progressive JPEG of 6,000
  scans, an ICO whose directory says 16 x 16 over a 12000 x 12000 PNG, a 99600 x 50 PNG
  sliver, a 2048 px JPEG cut in half with an end-of-image marker appended, and a PNG of
  12000 x 10000 black pixels in 350 KB with no EXIF before its image data
  (``bombs.png_compressed``).

Each case also scores every file again on its own (and reads its claims) and prints the
slowest one's seconds. ``--no-provenance``: scoring alone (the figures in ``scan_memory.cpu.txt``
before 2026-12-07 are of scoring alone).

    python bench/scan_memory.py
    python bench/scan_memory.py --batch 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import sys
import numpy as np
from PIL import Image
import io
from ntf_ray.detector.scorer import Scorer

def peak_mib():
    # VmHWM is the kernel's high-water mark of this process's RSS. getrusage's ru_maxrss
    # reports the same, but never less than the RSS of the process that forked this one
    # (the bench, with large images in memory), so it cannot see a small batch.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

model, network_batch, claims, *paths = sys.argv[1:]
scorer = Scorer.from_artifact(model, device="cpu", batch_size=int(network_batch), decoder="pil")
if claims == "claims":  # as the detector actor: the claims of every object read, after its score
    from ntf_ray.images.provenance import provenance_of

    score = scorer.score_bytes

    def score_and_claims(items):
        results = score(items)
        for item in items:
            provenance_of(item)
        return results

    scorer.score_bytes = score_and_claims
items = [open(p, "rb").read() for p in paths]
warm = io.BytesIO()
Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(warm, "JPEG")
scorer.score_bytes([warm.getvalue()])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: reset the high-water mark to the current RSS, so import and load peaks drop out
base = peak_mib()
results = scorer.score_bytes(items)
peak = peak_mib()
errors = sorted({r.error.split(":")[0] for r in results if r.error})
import time
slowest = 0.0
for item in items:
    began = time.perf_counter()
    scorer.score_bytes([item])
    slowest = max(slowest, time.perf_counter() - began)
print(base, peak, sum(r.error is None for r in results), ",".join(errors) or "-", slowest)
"""


def textured(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like ``(H, W, 3)`` uint8 image: upscaled noise plus fine noise (JPEG can't squash it flat)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))
    return img // 2 + rng.integers(0, 24, (height, width, 3), dtype=np.uint8)


def make_files(folder: Path, n: int) -> tuple[list[Path], list[Path]]:
    """``(ordinary, large_mixed)``: ``n`` 1024x768 JPEGs, and the same with three large images in."""
    folder.mkdir(parents=True, exist_ok=True)
    ordinary = []
    for i in range(n):
        p = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(textured(1024, 768, i)).save(p, quality=90)
        ordinary.append(p)

    rgba = folder / "big_rgba.png"
    ramp = np.linspace(0, 255, 5000).astype(np.uint8)
    pixels = np.empty((5000, 5000, 4), np.uint8)
    pixels[..., 0] = ramp[None, :]
    pixels[..., 1] = ramp[:, None]
    pixels[..., 2] = 90
    pixels[..., 3] = ramp[None, :] // 2 + 64  # partial alpha everywhere: the compositing path
    Image.fromarray(pixels, "RGBA").save(rgba, optimize=True)
    del pixels
    big_jpeg = folder / "big.jpg"
    Image.fromarray(textured(8000, 6000, 1)).save(big_jpeg, quality=85)
    sliver = folder / "sliver.png"
    Image.fromarray(textured(20000, 1, 2)).save(sliver)
    mixed = [rgba, big_jpeg, sliver, *ordinary[3:]]
    return ordinary, mixed


def make_bombs(folder: Path, ordinary: list[Path]) -> list[Path]:
    """The ordinary batch with its first files replaced by the bombs of ``tests/bombs.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.bombs import bombs, png_compressed

    paths = []
    for name, data in {**bombs(small=False), "compressed.png": png_compressed()}.items():
        paths.append(folder / f"bomb-{name}")
        paths[-1].write_bytes(data)
    return [*paths, *ordinary[len(paths):]]


def measure(model: str, network_batch: int, claims: bool, paths: list[Path]) -> tuple[float, float, int, str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(network_batch), "claims" if claims else "-",
                          *map(str, paths)], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]), out[3], float(out[4])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64, the scan's default)")
    p.add_argument("--network-batch", type=int, default=8,
                   help="crops per forward pass (default 8: on a GPU actor the activations live on the card, "
                        "so a small chunk keeps them from swamping the host figure)")
    p.add_argument("--no-provenance", action="store_true", help="score only; no claims read")
    args = p.parse_args(argv)

    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector

    print(f"host: {os.cpu_count()} cores; torch {torch.__version__}; tiny backbone (random weights), 224 px crop, "
          f"CPU, decoder pil, batch {args.batch} "
          f"(forward passes of {args.network_batch}); claims {'not read' if args.no_provenance else 'read'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ordinary, mixed = make_files(tmp / "images", args.batch)
        bombed = make_bombs(tmp / "images", ordinary)
        torch.manual_seed(0)
        model = str(tmp / "detector")
        save_artifact(model, Detector.build("tiny"), input_size=224)
        sizes = {p.name: p.stat().st_size for p in mixed[:3] + [q for q in bombed if q.name.startswith("bomb-")]}
        print("large files and bombs: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
        print(f"{'case':<12} {'baseline MiB':>12} {'peak MiB':>9} {'added MiB':>10} {'scored':>7} {'slowest s':>9}"
              "  errors")
        added, slow = {}, {}
        for name, paths in (("ordinary", ordinary), ("large mixed", mixed), ("bombs mixed", bombed)):
            base, peak, scored, errors, slowest = measure(model, args.network_batch, not args.no_provenance, paths)
            added[name], slow[name] = peak - base, slowest
            print(f"{name:<12} {base:12.0f} {peak:9.0f} {peak - base:10.0f} {scored:4d}/{len(paths)} {slowest:9.2f}"
                  f"  {errors}", flush=True)
        for name in ("large mixed", "bombs mixed"):
            print(f"ratio {name} / ordinary: added MiB {added[name] / max(added['ordinary'], 1):.2f}, "
                  f"slowest object {slow[name] / max(slow['ordinary'], 1e-9):.2f}")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")


if __name__ == "__main__":
    main()
