"""Deterministic awkward image files for decoder / pipeline tests.

``make_awkward_files(folder)`` writes ~28 small files (good ones in many formats and
modes, broken ones of many kinds) and returns ``{filename: expected_ok}``. Everything is
generated here (seeded numpy RNG, Pillow, hand-written PNG chunks), so no fixtures are
checked in. The whole folder is < 3 MB and takes well under 2 s to make.

Named files other tests may rely on:

* ``exif_orient6.jpg``: stored 300x240 (W x H) with EXIF orientation 6 and a pure red
  30x30 block in the stored top-left corner; decodes to 240x300 with the block top-right.
* ``animated.gif``: 2 frames, frame 0 red-dominant, frame 1 blue-dominant.
* ``small.png``: valid 50x40 RGB.
* ``bomb.png``: header says 20000x20000 (1-bit greyscale), ~50 KB on disk.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

__all__ = ["make_awkward_files", "png_bytes", "texture"]

BOMB_SIDE = 20_000


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Deterministic ``(height, width, 3)`` uint8 RGB with smooth structure plus mild noise.

    Sinusoids give edges/gradients at several scales (so JPEG/WebP have real content),
    the noise gives sensor-like texture; the amplitude is low so lossless files stay small.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.3)
        v = 128 + 70 * np.sin(fx * x + ph) * np.cos(fy * y - ph) + 30 * np.sin((x + y) * 0.3 + c)
        chans.append(v)
    img = np.stack(chans, axis=-1) + rng.normal(0.0, 3.0, (height, width, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bytes(
    width: int, height: int, bit_depth: int, color_type: int, idat: bytes
) -> bytes:
    """A minimal PNG (IHDR, one IDAT, IEND) from an already zlib-compressed ``idat``.

    ``idat`` must be the zlib stream of the filtered scanlines (one filter byte, 0 = None,
    before each row). ``color_type``: 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def png16_bytes(samples: np.ndarray) -> bytes:
    """16-bit PNG from ``(H, W)`` grey or ``(H, W, 3)`` RGB integer samples in 0..65535."""
    samples = np.asarray(samples)
    height, width = samples.shape[:2]
    color_type = 0 if samples.ndim == 2 else 2
    big_endian = samples.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + big_endian[r].tobytes() for r in range(height))
    return png_bytes(width, height, 16, color_type, zlib.compress(raw, 6))


def _bomb_png(side: int) -> bytes:
    """1-bit greyscale all-zero PNG declaring ``side x side`` pixels.

    Compressed incrementally from one repeated scanline, so neither the raw 50 MB nor the
    decoded image is ever allocated here; the file is ~50 KB.
    """
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    block_rows = 400
    block = row * block_rows
    comp = zlib.compressobj(9)
    parts = []
    done = 0
    while done < side:
        n = min(block_rows, side - done)
        parts.append(comp.compress(block if n == block_rows else row * n))
        done += n
    parts.append(comp.flush())
    return png_bytes(side, side, 1, 0, b"".join(parts))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _good_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    rgb = Image.fromarray(texture(256, 320, seed=1))
    files["baseline.jpg"] = _save(rgb, "JPEG", quality=90)
    files["progressive.jpg"] = _save(rgb, "JPEG", quality=90, progressive=True)

    square = Image.fromarray(texture(256, 256, seed=2))
    # Pillow writes CMYK JPEGs Adobe-style (inverted), the common awkward case in the wild.
    files["cmyk.jpg"] = _save(square.convert("CMYK"), "JPEG", quality=90)
    files["gray.jpg"] = _save(square.convert("L"), "JPEG", quality=90)

    # Stored 300 wide x 240 high; orientation 6 means "rotate 90 degrees clockwise to view".
    stored = texture(240, 300, seed=3)
    stored[:30, :30] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_orient6.jpg"] = _save(
        Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()
    )

    tile = texture(240, 240, seed=4)
    alpha = np.tile(np.linspace(0, 255, 240, dtype=np.float32), (240, 1)).astype(np.uint8)
    files["rgba.png"] = _save(Image.fromarray(np.dstack([tile, alpha]), "RGBA"), "PNG")
    files["la.png"] = _save(
        Image.fromarray(np.dstack([tile[..., 0], alpha[::-1]]), "LA"), "PNG"
    )
    palette = Image.fromarray(tile).quantize(colors=64)
    files["palette.png"] = _save(palette, "PNG")
    files["palette_trns.png"] = _save(palette, "PNG", transparency=0)
    files["bilevel.png"] = _save(Image.fromarray(tile[..., 1]).convert("1"), "PNG")

    # 16-bit: keep the full 0..65535 range with a non-trivial low byte.
    rng = np.random.default_rng(5)
    gray16 = tile[..., 0].astype(np.uint16) * 257 + rng.integers(0, 200, (240, 240)).astype(
        np.uint16
    )
    files["gray16.png"] = _save(Image.fromarray(gray16), "PNG")  # mode I;16
    files["rgb16.png"] = png16_bytes(tile.astype(np.uint16) * 257)

    if features.check("webp"):
        files["image.webp"] = _save(square, "WEBP", quality=85)

    red = texture(240, 240, seed=6)
    red[..., 0] = np.maximum(red[..., 0], 200)
    red[..., 1:] //= 4
    blue = texture(240, 240, seed=7)
    blue[..., 2] = np.maximum(blue[..., 2], 200)
    blue[..., :2] //= 4
    frames = [Image.fromarray(red).quantize(64), Image.fromarray(blue).quantize(64)]
    files["animated.gif"] = _save(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
    )

    files["image.bmp"] = _save(Image.fromarray(tile), "BMP")
    files["image.tif"] = _save(Image.fromarray(texture(240, 256, seed=8)), "TIFF",
                               compression="tiff_lzw")
    files["gray16.tif"] = _save(Image.fromarray(gray16), "TIFF")  # mode I;16
    files["float.tif"] = _save(
        Image.fromarray(tile[..., 2].astype(np.float32) / 255.0), "TIFF"
    )  # mode F in [0, 1]
    files["small.png"] = _save(Image.fromarray(texture(40, 50, seed=9)), "PNG")
    return files


def _broken_files(good: dict[str, bytes]) -> dict[str, bytes]:
    rng = np.random.default_rng(10)
    jpeg = good["baseline.jpg"]
    png = good["rgba.png"]
    # JPEG headers up to and including the SOS segment, with no entropy-coded data.
    sos = jpeg.index(b"\xff\xda")
    sos_end = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    html = (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><img src=\"cat.jpg\"></body></html>\n"
    )
    return {
        "empty.jpg": b"",
        "notes.txt": b"This is not an image.\nJust some text, saved with a .txt name.\n" * 8,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "random.bin": rng.bytes(4096),
        "page.html": html,
        "bomb.png": _bomb_png(BOMB_SIDE),
        "jpeg_header_only.jpg": jpeg[:sos_end],
        "jpeg_soi_garbage.jpg": b"\xff\xd8\xff\xe0" + rng.bytes(2048),
    }


def make_awkward_files(folder: Path) -> dict[str, bool]:
    """Write the awkward files into ``folder`` (created if missing).

    Returns:
        ``{filename: expected_ok}``: True for files a correct decoder must decode, False
        for files it must reject (``bomb.png`` as ``too_large``, the rest as ``decode``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = _good_files()
    broken = _broken_files(good)
    expected: dict[str, bool] = {}
    for files, ok in ((good, True), (broken, False)):
        for name, payload in files.items():
            (folder / name).write_bytes(payload)
            expected[name] = ok
    return expected
