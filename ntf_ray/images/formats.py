"""Which image formats ntf-ray opens, and the names of those it refuses.

Only formats that browsers show as images are opened (:data:`FORMATS`); anything else that
Pillow's other plugins recognise from their first bytes, and PDF, SVG and HEIF/AVIF, are
named (``unsupported_format: NAME``) without any plugin opening or loading them: no upload
ever reaches an external interpreter such as Ghostscript.
"""

from __future__ import annotations

import re

from PIL import Image

#: The formats ``decode`` opens, as Pillow names them (``Decoded.format``). Each is one that
#: browsers show as an image (TIFF: Safari; also what scanners and cameras write), parsed in
#: Python by Pillow and decoded by its built-in codecs. ICO is in because browsers show it
#: and its images are PNG or BMP, decoded by those same codecs. Left out on purpose:
#: formats no browser or upload form takes (PPM, TGA, PCX, SGI, DDS, FITS, QOI, PSD,
#: JPEG 2000, ...), because each plugin is more parser facing untrusted bytes for images
#: nobody uploads (TGA also has no magic number, so its plugin would claim random bytes);
#: EPS, which Pillow hands to Ghostscript, an interpreter; vector formats (WMF/EMF, and
#: SVG/PDF, which Pillow cannot read); AVIF/HEIC, whose decoders (libavif, libheif) are
#: large native codecs present only in some Pillow builds, and on which the detector was
#: never evaluated.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO")

#: The plugins Image.open may try, in this order. MPO has no opener of its own: the JPEG
#: plugin opens multi-picture files and names them MPO.
OPENERS = tuple(f for f in FORMATS if f != "MPO")

# Formats Pillow has no plugin for, recognised from the first bytes to name them in the
# error. HEIF files are ISO-BMFF: an ``ftyp`` box whose brands say what the file holds.
_SNIFF_BYTES = 4096
_PDF_MAGIC = b"%PDF-"  # readers accept it anywhere in the first 1024 bytes
_HEIF_BRANDS = {
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
    **dict.fromkeys((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"), "HEIC"),
    **dict.fromkeys((b"mif1", b"msf1"), "HEIF"),
}
# An SVG document: optional XML declaration, comments and doctype, then the <svg> root. An
# HTML page with an inline <svg> is not one. (One whitespace character per repetition keeps
# the pattern free of nested quantifiers, so it cannot backtrack exponentially.)
_SVG_RE = re.compile(
    rb"\A(?:\s|<\?xml[^>]*>|<!--.*?-->|<!doctype[^>\[]*(?:\[.*?\])?\s*>)*<svg[\s>/]",
    re.IGNORECASE | re.DOTALL,
)


def unsupported_format(buf: bytes | bytearray | memoryview) -> str | None:
    """Name of an image format outside :data:`FORMATS` that ``buf`` starts like, else None.

    Reads the first bytes only: a few magic numbers, then the ``accept(prefix)`` test of
    every other Pillow plugin that has one (the same 16-byte test ``Image.open`` makes).
    Plugins without such a test would claim any bytes, so they are skipped; nothing here
    opens or loads a file.
    """
    head = bytes(buf[:_SNIFF_BYTES])
    if head[4:8] == b"ftyp":
        box = head[8 : min(len(head), max(16, int.from_bytes(head[:4], "big")))]
        # major brand, minor version, compatible brands: brands sit at multiples of 4 but 4.
        brands = {box[i : i + 4] for i in range(0, len(box) - 3, 4) if i != 4}
        for name in ("AVIF", "HEIC", "HEIF"):
            if any(_HEIF_BRANDS.get(b) == name for b in brands):
                return name
    if _PDF_MAGIC in head[:1024]:
        return "PDF"
    if _SVG_RE.match(head.removeprefix(b"\xef\xbb\xbf")):
        return "SVG"
    prefix = head[:16]
    Image.init()
    for fmt in list(Image.ID):
        if fmt in OPENERS:
            continue
        accept = Image.OPEN[fmt][1]
        if accept is None:
            continue
        try:
            if accept(prefix):  # a str is Pillow's "recognised, cannot open here"
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's sniff failing means "not this one"
            continue
    return None
