"""Seeded damage to valid images of every format the scan opens: truncation (with and without
the format's own ending put back), flipped header and marker bytes, absurd declared sizes,
duplicated segments. For tests that a scan gives every such file one honest row."""

from __future__ import annotations

import io
import random
import struct

import numpy as np
from PIL import Image

from tests.awkward import texture

_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "GIF": b";"}


def originals(seed: int = 0) -> list[tuple[str, bytes]]:
    """``(format, bytes)``: small valid files of every opened format and a few modes each."""
    out = []
    arr = texture(29, 37, seed=seed)
    rgba = np.dstack([arr, (np.arange(29 * 37) % 256).reshape(29, 37).astype(np.uint8)])
    cases = [
        ("JPEG", Image.fromarray(arr), {"quality": 85}),
        ("JPEG", Image.fromarray(arr), {"quality": 70, "progressive": True}),
        ("JPEG", Image.fromarray(arr).convert("CMYK"), {}),
        ("JPEG", Image.fromarray(arr).convert("L"), {}),
        ("PNG", Image.fromarray(arr), {}),
        ("PNG", Image.fromarray(rgba, "RGBA"), {}),
        ("PNG", Image.fromarray(arr).convert("P"), {}),
        ("WEBP", Image.fromarray(arr), {"quality": 80}),
        ("WEBP", Image.fromarray(rgba, "RGBA"), {"lossless": True}),
        ("GIF", Image.fromarray(arr).convert("P"), {}),
        ("BMP", Image.fromarray(arr), {}),
        ("BMP", Image.fromarray(arr).convert("P"), {}),
        ("TIFF", Image.fromarray(arr), {}),
        ("TIFF", Image.fromarray(arr), {"compression": "tiff_deflate"}),
        ("TIFF", Image.fromarray(arr), {"compression": "tiff_lzw", "tile": None}),
        ("ICO", Image.fromarray(rgba, "RGBA"), {"sizes": [(16, 16), (32, 32)]}),
    ]
    for fmt, img, kw in cases:
        kw = {k: v for k, v in kw.items() if v is not None}
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append((fmt, buf.getvalue()))
    return out


def _markers(data: bytes) -> list[int]:
    """Offsets worth hitting: JPEG markers, PNG chunk types, TIFF/BMP/GIF header fields."""
    found = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
    pos = 8
    while data[:4] == b"\x89PNG" and pos + 8 <= len(data):
        found.append(pos + 4)
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 12 + length
    return found or list(range(min(len(data), 32)))


def mutate(fmt: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy of ``data``; returns ``(what was done, bytes)``."""
    kind = rng.choice(["truncate", "truncate+end", "flip-header", "flip-marker", "absurd-size", "duplicate",
                       "zero-run", "splice"])
    b = bytearray(data)
    if kind.startswith("truncate"):
        b = b[: rng.randrange(1, len(b))]
        if kind.endswith("end"):
            b += _ENDINGS.get(fmt, b"\x00" * 4)
    elif kind == "flip-header":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(0, min(len(b), 64))] ^= 1 << rng.randrange(8)
    elif kind == "flip-marker":
        at = rng.choice(_markers(data))
        for i in range(at, min(len(b), at + rng.randint(1, 6))):
            b[i] = rng.randrange(256)
    elif kind == "absurd-size":
        # a declared width or height field set to something huge or zero, wherever the format keeps it
        value = rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**32 - 127, 65500])
        at = rng.choice(_markers(data)) + rng.randint(0, 12)
        at = min(at, max(0, len(b) - 4))
        b[at : at + 4] = struct.pack(rng.choice(["<I", ">I"]), value)
    elif kind == "duplicate":
        start = rng.randrange(0, len(b))
        piece = b[start : start + rng.randint(2, 400)]
        at = rng.randrange(0, len(b))
        b[at:at] = piece * rng.randint(1, 30)
    elif kind == "zero-run":
        start = rng.randrange(0, len(b))
        b[start : start + rng.randint(1, 200)] = b"\x00" * min(200, len(b) - start)
    else:  # splice: the start of this file on the tail of another of its format
        b = b[: rng.randrange(1, len(b))] + data[rng.randrange(0, len(data)) :]
    return kind, bytes(b)


def corpus(n: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """``n`` damaged files: ``(format, what was done, bytes)``, the same for the same seed."""
    rng = random.Random(seed)
    base = originals(seed)
    out = []
    for _ in range(n):
        fmt, data = rng.choice(base)
        kind, damaged = mutate(fmt, data, rng)
        out.append((fmt, kind, damaged))
    return out
