"""What a file's headers declare beyond its pixel count, refused before any decoder
allocates for it (``ntf_ray.images.decode`` asks; the results are ``too_large: ...`` reasons).

- an ICO's embedded images: its directory may say 16 x 16 over a 12000 x 12000 PNG, and
  Pillow's ICO plugin decodes the embedded image inside ``Image.open``, so the embedded
  PNG or BMP headers are read first;
- a TIFF's tiles and strips: libtiff allocates a whole tile (a 1 MB file may declare one of
  32768 x 32768 for a 16 x 16 image); at most the image's own pixels, or 16 Mpx, and never
  more than the pixel limit;
(A JPEG's scans, each of which makes the decoder pass over the whole image again, are
counted where its markers are read anyway: ``ntf_ray.images.jpeg_decode``.)
"""

from __future__ import annotations

import struct

from PIL import Image

from ntf_ray.errors import DECODE, TOO_LARGE, error

#: A TIFF tile or strip may hold the image's own pixels, or this many (a small image in one
#: 256 x 256 tile is common), whichever is more, and never more than ``max_pixels``.
TILE_FLOOR_PIXELS = 1 << 24
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def icon_too_large(buf, limit: int | None) -> str | None:
    """``too_large: ...`` when an ICO's directory points at an embedded PNG or BMP whose own
    header declares more than ``limit`` pixels (whatever the directory says), else None."""
    head = bytes(buf[:6])
    if limit is None or len(head) < 6 or head[:4] != b"\x00\x00\x01\x00":
        return None
    (count,) = struct.unpack_from("<H", head, 4)
    for i in range(count):
        entry = bytes(buf[6 + 16 * i : 22 + 16 * i])
        if len(entry) < 16:
            return None  # a short directory: the plugin reports it
        (offset,) = struct.unpack_from("<I", entry, 12)
        sub = bytes(buf[offset : offset + 26])
        if sub[:8] == _PNG_MAGIC and len(sub) >= 24:
            w, h = struct.unpack_from(">II", sub, 16)
        elif len(sub) >= 12 and struct.unpack_from("<I", sub, 0)[0] == 12:  # BITMAPCOREHEADER
            w, h = struct.unpack_from("<HH", sub, 4)
            h //= 2  # the XOR image over its AND mask
        elif len(sub) >= 12:
            w, h = (abs(v) for v in struct.unpack_from("<ii", sub, 4))
            h //= 2
        else:
            continue
        if w * h > limit:
            return error(TOO_LARGE, f"an embedded icon image of {w}x{h} = {w * h} px > limit {limit}")
    return None


def declared_work(im: Image.Image, buf, limit: int | None) -> str | None:
    """``too_large: ...`` for what a header declares beyond its pixels (a TIFF's tile or strip
    size); None when within bounds."""
    if im.format == "TIFF":
        width, height = im.size
        bound = max(width * height, TILE_FLOOR_PIXELS)
        if limit is not None:
            bound = min(bound, limit)
        tags = im.tag_v2
        try:
            tile_w, tile_h, rows = (int(tags.get(t) or 0) for t in (322, 323, 278))
        except (TypeError, ValueError):
            return error(DECODE, "unreadable TIFF tile or strip size")
        if tile_w and tile_h and tile_w * tile_h > bound:
            return error(TOO_LARGE, f"TIFF tiles of {tile_w}x{tile_h} = {tile_w * tile_h} px > limit {bound}")
        if rows and min(rows, height) * width > bound:
            return error(TOO_LARGE, f"TIFF strips of {width}x{min(rows, height)} px > limit {bound}")
    return None
