"""Files built to hold a decoder: declared sizes far past their bytes, thousands of scans,
an icon hiding a huge image, a sliver, a JPEG cut short that still ends like a whole one, a
PNG of 120 Mpx in 350 KB.

Each maker returns the file's bytes; ``bombs()`` names one of each. Sizes are parameters so
that tests build small ones and ``bench/scan_memory.py`` the full-size ones of the issue.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def bmp_absurd_width(width: int = 2**32 - 127) -> bytes:
    """A BMP whose header declares ``width`` x 1 (a classic malformed-BMP case)."""
    info = struct.pack("<IIiHHIIiiII", 40, width, 1, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def tiff_huge_tile(side: int = 16, tile: int = 32768, zeros: int = 1 << 20) -> bytes:
    """A ``side x side`` 8-bit grey deflate TIFF declaring one ``tile x tile`` tile, its data
    ``zeros`` zero bytes deflated (1 GiB of them is a 1 MB file; libtiff allocates the tile)."""
    packer, parts, block = zlib.compressobj(9), [], b"\x00" * (1 << 24)
    for start in range(0, zeros, len(block)):
        parts.append(packer.compress(block[: min(len(block), zeros - start)]))
    data = b"".join(parts) + packer.flush()
    entries = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, 0), (325, 4, 1, len(data))]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 324 else value
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + b"\x00\x00\x00\x00" + data


def _scans(jpeg: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(header up to the first scan, each scan with its entropy data, the tail from EOI)."""
    starts = []
    pos = 2
    while pos < len(jpeg) - 1:
        marker = jpeg[pos + 1]
        if marker == 0xDA:
            break
        (length,) = struct.unpack_from(">H", jpeg, pos + 2)
        pos += 2 + length
    header = jpeg[:pos]
    end = jpeg.rindex(b"\xff\xd9")
    i = pos
    while i < end:
        starts.append(i)
        i = jpeg.find(b"\xff\xda", i + 2)
        if i < 0:
            break
    starts.append(end)
    return header, [jpeg[a:b] for a, b in zip(starts, starts[1:])], jpeg[end:]


def progressive_many_scans(side: int = 64, scans: int = 600, flat: bool = False) -> bytes:
    """A progressive JPEG of ``side x side`` whose last scan is repeated up to ``scans`` scans
    (libjpeg only warns, then decodes the whole image again for every one). ``flat``: a grey
    image, whose refinement scans are a few bytes each (the small file of a big bomb)."""
    rng = np.random.default_rng(0)
    img = (Image.new("RGB", (side, side), (128, 128, 128)) if flat else
           Image.fromarray(np.cumsum(rng.integers(0, 8, (side, side, 3)), axis=1).astype(np.uint8)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True, quality=80)
    header, parts, tail = _scans(buf.getvalue())
    return header + b"".join(parts) + parts[-1] * max(0, scans - len(parts)) + tail


def ico_hiding(side: int = 12000, declared: int = 16) -> bytes:
    """An ICO whose directory says ``declared x declared`` over an embedded ``side x side`` PNG."""
    png = io.BytesIO()
    Image.new("1", (side, side), 0).save(png, "PNG")
    data = png.getvalue()
    entry = struct.pack("<BBBBHHII", declared % 256, declared % 256, 0, 0, 1, 32, len(data), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + data


def thin_png(width: int = 99600, height: int = 50) -> bytes:
    """A sliver that fits the pixel limit once upscaled, but only just."""
    img = Image.fromarray(np.tile(np.arange(width, dtype=np.uint32) % 251, (height, 1)).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, checksum."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_compressed(width: int = 12000, height: int = 10000, mode: str = "RGB", before: tuple[bytes, ...] = (),
                   after: tuple[bytes, ...] = ()) -> bytes:
    """A PNG of ``width x height`` black pixels, deflated: 120 Mpx of RGB in 350 KB. No eXIf
    chunk precedes its image data (Pillow's ``getexif()`` then decodes the whole image);
    ``before`` and ``after`` are chunks (``png_chunk``) put before and after the image data."""
    channels, colour = {"L": (1, 0), "RGB": (3, 2)}[mode]
    row = b"\x00" * (1 + width * channels)  # filter byte "none", then the row's samples
    packer, rows, parts = zlib.compressobj(9), max(1, (1 << 24) // len(row)), []
    for start in range(0, height, rows):
        parts.append(packer.compress(row * min(rows, height - start)))
    idat = b"".join(parts) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(before) + png_chunk(b"IDAT", idat)
            + b"".join(after) + png_chunk(b"IEND", b""))


def jpeg_cut_with_eoi(side: int = 256) -> bytes:
    """A baseline JPEG cut in half, an end-of-image marker appended."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    whole = buf.getvalue()
    return whole[: len(whole) // 2] + b"\xff\xd9"


def bombs(small: bool = True) -> dict[str, bytes]:
    """One of each, by a file name with the extension a user would see."""
    if small:
        return {"absurd-width.bmp": bmp_absurd_width(), "huge-tile.tif": tiff_huge_tile(),
                "many-scans.jpg": progressive_many_scans(64, 600), "hiding.ico": ico_hiding(3000),
                "sliver.png": thin_png(), "cut-with-eoi.jpg": jpeg_cut_with_eoi()}
    return {"absurd-width.bmp": bmp_absurd_width(), "huge-tile.tif": tiff_huge_tile(zeros=1 << 30),
            "many-scans.jpg": progressive_many_scans(8192, 6000, flat=True), "hiding.ico": ico_hiding(12000),
            "sliver.png": thin_png(), "cut-with-eoi.jpg": jpeg_cut_with_eoi(2048)}
