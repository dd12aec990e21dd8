"""Read a JPEG's markers (no pixels) and decide whether the GPU decoder may have it.

The GPU decoder (nvJPEG, through ``torchvision.io.decode_jpeg(..., device="cuda")``) is
not a drop-in for the core decoder (Pillow): it returns a partial image for a truncated
file as if it were whole, rejects CMYK/YCCK files (and one such file fails the whole
batched call), ignores EXIF orientation, and knows nothing of the pixel limit. So every
file is screened here first, from its markers alone, and only plain files go to the GPU:

- baseline or progressive Huffman, 8-bit, 1 (grey) or 3 (YCbCr) components;
- ends with the end-of-image marker (trailing padding aside);
- no EXIF/XMP orientation other than "normal", not a multi-picture file (MPO);
- within the pixel limit and ``MAX_SCANS`` progressive scans.

Everything else goes to the core decoder on the CPU, which reports the same errors (and
decodes the same oddities) as it does for any other scan, so routing never changes what a
row says, only how fast it is written.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
#: SOF markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOF_GPU = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_ORIENTATION_TAG = 0x0112
#: Most scans a JPEG may hold (progressive files carry about 10). Each scan makes the decoder
#: pass over the whole image again, so a small file of thousands of tiny scans costs minutes
#: of CPU; libjpeg-turbo's own scan limit (``-maxscans``, ``TJPARAM_SCANLIMIT``), which its
#: fuzzers set to 500, refuses such files the same way.
MAX_SCANS = 500
# In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing) or RST0-7; anything else is a marker.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass(frozen=True)
class Screen:
    """Where one file decodes: ``gpu`` is True only for plain baseline/progressive JPEGs.

    ``reason`` says why a JPEG goes to the CPU (for logs and tests); ``width``/``height``
    come from the frame header when it was found.
    """

    gpu: bool
    reason: str
    width: int | None = None
    height: int | None = None
    orientation: int = 1  # the EXIF orientation (IFD0) when it is the reason the file is not plain
    scans: int | None = None  # the scans counted (up to MAX_SCANS + 1) when the screen counted them


def count_scans(data: bytes | bytearray | memoryview, limit: int = MAX_SCANS) -> int:
    """How many scans (start-of-scan segments) the first image of a JPEG holds, counting
    stops at ``limit + 1``. Reads markers only: entropy-coded data is skipped by a search for
    the next marker, so a file is walked at memory speed."""
    view = bytes(data) if not isinstance(data, bytes) else data
    n, pos, scans = len(view), 2, 0
    while pos + 4 <= n and scans <= limit:
        if view[pos] != 0xFF:
            return scans  # corrupt: the decoder will say so
        marker = view[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:  # end of the first image
            return scans
        if marker in _NO_LENGTH or marker == 0xD8:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", view, pos + 2)
        pos += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        found = _MARKER_IN_SCAN.search(view, pos)
        while found is not None and view[found.start() + 1] == 0xFF:  # fill bytes before a marker
            found = _MARKER_IN_SCAN.search(view, found.start() + 1)
        if found is None:
            return scans
        pos = found.start()
    return scans


def screen(data: bytes | bytearray | memoryview, *, max_pixels: int | None, allow_orientation: bool = False) -> Screen:
    """Decide from the markers alone whether ``data`` may be decoded on the GPU.

    ``allow_orientation``: a file plain but for its EXIF orientation passes too, with the
    ``orientation`` to apply (for decoders that rotate the pixels themselves)."""
    buf = bytes(data[:2])
    if buf != SOI:
        return Screen(False, "not a JPEG")
    view = memoryview(data)
    n = len(view)
    if not _ends_with_eoi(view):
        return Screen(False, "no end-of-image marker (truncated?)")
    pos = 2
    sof = None
    components = 0
    precision = 0
    width = height = None
    adobe_transform = None
    oriented, exif_seen = 1, False
    while pos + 4 <= n:
        if view[pos] != 0xFF:
            return Screen(False, "corrupt marker sequence", width, height)
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            return Screen(False, "unexpected SOI/EOI in the header", width, height)
        (length,) = struct.unpack_from(">H", view, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return Screen(False, "corrupt segment length", width, height)
        body = view[pos + 4 : pos + 2 + length]
        if marker in _SOF:
            if sof is not None:
                return Screen(False, "more than one frame header", width, height)
            if len(body) < 6:
                return Screen(False, "short frame header")
            sof = marker
            precision, height, width, components = struct.unpack_from(">BHHB", body, 0)
        elif marker == 0xE1:
            if bytes(body[:len(_EXIF)]) == _EXIF:
                if exif_seen:  # Pillow reads the first; leave such files to it
                    return Screen(False, "two EXIF segments", width, height)
                exif_seen = True
            orientation = _app1_orientation(bytes(body))
            if orientation is not None and orientation != 1:
                if not (allow_orientation and 2 <= orientation <= 8):
                    return Screen(False, f"orientation {orientation}", width, height, orientation)
                oriented = orientation
        elif marker == 0xE2 and bytes(body[:4]) == b"MPF\x00":
            return Screen(False, "multi-picture (MPO)", width, height)  # Pillow names its format MPO
        elif marker == 0xEE and bytes(body[:5]) == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    else:
        return Screen(False, "no start of scan", width, height)
    if sof is None:
        return Screen(False, "no frame header", width, height)
    if sof not in _SOF_GPU:
        return Screen(False, f"frame type 0x{sof:02X} (lossless/arithmetic/hierarchical)", width, height)
    if precision != 8:
        return Screen(False, f"{precision}-bit samples", width, height)
    if components == 4:
        return Screen(False, "CMYK/YCCK", width, height)
    if components not in (1, 3):
        return Screen(False, f"{components} components", width, height)
    if components == 3 and adobe_transform == 0:
        return Screen(False, "RGB-coded JPEG (Adobe transform 0)", width, height)
    if not width or not height:
        return Screen(False, "zero size in the frame header", width, height)
    if max_pixels is not None and width * height > max_pixels:
        return Screen(False, "over the pixel limit", width, height)
    scans = count_scans(view) if sof == 0xC2 else None
    if scans is not None and scans > MAX_SCANS:
        return Screen(False, f"more than {MAX_SCANS} scans", width, height, scans=scans)
    return Screen(True, "", width, height, oriented, scans)


def _ends_with_eoi(view: memoryview) -> bool:
    """The end-of-image marker is the last thing in the file, zero/whitespace padding aside."""
    tail = bytes(view[-64:]).rstrip(b"\x00\r\n\t ")
    return tail.endswith(EOI)


def _app1_orientation(body: bytes) -> int | None:
    """The orientation an APP1 segment declares (EXIF tag 0x0112 in IFD0, or XMP), else None.

    Unreadable metadata counts as "some orientation" (0): the CPU decoder then decides,
    as it would for any other file.
    """
    if body.startswith(_XMP):
        return 0 if b"Orientation" in body else None
    if not body.startswith(_EXIF):
        return None
    tiff = body[len(_EXIF):]
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * i)
            if tag == _ORIENTATION_TAG:
                if kind != 3:  # SHORT
                    return 0
                return struct.unpack_from(order + "H", value, 0)[0]
    except (KeyError, struct.error):
        return 0
    return None
