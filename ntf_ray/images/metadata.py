"""What an image's container says beside its pixels, read without decoding any pixel.

``read_metadata(data, max_pixels=...)`` is where ``images.provenance`` finds an image's
claims. It reads only the formats ``decode`` opens (``formats.OPENERS``, recognised by the
same first-byte tests), and only within ``decode``'s limits: the size a header declares is
checked first, against the same ``max_pixels`` (and for JPEG the same scan count, for TIFF
the same tile and strip sizes), and an image ``decode`` would refuse from its header is not
read any further (``Metadata.readable`` is False). The bytes themselves are those the read
let through (``--max-bytes``). What is read, per format:

- **PNG**: the chunks, walked from the signature to ``IEND``; image data (``IDAT``,
  ``fdAT``) is stepped over, never inflated. Text chunks (``tEXt``, ``zTXt``, ``iTXt``) of
  the keywords asked for, XMP (``iTXt XML:com.adobe.xmp``) and EXIF (``eXIf``, before or
  after the image data, or ImageMagick's ``Raw profile type exif`` text), wherever they sit.
  A compressed chunk is inflated up to a cap (``MAX_TEXT_BYTES``, ``MAX_XMP_BYTES``), never
  whole.
- **JPEG** (and MPO): the marker segments before the first scan: APP1 EXIF and APP1 XMP.
- **WebP**: the RIFF chunks ``EXIF`` and ``XMP `` of an extended (``VP8X``) file.
- **TIFF**: its first IFD (``Software``, ``XMP``), through Pillow's header read, as ``decode``
  opens it; **GIF**: its header only (no EXIF or XMP is read from it; C2PA may be).
- **BMP**, **ICO**: nothing, not even the header (neither has a place for claims; Pillow's ICO
  plugin decodes the embedded image while opening it).

Pillow's ``load()`` is never called, and no decoder is made: a PNG of 120 Mpx costs what its
chunk headers cost. (Pillow's own ``PngImageFile.getexif()`` loads the whole image when no
``eXIf`` chunk precedes the image data, which is why PNG is walked here.)
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field

from PIL import Image

from ntf_ray.images.decode_limits import declared_work
from ntf_ray.images.formats import OPENERS
from ntf_ray.images.jpeg_screen import MAX_SCANS, count_scans

#: Largest XMP packet kept; a larger one is ``xmp: too large`` (never parsed, nor inflated past this).
MAX_XMP_BYTES = 256 * 1024
#: Characters of a PNG text chunk kept (its start: enough to tell an empty chunk and a name).
MAX_TEXT_BYTES = 64 * 1024
#: Bytes of an EXIF block kept (its first IFD, where ``Software`` is, comes first); an
#: ImageMagick ``Raw profile type exif`` chunk is kept to twice this, being hex.
MAX_EXIF_BYTES = 1 << 20

#: Chunks of a PNG or WebP walked at most (a PNG of 1 GiB in 8 KiB image chunks has 131,072):
#: a file of millions of empty chunks is not walked to its end.
MAX_CHUNKS = 1 << 17

# Why a container was not read, or not read whole (``Metadata.problems``): a closed set.
UNSUPPORTED, TOO_LARGE, TRUNCATED, BROKEN, TOO_MANY_CHUNKS = (
    "image: unsupported format", "image: too large", "image: truncated", "image: broken", "image: too many chunks")
XMP_TOO_LARGE = "xmp: too large"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_XMP = "XML:com.adobe.xmp"
_PNG_RAW_EXIF = "Raw profile type exif"
_JPEG_EXIF = b"Exif\x00\x00"
_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers, DHT / JPG / DAC aside
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7
_JPEG_MARKER = re.compile(rb"\xff[^\xff]")  # the last 0xFF of a run, and the marker after it
_TIFF_SOFTWARE = 305


@dataclass(frozen=True)
class Metadata:
    """The parts of one image's container that carry claims (all None: it has none, or they
    were not read: ``problems`` says why).

    ``format`` is the name ``decode`` gives (``formats.FORMATS``; MPO reads as JPEG), None
    for bytes no format ``decode`` opens starts like. ``readable`` is True when the header
    was read and is within ``decode``'s limits: only then is anything else in the file worth
    reading, and C2PA only when the container is not ``damaged`` besides. ``text`` holds the
    PNG text chunks asked for, by keyword, each cut to ``MAX_TEXT_BYTES`` characters.
    ``software`` is EXIF's ``Software`` (a TIFF's own tag)."""

    format: str | None = None
    readable: bool = False
    xmp: bytes | None = None
    software: str | None = None
    text: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # UNSUPPORTED, TOO_LARGE, TRUNCATED, BROKEN, TOO_MANY_CHUNKS; XMP_TOO_LARGE

    @property
    def damaged(self) -> bool:
        """The container ends early, is broken or was not walked to its end where it was read
        (what was read before that point is kept, and is whole)."""
        return any(p in (TRUNCATED, BROKEN, TOO_MANY_CHUNKS) for p in self.problems)


def read_metadata(data: bytes | bytearray | memoryview, *, max_pixels: int | None,
                  keywords: frozenset[str] = frozenset()) -> Metadata:
    """The claims-bearing parts of ``data`` (see module), reading no pixel; never raises for
    bad bytes. ``max_pixels``: ``decode``'s limit (None: none); ``keywords``: the PNG text
    chunks to keep."""
    view = memoryview(data)
    view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    fmt = _format_of(bytes(view[:16]))
    if fmt is None:
        return Metadata(problems=(UNSUPPORTED,))
    try:
        if fmt == "PNG":
            return _png(view, max_pixels, keywords)
        if fmt == "JPEG":
            return _jpeg(view, max_pixels)
        if fmt == "WEBP":
            return _webp(view, max_pixels)
        if fmt in ("TIFF", "GIF"):
            return _pillow_header(view, max_pixels, fmt)
    except (struct.error, IndexError, ValueError):  # a length or an offset past what the bytes hold
        return Metadata(fmt, problems=(BROKEN,))
    return Metadata(fmt)  # BMP, ICO: no place for claims, nothing read


def exif_software(exif: bytes | None) -> str | None:
    """``Software`` (IFD0) of an EXIF block (a TIFF structure, ``Exif\\0\\0`` allowed in front);
    None when absent or unreadable."""
    if not exif:
        return None
    try:
        tags = Image.Exif()
        tags.load(exif[:MAX_EXIF_BYTES + 6])
        value = tags.get(0x0131)
    except Exception:  # noqa: BLE001 - a broken EXIF block names no software
        return None
    return _software(value)


def _format_of(prefix: bytes) -> str | None:
    """The first of ``OPENERS`` whose Pillow first-byte test accepts ``prefix`` (as ``Image.open`` tries them)."""
    Image.init()
    for fmt in OPENERS:
        accept = Image.OPEN[fmt][1]
        try:
            found = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - a test that fails means "not this one"
            continue
        if found and not isinstance(found, str):  # a str is Pillow's "recognised, cannot open"
            return fmt
    return None


def _over(width: int, height: int, limit: int | None) -> bool:
    return limit is not None and width * height > limit


def _png(view: memoryview, limit: int | None, keywords: frozenset[str]) -> Metadata:
    n, pos = len(view), len(_PNG_MAGIC)
    if n < pos + 8 + 13 or bytes(view[pos + 4:pos + 8]) != b"IHDR":
        return Metadata("PNG", problems=(TRUNCATED if n < pos + 8 + 13 else BROKEN,))
    width, height = struct.unpack_from(">II", view, pos + 8)
    if _over(width, height, limit):
        return Metadata("PNG", problems=(TOO_LARGE,))
    if not width or not height or not _crc_ok(view, pos):
        return Metadata("PNG", problems=(BROKEN,))
    wanted = keywords | {_PNG_XMP, _PNG_RAW_EXIF}
    text: dict[str, str] = {}
    xmp = exif = raw_exif = None
    problems: list[str] = []
    for _ in range(MAX_CHUNKS):
        if pos + 8 > n:
            problems.append(TRUNCATED)
            break
        length, kind = struct.unpack_from(">I4s", view, pos)
        start, end = pos + 8, pos + 8 + length
        if length > 0x7FFFFFFF or not kind.isalpha():  # lengths past here cannot be trusted
            problems.append(BROKEN)
            break
        if end + 4 > n:
            problems.append(TRUNCATED)
            break
        chunk, pos = pos, end + 4
        if kind in (b"IDAT", b"fdAT"):
            continue  # image data: stepped over, never inflated (nor summed: the decoder checks it)
        if not _crc_ok(view, chunk):
            problems.append(BROKEN)  # this chunk is not read; the others are
            continue
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            continue
        body = view[start:end]
        if kind == b"eXIf":  # as Pillow: the last one
            exif = bytes(body[:MAX_EXIF_BYTES])
            continue
        found = _png_text(kind, body, wanted)
        if found is None:
            continue
        key, value = found
        if key == _PNG_XMP and kind == b"iTXt":  # as Pillow: XMP from iTXt only
            xmp = value
        elif key == _PNG_RAW_EXIF:
            raw_exif = value
        if key in keywords:
            text[key] = value.decode("utf-8" if kind == b"iTXt" else "latin-1", "replace")
    else:
        problems.append(TOO_MANY_CHUNKS)
    if exif is None and raw_exif is not None:  # ImageMagick's: three lines of header, then the EXIF in hex
        try:
            exif = bytes.fromhex("".join(raw_exif.decode("latin-1").split("\n")[3:]))
        except ValueError:
            exif = None
    if xmp is not None and len(xmp) > MAX_XMP_BYTES:
        xmp = None
        problems.append(XMP_TOO_LARGE)
    return Metadata("PNG", True, xmp, exif_software(exif), text, tuple(dict.fromkeys(problems)))


def _crc_ok(view: memoryview, pos: int) -> bool:
    """Whether the PNG chunk at ``pos`` (whole in ``view``) holds its checksum."""
    (length,) = struct.unpack_from(">I", view, pos)
    return zlib.crc32(view[pos + 4:pos + 8 + length]) == struct.unpack_from(">I", view, pos + 8 + length)[0]


def _png_text(kind: bytes, body: memoryview, wanted: frozenset[str]) -> tuple[str, bytes] | None:
    """(keyword, value) of a text chunk whose keyword is in ``wanted``, its value inflated and
    cut to its cap; None for another keyword, or a chunk that cannot be read (Pillow skips it)."""
    head = bytes(body[:80])  # a keyword is 1-79 bytes
    cut = head.find(b"\x00")
    if cut < 1:
        return None
    key = head[:cut].decode("latin-1")
    if key not in wanted:
        return None
    cap = MAX_XMP_BYTES + 1 if key == _PNG_XMP else 2 * MAX_EXIF_BYTES if key == _PNG_RAW_EXIF else MAX_TEXT_BYTES
    rest = body[cut + 1:]
    if kind == b"tEXt":
        return key, bytes(rest[:cap])
    if kind == b"zTXt":  # compression method 0 (zlib) is the only one
        return (key, _inflate(rest[1:], cap)) if len(rest) and rest[0] == 0 else None
    if len(rest) < 2:  # iTXt: compression flag and method, language, translated keyword, text
        return None
    flag, method, rest = rest[0], rest[1], rest[2:]
    names = bytes(rest[:4096])
    lang_end = names.find(b"\x00")
    tk_end = names.find(b"\x00", lang_end + 1) if lang_end >= 0 else -1
    if tk_end < 0:
        return None
    value = rest[tk_end + 1:]
    if flag:
        return (key, _inflate(value, cap)) if method == 0 else None
    return key, bytes(value[:cap])


def _inflate(data: memoryview, cap: int) -> bytes | None:
    """At most ``cap`` bytes of zlib ``data``, inflated no further; None when it is not zlib."""
    try:
        return zlib.decompressobj().decompress(data, cap)
    except zlib.error:
        return None


def _jpeg(view: memoryview, limit: int | None) -> Metadata:
    data = view.tobytes()  # one copy, searched in C: the headers, then the scans counted
    n, pos = len(data), 2
    size = xmp = None
    exif: list[bytes] = []  # as Pillow: later EXIF segments appended to the first
    problem = None
    while True:
        found = _JPEG_MARKER.search(data, pos)  # stray bytes and fill bytes before it stepped over
        if found is None or found.start() + 4 > n:
            problem = TRUNCATED
            break
        pos = found.start()
        marker = data[pos + 1]
        if marker in _JPEG_NO_LENGTH or marker in (0x00, 0xD8, 0xD9):  # as Pillow, stepped over
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            problem = BROKEN
            break
        if pos + 2 + length > n:
            problem = TRUNCATED
            break
        body = data[pos + 4:pos + 2 + length]
        if marker in _JPEG_SOF and size is None and len(body) >= 5:
            height, width = struct.unpack_from(">HH", body, 1)
            if _over(width, height, limit):
                return Metadata("JPEG", problems=(TOO_LARGE,))
            size = width, height
        elif marker == 0xE1 and body.startswith(_JPEG_EXIF):
            if sum(map(len, exif)) < MAX_EXIF_BYTES:
                exif.append(body[6 if exif else 0:])
        elif marker == 0xE1 and body.startswith(_JPEG_XMP):  # as Pillow: the last one
            xmp = body[len(_JPEG_XMP):]
        elif marker == 0xDA:
            break
        pos += 2 + length
    if size is None or not all(size):  # no frame header read (no size to hold to the limit), or an empty one
        return Metadata("JPEG", problems=(problem or BROKEN,))
    if problem is None and count_scans(data) > MAX_SCANS:  # decode refuses it: each scan is one more pass
        return Metadata("JPEG", problems=(TOO_LARGE,))
    return Metadata("JPEG", True, xmp or None, exif_software(b"".join(exif)), problems=(problem,) if problem else ())


def _webp(view: memoryview, limit: int | None) -> Metadata:
    n = len(view)
    end = min(n, 8 + struct.unpack_from("<I", view, 4)[0])
    kind = bytes(view[12:16])
    head = bytes(view[20:30])  # the first chunk's start: the canvas (VP8X) or the frame's size
    if kind == b"VP8X" and len(head) >= 10:
        width, height = 1 + int.from_bytes(head[4:7], "little"), 1 + int.from_bytes(head[7:10], "little")
    elif kind == b"VP8 " and len(head) >= 10 and head[3:6] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", head, 6))
    elif kind == b"VP8L" and len(head) >= 5 and head[0] == 0x2F:
        bits = int.from_bytes(head[1:5], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    else:
        return Metadata("WEBP", problems=(TRUNCATED if n < 30 else BROKEN,))
    # Pillow's WebP plugin applies its own bomb guard while opening: decode refuses above it too
    hard = None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS
    if _over(width, height, limit) or _over(width, height, hard):
        return Metadata("WEBP", problems=(TOO_LARGE,))
    if not width or not height:
        return Metadata("WEBP", problems=(BROKEN,))
    exif = xmp = None
    problems: list[str] = [TRUNCATED] if end < 8 + struct.unpack_from("<I", view, 4)[0] else []
    pos, walked = 12, 0
    while kind == b"VP8X" and pos + 8 <= end:  # only an extended file has metadata chunks; as Pillow, the first
        walked += 1
        if walked > MAX_CHUNKS:
            problems.append(TOO_MANY_CHUNKS)
            break
        name, length = bytes(view[pos:pos + 4]), struct.unpack_from("<I", view, pos + 4)[0]
        if pos + 8 + length > end:
            problems.append(TRUNCATED)
            break
        if name == b"EXIF" and exif is None:
            exif = bytes(view[pos + 8:pos + 8 + min(length, MAX_EXIF_BYTES)])
        elif name == b"XMP " and xmp is None:
            xmp = bytes(view[pos + 8:pos + 8 + length]) if length <= MAX_XMP_BYTES else b""
            if not xmp and length:
                problems.append(XMP_TOO_LARGE)
        pos += 8 + length + (length & 1)
    return Metadata("WEBP", True, xmp or None, exif_software(exif), problems=tuple(dict.fromkeys(problems)))


def _pillow_header(view: memoryview, limit: int | None, fmt: str) -> Metadata:
    """TIFF and GIF through Pillow's plugin, which reads the header only (``Image.open`` is
    lazy; nothing here loads), checked as ``decode`` checks it."""
    try:
        with Image.open(io.BytesIO(view), formats=(fmt,)) as im:
            width, height = im.size
            if _over(width, height, limit) or declared_work(im, view, limit) is not None:
                return Metadata(fmt, problems=(TOO_LARGE,))
            if fmt == "GIF":
                return Metadata(fmt, True)
            xmp = im.info.get("xmp")
            software = _software(im.tag_v2.get(_TIFF_SOFTWARE))
    except Image.DecompressionBombError:
        return Metadata(fmt, problems=(TOO_LARGE,))
    except Exception:  # noqa: BLE001 - whatever Pillow makes of a broken header
        return Metadata(fmt, problems=(BROKEN,))
    if isinstance(xmp, tuple) and len(xmp) == 1:
        xmp = xmp[0]
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    if not isinstance(xmp, bytes) or not xmp:
        return Metadata(fmt, True, None, software)
    if len(xmp) > MAX_XMP_BYTES:
        return Metadata(fmt, True, None, software, problems=(XMP_TOO_LARGE,))
    return Metadata(fmt, True, xmp, software)


def _software(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip("\x00 ") or None
