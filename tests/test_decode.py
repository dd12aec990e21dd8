"""Tests for ntf_ray.images.decode: every awkward file, modes, orientation, bombs, input types."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from ntf_ray.images.decode import DEFAULT_MAX_PIXELS, FORMATS, Decoded, decode
from tests.awkward import BOMB_SIDE, make_awkward_files, png16_bytes, texture

REPO = Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _assert_good(res: Decoded) -> None:
    assert res.ok, res.error
    assert res.error is None
    img = res.image
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.flags.c_contiguous
    assert img.flags.writeable
    assert (res.height, res.width) == img.shape[:2]
    assert isinstance(res.format, str) and res.format


def _assert_bad(res: Decoded, prefix: str) -> None:
    assert not res.ok
    assert res.image is None
    assert isinstance(res.error, str) and res.error.startswith(prefix), res.error
    assert len(res.error) > len(prefix)
    assert "\n" not in res.error and len(res.error) <= 200
    assert " at 0x" not in res.error  # no object reprs / addresses


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    folder = tmp_path_factory.mktemp("awkward")
    return folder, make_awkward_files(folder)


# --------------------------------------------------------------------------- awkward set


def test_awkward_set_is_small_and_varied(tmp_path):
    expected = make_awkward_files(tmp_path / "timed")
    files = sorted((tmp_path / "timed").iterdir())
    assert {f.name for f in files} == set(expected)
    assert len(expected) >= 20
    assert sum(f.stat().st_size for f in files) < 3 * 1024 * 1024
    assert sum(expected.values()) >= 12 and sum(not v for v in expected.values()) >= 8
    # Deterministic: a second run writes identical bytes.
    again = make_awkward_files(tmp_path / "again")
    for name in again:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "timed" / name).read_bytes(), name


def test_every_awkward_file(awkward):
    folder, expected = awkward
    for name, expected_ok in sorted(expected.items()):
        res = decode((folder / name).read_bytes())  # must not raise
        assert res.ok == expected_ok, (name, res.error)
        if expected_ok:
            _assert_good(res)
            assert min(res.width, res.height) >= (40 if name == "small.png" else 240), name
        else:
            _assert_bad(res, "too_large:" if name == "bomb.png" else "decode:")


def test_awkward_formats_and_sizes(awkward):
    folder, _ = awkward
    want = {
        "baseline.jpg": ("JPEG", 320, 256),
        "progressive.jpg": ("JPEG", 320, 256),
        "cmyk.jpg": ("JPEG", 256, 256),
        "gray.jpg": ("JPEG", 256, 256),
        "exif_orient6.jpg": ("JPEG", 240, 300),
        "rgba.png": ("PNG", 240, 240),
        "gray16.png": ("PNG", 240, 240),
        "rgb16.png": ("PNG", 240, 240),
        "animated.gif": ("GIF", 240, 240),
        "image.bmp": ("BMP", 240, 240),
        "image.tif": ("TIFF", 256, 240),
        "float.tif": ("TIFF", 240, 240),
        "small.png": ("PNG", 50, 40),
    }
    for name, (fmt, w, h) in want.items():
        res = decode((folder / name).read_bytes())
        assert (res.format, res.width, res.height) == (fmt, w, h), name
        assert res.image.shape == (h, w, 3), name


def test_error_kinds(awkward):
    folder, _ = awkward
    reasons = {n: decode((folder / n).read_bytes()).error for n in (
        "empty.jpg", "notes.txt", "page.html", "random.bin", "truncated.jpg",
        "truncated.png", "jpeg_header_only.jpg", "bomb.png",
    )}
    assert reasons["empty.jpg"] == "decode: empty file"
    assert reasons["notes.txt"] == "decode: not an image"
    assert reasons["page.html"] == "decode: not an image"
    assert reasons["random.bin"] == "decode: not an image"
    assert reasons["truncated.jpg"] == "decode: truncated image"
    assert reasons["truncated.png"] == "decode: truncated image"
    assert reasons["jpeg_header_only.jpg"] == "decode: truncated image"
    assert reasons["bomb.png"] == (
        f"too_large: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} px > limit {DEFAULT_MAX_PIXELS}"
    )
    # Truncated files keep what the header said.
    res = decode((folder / "truncated.jpg").read_bytes())
    assert (res.format, res.width, res.height) == ("JPEG", 320, 256)


def test_truncation_never_tolerated_globally(awkward):
    folder, _ = awkward
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    decode((folder / "truncated.jpg").read_bytes())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- modes


def test_exif_orientation_6_rotates_clockwise(awkward):
    folder, _ = awkward
    res = decode((folder / "exif_orient6.jpg").read_bytes())
    _assert_good(res)
    assert res.image.shape == (300, 240, 3)
    # The red block stored top-left is top-right after a 90 degree clockwise turn.
    corner = res.image[3:27, -27:-3].reshape(-1, 3).mean(axis=0)
    assert corner[0] > 200 and corner[1] < 50 and corner[2] < 50, corner
    top_left = res.image[3:27, 3:27].reshape(-1, 3).mean(axis=0)
    assert not (top_left[0] > 200 and top_left[1] < 50 and top_left[2] < 50), top_left


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_orientations_match_exif_transpose(orientation):
    arr = texture(24, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(arr), "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    res = decode(data)
    _assert_good(res)
    np.testing.assert_array_equal(res.image, expected)
    assert (res.height, res.width) == ((24, 40) if orientation <= 4 else (40, 24))


def test_bad_orientation_value_is_ignored():
    exif = Image.Exif()
    exif[0x0112] = 9  # out of range
    res = decode(_encode(Image.fromarray(texture(30, 50, 1)), "JPEG", exif=exif.tobytes()))
    _assert_good(res)
    assert res.image.shape == (30, 50, 3)


def test_cmyk_jpeg_is_converted_to_rgb():
    colour = (200, 60, 40)
    rgb = Image.new("RGB", (64, 64), colour)
    data = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    res = decode(data)
    _assert_good(res)
    mean = res.image.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, colour, atol=6)


def test_grayscale_jpeg_becomes_three_equal_channels(awkward):
    folder, _ = awkward
    img = decode((folder / "gray.jpg").read_bytes()).image
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_16bit_gray_png_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535, 1000, 40000]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    res = decode(data)
    _assert_good(res)
    got = res.image[0, :, 0]
    np.testing.assert_array_equal(got, np.round(values[0] / 257).astype(np.uint8))
    assert got[2] == 128 and got[3] == 255 and got[4] == 4  # clipping would give 255s
    assert (res.image == res.image[..., :1]).all()


def test_16bit_gray_tiff_is_scaled():
    values = np.full((8, 8), 32768, np.uint16)
    res = decode(_encode(Image.fromarray(values), "TIFF"))
    _assert_good(res)
    assert (res.image == 128).all()


def test_16bit_rgb_png_is_scaled():
    samples = np.zeros((4, 6, 3), np.uint16)
    samples[...] = (32768, 65535, 300)
    res = decode(png16_bytes(samples))
    _assert_good(res)
    assert np.abs(res.image.astype(int) - (128, 255, 1)).max() <= 1


def test_int32_tiff_in_16bit_range_is_scaled_and_out_of_range_is_an_error():
    values = np.full((6, 6), 32768, np.int32)
    data = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    res = decode(data)
    _assert_good(res)
    assert (res.image == 128).all()
    values[0, 0] = -5
    _assert_bad(decode(_encode(Image.fromarray(values), "TIFF")), "decode:")


def test_float_tiff_ranges():
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    res = decode(_encode(Image.fromarray(unit), "TIFF"))
    _assert_good(res)
    np.testing.assert_array_equal(res.image[..., 0], np.rint(unit * 255).astype(np.uint8))
    eight = unit * 255
    np.testing.assert_array_equal(
        decode(_encode(Image.fromarray(eight), "TIFF")).image[..., 0], np.rint(eight)
    )
    bad = unit.copy()
    bad[0, 0] = np.nan
    _assert_bad(decode(_encode(Image.fromarray(bad), "TIFF")), "decode:")
    _assert_bad(decode(_encode(Image.fromarray(unit - 2), "TIFF")), "decode:")


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[0, 3] = (0, 255, 0, 0)  # transparent green -> white (colour ignored)
    res = decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    _assert_good(res)
    px = res.image[0]
    assert tuple(px[0]) == (255, 255, 255)
    assert tuple(px[1]) == (255, 0, 0)
    assert tuple(px[2]) == (127, 127, 127)  # 255 * (255 - 128) / 255
    assert tuple(px[3]) == (255, 255, 255)


def test_opaque_rgba_is_unchanged():
    arr = texture(10, 12, 3)
    rgba = np.dstack([arr, np.full((10, 12), 255, np.uint8)])
    res = decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(res.image, arr)


def test_palette_transparency_and_la_are_composited_on_white():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    res = decode(_encode(pal, "PNG", transparency=0))
    _assert_good(res)
    assert tuple(res.image[0, 0]) == (255, 255, 255)
    assert tuple(res.image[1, 1]) == (10, 200, 30)
    la = Image.fromarray(np.dstack([np.full((3, 3), 50, np.uint8), np.zeros((3, 3), np.uint8)]), "LA")
    assert (decode(_encode(la, "PNG")).image == 255).all()


def test_gif_first_frame_only(awkward):
    folder, _ = awkward
    res = decode((folder / "animated.gif").read_bytes())
    _assert_good(res)
    with Image.open(folder / "animated.gif") as gif:
        assert gif.n_frames >= 2
    r, g, b = res.image.reshape(-1, 3).mean(axis=0)
    assert r > 150 and b < 100, (r, g, b)  # frame 0 is red, frame 1 blue


def test_bilevel_and_palette_modes(awkward):
    folder, _ = awkward
    bilevel = decode((folder / "bilevel.png").read_bytes()).image
    assert set(np.unique(bilevel)) <= {0, 255}
    _assert_good(decode((folder / "palette.png").read_bytes()))


def _composite_reference(rgba: np.ndarray) -> np.ndarray:
    """The compositing formula on the whole image at once, in int64."""
    rgb, a = rgba[..., :3].astype(np.int64), rgba[..., 3:].astype(np.int64)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


@pytest.mark.parametrize("block_pixels", [1, 7 * 13, 1 << 20])
def test_blocks_of_rows_give_the_whole_image_result(monkeypatch, block_pixels):
    """Rows leave Pillow in blocks; any block size gives the same pixels, mode by mode."""
    import ntf_ray.images.decode_pixels as pixels_module

    monkeypatch.setattr(pixels_module, "_BLOCK_PIXELS", block_pixels)
    rng = np.random.default_rng(19)
    rgba = rng.integers(0, 256, (37, 13, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 255  # an opaque block among translucent ones
    np.testing.assert_array_equal(decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG")).image,
                                  _composite_reference(rgba))
    arr = texture(37, 13, 20)
    np.testing.assert_array_equal(decode(_encode(Image.fromarray(arr), "PNG")).image, arr)
    pal = Image.fromarray(arr).quantize(16)
    data = _encode(pal, "PNG", transparency=3)
    expected = _composite_reference(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")))
    np.testing.assert_array_equal(decode(data).image, expected)
    gray = Image.fromarray(arr[..., 0])
    np.testing.assert_array_equal(decode(_encode(gray, "PNG")).image, np.repeat(arr[..., :1], 3, axis=2))


def _decode_with_peak(data: bytes):
    """``decode(data)`` and the peak of what tracemalloc saw allocated meanwhile."""
    tracemalloc.start()
    try:
        res = decode(data)
        return res, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rgba_decode_peak_memory_stays_near_the_output_size():
    """A translucent 3000x3000 PNG: numpy's temporaries must not be whole-image sized
    (tracemalloc sees numpy's and Python's allocations, not Pillow's own frame)."""
    side = 3000
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    rgba = np.empty((side, side, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = ramp[None, :], ramp[:, None], 90
    rgba[..., 3] = ramp[None, :] // 2 + 64
    data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    expected = _composite_reference(rgba[:8])
    del rgba
    res, peak = _decode_with_peak(data)
    _assert_good(res)
    np.testing.assert_array_equal(res.image[:8], expected)
    # Whole-image uint16 arithmetic peaked at about 8.7x the RGB output; in blocks, about 1.8x.
    assert peak < 2.5 * res.image.nbytes, peak / res.image.nbytes


# --------------------------------------------------------------------------- bombs / limits


def test_bomb_is_refused_without_allocating(awkward, monkeypatch):
    folder, _ = awkward
    data = (folder / "bomb.png").read_bytes()
    assert len(data) < 200_000

    loads = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    res, peak = _decode_with_peak(data)
    _assert_bad(res, "too_large:")
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in res.error
    assert (res.format, res.width, res.height) == ("PNG", BOMB_SIDE, BOMB_SIDE)
    assert loads == []  # pixel data never decoded
    assert peak < 50 * 1024 * 1024


def test_bomb_process_rss_stays_small(awkward):
    """Pillow allocates pixels with malloc (invisible to tracemalloc): check real RSS."""
    folder, _ = awkward
    script = textwrap.dedent(
        f"""
        import resource, sys
        from ntf_ray.images.decode import decode
        data = open({str(folder / 'bomb.png')!r}, 'rb').read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = decode(data)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert res.error.startswith('too_large:'), res.error
        print(after - before)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    grew_kib = int(out.stdout.strip())
    assert grew_kib < 50 * 1024  # the decoded bomb would be >= 400 MB


def test_max_pixels_is_configurable():
    data = _encode(Image.fromarray(texture(300, 300, 11)), "PNG")
    res = decode(data, max_pixels=10_000)
    _assert_bad(res, "too_large:")
    assert res.error == "too_large: 300x300 = 90000 px > limit 10000"
    assert (res.width, res.height) == (300, 300)
    _assert_good(decode(data, max_pixels=None))
    _assert_good(decode(data, max_pixels=90_000))  # limit is inclusive
    _assert_bad(decode(data, max_pixels=89_999), "too_large:")
    _assert_good(decode(data, max_pixels=np.int64(90_000)))


def test_max_pixels_above_pillows_global_limit(monkeypatch):
    """A tiny Pillow global stands in for a max_pixels above Pillow's real limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses > 2000 px
    arr = texture(300, 300, 12)
    png = _encode(Image.fromarray(arr), "PNG")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png))
    for limit in (None, 100_000, DEFAULT_MAX_PIXELS):
        res = decode(png, max_pixels=limit)
        _assert_good(res)
        np.testing.assert_array_equal(res.image, arr)
    jpeg = _encode(Image.fromarray(arr), "JPEG")
    _assert_good(decode(jpeg, max_pixels=None))
    res = decode(png, max_pixels=50_000)
    assert res.error == "too_large: 300x300 = 90000 px > limit 50000"
    # TIFF (at load) and WebP (at open) re-check Pillow's global themselves: still a
    # clean too_large, no exception.
    res = decode(_encode(Image.fromarray(arr), "TIFF"), max_pixels=None)
    assert res.ok or res.error.startswith("too_large:"), res.error
    if features.check("webp"):
        res = decode(_encode(Image.fromarray(arr), "WEBP"), max_pixels=None)
        assert res.ok or res.error.startswith("too_large:"), res.error
    assert Image.MAX_IMAGE_PIXELS == 1_000  # never modified by decode


def test_pillow_global_limit_untouched(awkward):
    folder, _ = awkward
    before = Image.MAX_IMAGE_PIXELS
    decode((folder / "bomb.png").read_bytes())
    decode((folder / "baseline.jpg").read_bytes(), max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == before


# --------------------------------------------------------------------------- formats

_SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawn by hand -->\n'
        b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>\n')


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    """The start of an ISO-BMFF (HEIF/AVIF/MP4) file: an ``ftyp`` box, then an empty ``meta`` box."""
    box = major + b"\0\0\0\0" + b"".join(compatible)
    return (8 + len(box)).to_bytes(4, "big") + b"ftyp" + box + b"\0\0\0\x08meta" + bytes(64)


def test_eps_is_refused_by_name_and_no_process_starts(monkeypatch):
    from PIL import EpsImagePlugin

    started, opened = [], []

    def no_process(*args, **kwargs):
        started.append(args)
        raise AssertionError("decoding must not start a process")

    factory, accept = Image.OPEN["EPS"]
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # probe for Ghostscript again, as a fresh process would
    monkeypatch.setitem(Image.OPEN, "EPS", (lambda *a: opened.append(a) or factory(*a), accept))
    for data in (_encode(Image.new("RGB", (8, 8), (200, 30, 30)), "EPS"),
                 b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"):
        res = decode(data)
        assert (res.error, res.format, res.image) == ("unsupported_format: EPS", "EPS", None)
    assert started == [] and opened == []  # Pillow's EPS plugin sniffed the bytes, never opened them


def test_vector_and_heif_files_are_refused_by_name():
    pdf = _encode(Image.new("RGB", (8, 8)), "PDF")
    assert decode(pdf).error == "unsupported_format: PDF"
    assert decode(_SVG).error == "unsupported_format: SVG"
    assert decode(b"\xef\xbb\xbf\n  <svg xmlns='http://www.w3.org/2000/svg'/>").error == "unsupported_format: SVG"
    assert decode(_ftyp(b"heic", b"mif1", b"heic")).error == "unsupported_format: HEIC"
    assert decode(_ftyp(b"mif1", b"mif1", b"heic")).error == "unsupported_format: HEIC"
    assert decode(_ftyp(b"avif", b"mif1", b"miaf")).error == "unsupported_format: AVIF"
    assert decode(_ftyp(b"mif1", b"mif1", b"avif")).error == "unsupported_format: AVIF"
    assert decode(_ftyp(b"mif1", b"mif1")).error == "unsupported_format: HEIF"
    # Not images: an HTML page that draws with an inline <svg>, an MP4 video, text.
    assert decode(b"<!DOCTYPE html><html><body><svg width='8'></svg></body></html>").error == "decode: not an image"
    assert decode(_ftyp(b"isom", b"isom", b"mp41")).error == "decode: not an image"
    assert decode(b"<" + b" " * 100_000 + b"svg").error == "decode: not an image"  # and no regex blow-up


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "SGI", "QOI", "DDS", "JPEG2000", "XBM"])
def test_other_pillow_formats_are_refused_by_name(fmt):
    img = Image.new("1" if fmt == "XBM" else "RGB", (8, 8))
    try:
        data = _encode(img, fmt)
    except (KeyError, OSError) as exc:  # a Pillow build without that encoder
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    res = decode(data)
    assert (res.error, res.format) == (f"unsupported_format: {fmt}", fmt)


def test_refused_format_is_not_opened_by_the_bomb_fallback(monkeypatch):
    """Above Pillow's global limit the header is re-read without Pillow's check: still only FORMATS."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    ppm = _encode(Image.fromarray(texture(300, 300, 17)), "PPM")
    assert decode(ppm, max_pixels=None).error == "unsupported_format: PPM"
    png = _encode(Image.fromarray(texture(300, 300, 17)), "PNG")
    _assert_good(decode(png, max_pixels=None))


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO"])
def test_allowed_formats_decode(fmt):
    assert fmt in FORMATS
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    arr = texture(48, 64, 18)
    if fmt == "MPO":  # two pictures, as a 3D camera writes them
        data = _encode(Image.fromarray(arr), "MPO", save_all=True, append_images=[Image.fromarray(arr[::-1])])
    else:
        data = _encode(Image.fromarray(arr), fmt, **({"sizes": [(64, 48)]} if fmt == "ICO" else {}))
    res = decode(data)
    _assert_good(res)
    assert (res.format, res.width, res.height) == (fmt, 64, 48)
    if fmt in ("PNG", "BMP", "TIFF", "ICO"):
        np.testing.assert_array_equal(res.image, arr)


# --------------------------------------------------------------------------- inputs / misc


def test_bytes_bytearray_memoryview(awkward):
    folder, _ = awkward
    data = (folder / "baseline.jpg").read_bytes()
    ref = decode(data).image
    for variant in (
        bytearray(data),
        memoryview(data),
        memoryview(bytearray(data)),
        memoryview(data)[0:],
        memoryview(np.frombuffer(data, np.uint8)),
    ):
        res = decode(variant)
        _assert_good(res)
        np.testing.assert_array_equal(res.image, ref)
    # A non-contiguous view (every byte twice) is copied, not mis-read.
    doubled = np.repeat(np.frombuffer(data, np.uint8), 2)[::2]
    np.testing.assert_array_equal(decode(memoryview(doubled)).image, ref)
    # Padded multi-byte memoryview: len() of the view counts items, not bytes.
    padded = data + b"\x00" * (-len(data) % 4)
    np.testing.assert_array_equal(decode(memoryview(padded).cast("I")).image, ref)
    for empty in (b"", bytearray(), memoryview(b"")):
        assert decode(empty).error == "decode: empty file"


@pytest.mark.parametrize("bad", ["not bytes", None, 123, [1, 2], np.zeros(4, np.uint8), io.BytesIO(b"x")])
def test_wrong_data_type_raises_type_error(bad):
    with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
        decode(bad)


def test_wrong_max_pixels_raises():
    with pytest.raises(TypeError):
        decode(b"x", max_pixels="100")
    with pytest.raises(TypeError):
        decode(b"x", max_pixels=1.5)
    with pytest.raises(TypeError):
        decode(b"x", max_pixels=True)
    with pytest.raises(ValueError):
        decode(b"x", max_pixels=0)
    with pytest.raises(TypeError):
        decode(b"x", 100)  # keyword-only


def test_full_resolution_no_draft(monkeypatch):
    def no_draft(self, *a, **k):
        raise AssertionError("draft() must not be used")

    monkeypatch.setattr(Image.Image, "draft", no_draft)
    from PIL import JpegImagePlugin

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", no_draft)
    arr = texture(768, 1024, 13)
    res = decode(_encode(Image.fromarray(arr), "JPEG", quality=95))
    _assert_good(res)
    assert res.image.shape == (768, 1024, 3)
    assert (res.width, res.height) == (1024, 768)
    assert np.abs(res.image.astype(int) - arr).mean() < 4  # real pixels, not a thumbnail


def test_lossless_round_trip_is_exact():
    arr = texture(64, 80, 14)
    for fmt in ("PNG", "BMP", "TIFF"):
        np.testing.assert_array_equal(decode(_encode(Image.fromarray(arr), fmt)).image, arr)


def test_corrupt_but_identified_data_is_an_error_not_an_exception():
    jpeg = bytearray(_encode(Image.fromarray(texture(64, 64, 15)), "JPEG"))
    png = bytearray(_encode(Image.fromarray(texture(64, 64, 15)), "PNG"))
    rng = np.random.default_rng(16)
    for blob in (jpeg, png):
        for _ in range(40):
            bad = bytearray(blob)
            idx = rng.integers(0, len(bad), size=8)
            for i in idx:
                bad[i] = int(rng.integers(0, 256))
            res = decode(bytes(bad))  # must not raise
            if res.ok:
                _assert_good(res)
            else:
                assert res.error.startswith(("decode:", "too_large:")), res.error
                assert "\n" not in res.error and len(res.error) <= 200


def test_thread_safe(awkward):
    folder, expected = awkward
    blobs = {n: (folder / n).read_bytes() for n in expected}
    ref = {n: decode(b) for n, b in blobs.items()}
    errors: list[str] = []

    def worker():
        for n, b in blobs.items():
            res = decode(b)
            if res.error != ref[n].error or (
                res.ok and not np.array_equal(res.image, ref[n].image)
            ):
                errors.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --------------------------------------------------------------------------- bounded work


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey", "444", "odd"])
def test_jpegs_decode_to_pillows_pixels_whatever_their_orientation(kind, orientation):
    arr = texture(37, 53, seed=orientation) if kind == "odd" else texture(96, 128, seed=orientation)
    img = Image.fromarray(arr).convert("L") if kind == "grey" else Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"progressive": True} if kind == "progressive" else {"subsampling": 0} if kind == "444" else {}
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=88, **kw)
    res = decode(data)
    assert res.ok and res.format == "JPEG"
    expected = _pillow_rgb(data)
    assert res.image.shape == expected.shape and (res.width, res.height) == expected.shape[1::-1]
    assert np.array_equal(res.image, expected)
    assert res.image.flags.c_contiguous and res.image.flags.writeable


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["baseline", "progressive", "cmyk", "oriented"])
def test_a_jpeg_cut_short_is_truncated_however_it_ends(kind, cut):
    arr = texture(160, 200, seed=3)
    img = Image.fromarray(arr).convert("CMYK") if kind == "cmyk" else Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6 if kind == "oriented" else 1
    data = _encode(img, "JPEG", quality=95, progressive=kind == "progressive", exif=exif.tobytes())
    part = data[: int(len(data) * cut)]
    for ending in (b"", b"\xff\xd9", b"\xff\xd9" + b"\x00" * 16):
        res = decode(part + ending)
        assert res.error == "decode: truncated image", (kind, cut, ending)


def test_a_jpeg_with_extraneous_bytes_still_decodes_as_pillow_does():
    data = _encode(Image.fromarray(texture(64, 64, seed=4)), "JPEG", quality=90)
    eoi = data.rindex(b"\xff\xd9")
    odd = data[:eoi] + b"\x00\x00\x00" + data[eoi:]  # libjpeg warns "extraneous bytes before marker"
    res = decode(odd)
    assert res.ok and np.array_equal(res.image, _pillow_rgb(odd))


def test_bombs_are_refused_before_their_decoder_allocates():
    from tests import bombs

    tracemalloc.start()
    try:
        cases = {
            "bmp": (bombs.bmp_absurd_width(), DEFAULT_MAX_PIXELS, "too_large: 4294967169x1 "),
            "tiff": (bombs.tiff_huge_tile(), DEFAULT_MAX_PIXELS, "too_large: TIFF tiles of 32768x32768"),
            "tiff-small-tile-bomb": (bombs.tiff_huge_tile(side=16, tile=8192, zeros=1 << 16), DEFAULT_MAX_PIXELS,
                                     "too_large: TIFF tiles of 8192x8192"),
            "scans": (bombs.progressive_many_scans(64, 600), DEFAULT_MAX_PIXELS, "too_large: more than 500 scans"),
            "ico": (bombs.ico_hiding(3000), 1_000_000, "too_large: an embedded icon image of 3000x3000"),
        }
        for name, (data, limit, prefix) in cases.items():
            res = decode(data, max_pixels=limit)
            assert res.error is not None and res.error.startswith(prefix), (name, res.error)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # numpy/Python allocations; libtiff's 1 GiB tile buffer would show in the RSS instead


def test_a_bomb_tiff_tile_never_reaches_libtiff():
    from tests import bombs

    code = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from tests.bombs import tiff_huge_tile
        from ntf_ray.images.decode import decode
        data = tiff_huge_tile()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = decode(data)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(res.error.split(":")[0], grown // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1])], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == "too_large" and int(out[1]) < 64, out  # MiB the decode added to the peak RSS
    assert bombs.tiff_huge_tile(side=16, tile=16)  # the same file with a sane tile is an ordinary TIFF ...
    assert decode(bombs.tiff_huge_tile(side=16, tile=16, zeros=256)).ok  # ... and decodes


def test_ico_directory_size_does_not_hide_the_embedded_image():
    from tests import bombs

    data = bombs.ico_hiding(side=300, declared=16)
    assert decode(data, max_pixels=10_000).error == "too_large: an embedded icon image of 300x300 = 90000 px > limit 10000"
    ok = decode(data, max_pixels=100_000)
    assert ok.ok and ok.format == "ICO" and (ok.width, ok.height) == (300, 300)


def test_progressive_scans_are_counted_from_markers():
    from ntf_ray.images.jpeg_screen import MAX_SCANS, count_scans, screen
    from tests import bombs

    plain = _encode(Image.fromarray(texture(64, 64, seed=5)), "JPEG", progressive=True)
    assert 2 <= count_scans(plain) <= 12 and count_scans(_encode(Image.fromarray(texture(64, 64, seed=5)), "JPEG")) == 1
    assert decode(plain).ok
    many = bombs.progressive_many_scans(64, MAX_SCANS + 1)
    assert count_scans(many) == MAX_SCANS + 1
    assert not screen(many, max_pixels=None).gpu  # nor does the GPU decoder get it
    assert not (decode(bombs.progressive_many_scans(64, MAX_SCANS)).error or "").startswith("too_large")


def test_a_decode_past_its_deadline_is_too_slow():
    data = _encode(Image.fromarray(texture(512, 512, seed=6)), "PNG")
    assert decode(data, deadline_s=0.0).error == "decode: too slow (over 0 s)"
    assert decode(data, deadline_s=60).ok
    assert decode(data, deadline_s=None).ok


def test_seeded_damage_to_every_format_never_raises_and_never_stalls():
    """Thousands of damaged files (tests/mutations.py): each gets a result with one of the
    documented kinds, none raises, none takes long."""
    import time

    from tests.mutations import corpus

    kinds: dict[str, int] = {}
    slowest = 0.0
    for fmt, how, data in corpus(1500, seed=7):
        began = time.perf_counter()
        res = decode(data)
        slowest = max(slowest, time.perf_counter() - began)
        kind = (res.error or "ok").split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert kind in {"ok", "decode", "too_large", "unsupported_format"}, (fmt, how, res.error)
        if res.ok:
            assert res.image.shape == (res.height, res.width, 3) and res.image.dtype == np.uint8
    assert kinds["ok"] > 100 and kinds["decode"] > 100  # the damage is varied: some still decode, most do not
    assert slowest < 5.0
