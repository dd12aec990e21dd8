"""The image set on disk: ``make_synthetic`` with its argument validation, the split
allocation and the per-image random generators."""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ntf_ray.synth.families import FAMILY_KIND, GENERATORS, KNOWN_GENERATORS, render_fake, render_real

_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "jpg": ("JPEG", "jpg")}
_DEFAULT_SPLITS = {"train": 0.6, "val": 0.1, "test": 0.3}


def _split_counts(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of n items to the splits (ties: split order)."""
    names = list(splits)
    raw = [n * splits[s] for s in names]
    counts = [int(math.floor(r + 1e-9)) for r in raw]
    left = n - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: max(left, 0)]:
        counts[i] += 1
    return dict(zip(names, counts))


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    ss = np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8")), label, index])
    return np.random.default_rng(ss)


def _validate(n_real, n_fake, size, seed, image_format, jpeg_quality, splits, generators):
    for name, n in (("n_real", n_real), ("n_fake", n_fake)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        width = height = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size
    ):
        width, height = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an int or a (width, height) pair, got {size!r}")
    if width < 8 or height < 8:
        raise ValueError(f"size must be >= 8 pixels per side, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    fmt = str(image_format).lower() if isinstance(image_format, str) else None
    if fmt not in _FORMATS:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer)) or not (
        1 <= jpeg_quality <= 100
    ):
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")
    if not isinstance(splits, dict) or not splits:
        raise ValueError("splits must be a non-empty dict of split name -> fraction")
    for name, frac in splits.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"bad split name {name!r}")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not frac > 0:
            raise ValueError(f"split fraction for {name!r} must be > 0, got {frac!r}")
    total = float(sum(splits.values()))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total}")
    if isinstance(generators, str):
        raise ValueError("generators must be a sequence of names, not a string")
    gens = list(generators)
    if not gens:
        raise ValueError("generators must not be empty")
    unknown = [g for g in gens if g not in KNOWN_GENERATORS]
    if unknown:
        raise ValueError(f"unknown generators {unknown}; known: {KNOWN_GENERATORS}")
    if len(set(gens)) != len(gens):
        raise ValueError(f"duplicate generators in {gens}")
    return width, height, fmt, gens


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def make_synthetic(
    out: str | Path,
    *,
    n_real: int,
    n_fake: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    image_format: str = "png",
    jpeg_quality: int = 95,
    splits: dict[str, float] | None = None,
    generators: Sequence[str] = GENERATORS,
    workers: int | None = None,
) -> list[dict]:
    """Write a procedural real/fake image set in CNNDetection layout under ``out``.

    ``n_real`` / ``n_fake`` images are divided over ``splits`` (default train 0.6, val
    0.1, test 0.3; largest-remainder rounding). Fakes cycle through ``generators`` (any
    of ``KNOWN_GENERATORS``, in any order; default the upsampling ``GENERATORS``) and
    reals are spread evenly over the same generator folders, as in CNNDetection's
    per-generator folders; the cycle runs on across splits, so ``n_fake >=
    len(generators)`` gives every family. ``size`` is an int (square) or ``(width,
    height)``; ``image_format`` is ``"png"`` or ``"jpeg"`` (``.jpg``, 4:2:0,
    ``jpeg_quality``). ``workers`` threads render and encode (default: usable CPUs, at
    most 8); the files do not depend on it. Files of the same names are overwritten;
    nothing else under ``out`` is touched.

    Returns one record per file, ordered by split, generator folder, label, index::

        {"uri": "/abs/OUT/test/tconv/1_fake/fake_000003.png", "label": 1,
         "generator": "tconv", "split": "test", "source": "tconv", "family": "upsampling"}

    ``source`` is what made the image (``"real"`` for reals); ``family`` is the generator
    folder's kind (``FAMILY_KIND``), the same for its reals and fakes, as the manifest's
    ``family`` column groups generators. This is test data, not a benchmark of real-world
    accuracy.
    """
    if splits is None:
        splits = dict(_DEFAULT_SPLITS)
    width, height, fmt, gens = _validate(
        n_real, n_fake, size, seed, image_format, jpeg_quality, splits, generators
    )
    if workers is None:
        workers = _default_workers()
    elif isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    pil_format, ext = _FORMATS[fmt]
    if pil_format == "PNG":
        save_kw: dict = {"format": "PNG", "compress_level": 6, "optimize": False}
    else:
        save_kw = {
            "format": "JPEG",
            "quality": int(jpeg_quality),
            "subsampling": "4:2:0",
            "optimize": False,
            "progressive": False,
        }
    root = Path(out).expanduser().resolve()
    seed = int(seed)
    counts = {0: _split_counts(int(n_real), splits), 1: _split_counts(int(n_fake), splits)}

    # (split, generator folder, label, index, path); the generator cycle runs on across
    # splits so that small sets still cover every family
    jobs: list[tuple[str, str, int, int, Path]] = []
    offset = {0: 0, 1: 0}
    for split in splits:
        per_gen: dict[str, list] = {g: [] for g in gens}
        for label in (0, 1):
            kind = "real" if label == 0 else "fake"
            for i in range(counts[label][split]):
                gen = gens[(offset[label] + i) % len(gens)]
                path = root / split / gen / f"{label}_{kind}" / f"{kind}_{i:06d}.{ext}"
                per_gen[gen].append((split, gen, label, i, path))
            offset[label] += counts[label][split]
        for g in gens:
            jobs.extend(per_gen[g])
    for folder in sorted({job[4].parent for job in jobs}):
        folder.mkdir(parents=True, exist_ok=True)

    def work(job: tuple[str, str, int, int, Path]) -> None:
        split, gen, label, i, path = job
        rng = _image_rng(seed, split, label, i)
        if label == 0:
            arr = render_real(rng, width, height)
        else:
            arr = render_fake(rng, width, height, gen)
        Image.fromarray(arr).save(path, **save_kw)

    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            work(job)
    else:
        # numpy (FFT, ufuncs, RNG fills) and PIL encoders release the GIL
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:
            for _ in pool.map(work, jobs):
                pass

    return [
        {
            "uri": str(path),
            "label": label,
            "generator": gen,
            "split": split,
            "source": "real" if label == 0 else gen,
            "family": FAMILY_KIND[gen],
        }
        for split, gen, label, _, path in jobs
    ]
