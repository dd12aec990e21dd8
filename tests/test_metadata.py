"""What an image's container says beside its pixels (``images.metadata``): read as Pillow reads
it once it has decoded the whole image (the reference), wherever the parts sit, without
decoding anything, within caps, and for the formats the scan opens only."""

from __future__ import annotations

import io
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ntf_ray.images import metadata
from ntf_ray.images.metadata import read_metadata
from tests.bombs import png_chunk, png_compressed
from tests.provenance_images import IPTC, pixels_decoded, xmp_packet

KEYWORDS = frozenset({"parameters", "prompt", "Software"})
XMP = xmp_packet(IPTC + "trainedAlgorithmicMedia", tool="Example Generator")


def exif_block(software: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = software
    return exif.tobytes()  # "Exif\0\0" and a TIFF structure


def itxt(key: str, text: bytes, compressed: bool = False) -> bytes:
    value = zlib.compress(text) if compressed else text
    return png_chunk(b"iTXt", key.encode("latin-1") + b"\x00" + bytes([compressed, 0]) + b"\x00\x00" + value)


def ztxt(key: str, text: bytes) -> bytes:
    return png_chunk(b"zTXt", key.encode("latin-1") + b"\x00\x00" + zlib.compress(text))


def pillow_reads(data: bytes) -> tuple[bytes | None, str | None, dict[str, str]]:
    """The reference: (XMP, EXIF Software, text of KEYWORDS) as Pillow has them after decoding
    the whole image, when it has read the file to its end."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        software = im.getexif().get(0x0131)
        text = {k: str(v) for k, v in im.info.items() if k in KEYWORDS}
        return im.info.get("xmp"), software.strip("\x00 ") if isinstance(software, str) else None, text


def pillow_saved(fmt: str, **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(out, fmt, **kwargs)
    return out.getvalue()


def png_info(*text: tuple[str, str, bool]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value, zipped in text:
        info.add_text(key, value, zip=zipped)
    return info


ORDINARY = {
    "png, claims before the pixels": lambda: pillow_saved(
        "PNG", exif=exif_block("Camera FW 2"),
        pnginfo=png_info(("parameters", "a cat\nSteps: 20", False), ("Software", "Example UI", True),
                         ("XML:com.adobe.xmp", XMP.decode(), False))),
    "png, claims after the pixels": lambda: png_compressed(
        40, 30, after=(png_chunk(b"eXIf", exif_block("Camera FW 3")[6:]), itxt("XML:com.adobe.xmp", XMP, True),
                       ztxt("Software", b"After UI"), png_chunk(b"tEXt", b"prompt\x00{\"3\": {}}"))),
    "png, ImageMagick's raw EXIF profile": lambda: png_compressed(
        40, 30, before=(ztxt("Raw profile type exif",
                             b"\nexif\n      60\n" + exif_block("Magick Cam").hex().encode() + b"\n"),)),
    "jpeg": lambda: pillow_saved("JPEG", exif=exif_block("Phone Camera 3.2"), xmp=XMP),
    "webp": lambda: pillow_saved("WEBP", exif=exif_block("WebP Cam"), xmp=XMP),
    "webp, lossless": lambda: pillow_saved("WEBP", lossless=True, exif=exif_block("WebP Lossless")),
    "tiff": lambda: pillow_saved("TIFF", tiffinfo={305: "Scanner 9"}, xmp=XMP),
}


@pytest.mark.parametrize("case", list(ORDINARY))
def test_ordinary_files_read_as_pillow_reads_them_after_decoding_them_and_decode_nothing(case):
    data = ORDINARY[case]()
    with pixels_decoded() as calls:
        got = read_metadata(data, max_pixels=10_000, keywords=KEYWORDS)
    assert calls == [], calls
    xmp, software, text = pillow_reads(data)
    assert (got.xmp, got.software, got.text) == (xmp, software, text), case
    assert got.readable and got.problems == () and not got.damaged, got
    assert got.software or got.xmp  # each case makes a claim: the comparison is not of two nothings


def test_two_exif_and_xmp_segments_of_a_jpeg_read_as_pillow_reads_them():
    one = pillow_saved("JPEG", exif=exif_block("First"), xmp=xmp_packet(tool="Old Editor"))
    second_xmp = b"http://ns.adobe.com/xap/1.0/\x00" + XMP
    data = one[:2] + b"\xff\xe1" + (2 + len(second_xmp)).to_bytes(2, "big") + second_xmp + one[2:]
    got = read_metadata(data, max_pixels=None)
    assert (got.xmp, got.software, got.text) == pillow_reads(data)[:2] + ({},)


def test_a_large_png_is_walked_without_its_image_data_ever_being_inflated():
    """64 Mpx (under the default limit): the chunks after its image data are read, and the
    walk allocates nothing near the size of the pixels, or of the image data itself."""
    data = png_compressed(8000, 8000, mode="L", after=(png_chunk(b"eXIf", exif_block("Late Cam")[6:]),))
    tracemalloc.start()
    try:
        with pixels_decoded() as calls:
            got = read_metadata(data, max_pixels=100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == [] and got.software == "Late Cam", (calls, got)
    assert peak < 256 * 1024, peak  # the image data alone is 62 KB compressed, 64 MB inflated


def test_over_the_limit_nothing_past_the_header_is_read():
    data = png_compressed(4000, 3000, mode="L", before=(png_chunk(b"tEXt", b"Software\x00Bomb UI"),))
    got = read_metadata(data, max_pixels=4000 * 3000 - 1, keywords=KEYWORDS)
    assert (got.format, got.readable, got.text, got.problems) == ("PNG", False, {}, (metadata.TOO_LARGE,))
    assert read_metadata(data, max_pixels=4000 * 3000, keywords=KEYWORDS).text == {"Software": "Bomb UI"}
    assert read_metadata(data, max_pixels=None, keywords=KEYWORDS).readable


def test_compressed_text_is_inflated_only_to_its_cap():
    """A zTXt chunk of 32 MB of text in 32 KB: its start is kept, the rest never inflated;
    XMP past its cap is refused, not parsed."""
    huge = ztxt("parameters", b"a cat, " + b"a" * (32 << 20))
    big_xmp = itxt("XML:com.adobe.xmp", XMP + b" " * (metadata.MAX_XMP_BYTES * 4), True)
    data = png_compressed(40, 30, before=(huge, big_xmp))
    tracemalloc.start()
    try:
        got = read_metadata(data, max_pixels=None, keywords=KEYWORDS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got.text["parameters"]) == metadata.MAX_TEXT_BYTES and got.text["parameters"].startswith("a cat, ")
    assert got.xmp is None and got.problems == ("xmp: too large",) and got.readable and not got.damaged
    assert peak < 8 * metadata.MAX_XMP_BYTES + (1 << 20), peak


def test_a_damaged_container_keeps_what_was_read_whole_and_says_so(monkeypatch):
    good = png_compressed(40, 30, before=(png_chunk(b"tEXt", b"Software\x00Kept UI"),),
                          after=(png_chunk(b"tEXt", b"prompt\x00{}"),))
    cut = good[:-20]  # into the last text chunk
    got = read_metadata(cut, max_pixels=None, keywords=KEYWORDS)
    assert (got.text, got.problems, got.damaged) == ({"Software": "Kept UI"}, (metadata.TRUNCATED,), True)
    at = good.index(b"Kept UI")
    flipped = good[:at] + b"X" + good[at + 1:]  # its checksum no longer holds: that chunk alone is not read
    got = read_metadata(flipped, max_pixels=None, keywords=KEYWORDS)
    assert (got.text, got.problems) == ({"prompt": "{}"}, (metadata.BROKEN,))
    monkeypatch.setattr(metadata, "MAX_CHUNKS", 50)
    many = png_compressed(4, 4, after=(png_chunk(b"zzZz", b""),) * 100 + (png_chunk(b"tEXt", b"Software\x00Late"),))
    got = read_metadata(many, max_pixels=None, keywords=KEYWORDS)
    assert (got.text, got.problems) == ({}, (metadata.TOO_MANY_CHUNKS,))


def test_formats_the_scan_does_not_open_are_not_read_and_bmp_and_ico_hold_nothing():
    if not any("AVIF" in Image.SAVE for _ in [Image.init()]):
        pytest.skip("this Pillow has no AVIF")
    avif = pillow_saved("AVIF", exif=exif_block("AVIF Cam"), xmp=XMP)
    assert pillow_reads(avif)[:2] == (XMP, "AVIF Cam")  # Pillow reads it; the scan refuses it
    assert read_metadata(avif, max_pixels=None) == metadata.Metadata(problems=(metadata.UNSUPPORTED,))
    assert read_metadata(b"%PDF-1.7\n" + XMP, max_pixels=None).problems == (metadata.UNSUPPORTED,)
    for fmt in ("BMP", "ICO"):
        data = pillow_saved(fmt)
        with pixels_decoded() as calls:  # Pillow's ICO plugin decodes its image while opening it
            got = read_metadata(data, max_pixels=None)
        assert (got.format, got.readable, got.problems, calls) == (fmt, False, (), [])
