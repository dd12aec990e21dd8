"""The centre window decoded as a region (``images.jpeg_window``) against the whole frame's centre."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from ntf_ray.images import jpeg_window
from ntf_ray.images.decode import decode
from tests import turbojpeg3
from tests.awkward import texture
from tests.mutations import mutate

SIZE = 224


def _jpeg(width: int, height: int, seed: int = 0, *, sampling="4:2:0", progressive=False, orientation=1,
          restart=0) -> bytes:
    pixels = texture(height, width, seed)
    if sampling in ("4:4:0", "4:1:1"):  # Pillow does not write these; libjpeg-turbo does
        assert orientation == 1 and not progressive
        return simplejpeg.encode_jpeg(pixels, 90, colorsubsampling=sampling.replace(":", ""))
    img = Image.fromarray(pixels)
    kw = {"quality": 90, "progressive": progressive}
    if sampling == "L":
        img = img.convert("L")
    else:
        kw["subsampling"] = sampling
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    if restart:
        kw["restart_marker_blocks"] = restart
    out = io.BytesIO()
    img.save(out, "JPEG", **kw)
    return out.getvalue()


def _centre(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))  # as TF.center_crop
    return image[top : top + SIZE, left : left + SIZE]


@pytest.fixture(scope="module")
def tj3():
    path = turbojpeg3.require()
    with turbojpeg3.using(path):
        yield path


CASES = [
    (w, h, sampling, progressive)
    for sampling in ("4:4:4", "4:2:2", "4:2:0", "L")
    for progressive in (False, True)
    for w, h in ((1024, 768), (225, 300), (231, 229), (500, 333), (224, 224))
] + [(w, h, s, False) for s in ("4:4:0", "4:1:1") for w, h in ((640, 480), (227, 231))]


@pytest.mark.parametrize("width,height,sampling,progressive", CASES)
def test_the_window_is_the_whole_frames_centre_bit_for_bit(tj3, width, height, sampling, progressive):
    data = _jpeg(width, height, seed=width + height, sampling=sampling, progressive=progressive)
    whole, part = decode(data), decode(data, window=SIZE)
    assert whole.ok and part.ok and not whole.window
    assert part.window == ((width, height) != (SIZE, SIZE)) or part.window  # an exact-size image may go either way
    window = part.image if part.window else _centre(part.image)
    assert window.shape == (SIZE, SIZE, 3) and window.flags.c_contiguous
    assert np.array_equal(window, _centre(whole.image))
    assert (part.width, part.height, part.format) == (whole.width, whole.height, whole.format)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("width,height", [(301, 257), (240, 1000)])
def test_every_exif_orientation_gives_the_upright_images_centre(tj3, orientation, width, height):
    data = _jpeg(width, height, seed=orientation, orientation=orientation)
    whole, part = decode(data), decode(data, window=SIZE)
    assert part.window
    assert np.array_equal(part.image, _centre(whole.image))
    assert (part.width, part.height) == (whole.width, whole.height)
    assert (whole.width, whole.height) == ((height, width) if orientation >= 5 else (width, height))


def test_restart_markers_and_a_big_photo(tj3):
    for data in (_jpeg(900, 700, restart=4), _jpeg(3000, 2000, seed=3)):
        whole, part = decode(data), decode(data, window=SIZE)
        assert part.window and np.array_equal(part.image, _centre(whole.image))


def test_a_file_cut_short_below_its_window_is_still_truncated(tj3):
    data = _jpeg(1024, 768, seed=5)
    for cut in (0.3, 0.9, 0.99):  # inside the window's rows, and below them
        short = data[: int(len(data) * cut)] + b"\xff\xd9"
        whole, part = decode(short), decode(short, window=SIZE)
        assert whole.error == part.error == "decode: truncated image"


def test_a_progressive_file_cut_at_a_scan_boundary_gives_the_same_window(tj3):
    """Cut after any scan and closed with an end-of-image marker, a progressive JPEG decodes
    without a warning and is smoothed from neighbouring blocks: the margin keeps them."""
    checked = 0
    for sampling in ("4:4:4", "4:2:0", "4:2:2"):
        data = _jpeg(640, 480, seed=9, sampling=sampling, progressive=True)
        starts = [i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
        for cut in starts[1:]:  # after the first, second, ... scan
            short = data[:cut] + b"\xff\xd9"
            whole, part = decode(short), decode(short, window=SIZE)
            assert whole.error == part.error
            if whole.ok:
                window = part.image if part.window else _centre(part.image)
                assert np.array_equal(window, _centre(whole.image)), (sampling, cut)
                checked += part.window
    assert checked >= 15


def test_damaged_files_get_the_same_row_either_way(tj3):
    """Seeded damage (truncation, flipped bytes, absurd sizes): each file's outcome, reason and
    pixels are the same with the region decode as with the whole frame."""
    rng = random.Random(7)
    bases = [_jpeg(320, 260, 1), _jpeg(320, 260, 2, progressive=True), _jpeg(300, 240, 3, sampling="L"),
             _jpeg(260, 330, 4, orientation=6)]
    seen_ok = seen_error = 0
    for i in range(160):
        kind, damaged = mutate("JPEG", bases[i % len(bases)], rng)
        whole, part = decode(damaged), decode(damaged, window=SIZE)
        assert whole.error == part.error, kind
        if whole.ok:
            seen_ok += 1
            window = part.image if part.window else _centre(part.image)
            if min(whole.image.shape[:2]) >= SIZE:
                assert np.array_equal(window, _centre(whole.image)), kind
        else:
            seen_error += 1
    assert seen_ok > 20 and seen_error > 20  # the corpus holds both


def test_smaller_than_the_window_and_other_formats_decode_whole(tj3):
    small = _jpeg(200, 300)
    png = io.BytesIO()
    Image.fromarray(texture(300, 300, 1)).save(png, "PNG")
    for data in (small, png.getvalue()):
        part = decode(data, window=SIZE)
        assert part.ok and not part.window and part.image.shape[:2] == (part.height, part.width)


def test_without_the_library_the_whole_frame_is_decoded():
    with turbojpeg3.using(None):
        assert jpeg_window.library() is None
        assert "full decode" in jpeg_window.describe()
        part = decode(_jpeg(640, 480), window=SIZE)
        assert part.ok and not part.window and part.image.shape == (480, 640, 3)


def test_a_missing_library_or_one_without_the_version_3_api_is_not_used(tmp_path):
    import ctypes.util

    for path in (str(tmp_path / "missing-libturbojpeg.so"), ctypes.util.find_library("c")):  # libc: no tj3 calls
        with turbojpeg3.using(path):
            assert jpeg_window.library() is None
            assert not decode(_jpeg(640, 480), window=SIZE).window


def test_describe_names_the_library_not_its_folder(tj3):
    line = jpeg_window.describe()
    assert "region decode" in line and "/" not in line
    version = jpeg_window.library().version
    assert version == turbojpeg3.version_of(tj3)
    if version is not None:
        assert f"libjpeg-turbo {'.'.join(map(str, version))}" in line
    if os.environ.get("NTF_REQUIRE_TURBOJPEG3"):  # CI: a released libjpeg-turbo 3, never a beta
        assert jpeg_window.is_release(version) and "pre-release" not in line, line


@pytest.mark.parametrize("said,version,released", [
    (b"libjpeg-turbo version 3.1.3 (build 20260127)", (3, 1, 3), True),
    (b"libjpeg-turbo version 3.0.0 (build 20230701)", (3, 0, 0), True),
    (b"libjpeg-turbo version 2.1.92 (build 20230806)", (2, 1, 92), False),  # 3.0 beta
    (b"libjpeg-turbo version 3.0.90 (build 20240817)", (3, 0, 90), False),  # 3.1 beta
    (b"libjpeg-turbo version 2.1.5 (build 20230203)", (2, 1, 5), False),
    (b"no version string at all", None, False),
])
def test_the_version_a_library_says_and_whether_it_is_a_release(tmp_path, said, version, released):
    path = tmp_path / "libturbojpeg.so.0"
    path.write_bytes(b"\x7fELF" + bytes(5000) + said + b"\0" + bytes(100))
    assert jpeg_window.file_version(str(path)) == version
    assert jpeg_window.is_release(version) is released
    assert jpeg_window.file_version(str(tmp_path / "missing")) is None


def test_describe_says_a_pre_release_is_one(tj3, monkeypatch):
    lib = jpeg_window.library()
    monkeypatch.setattr(lib, "version", (2, 1, 92))
    assert jpeg_window.describe().endswith("libjpeg-turbo 2.1.92, a pre-release)")
    monkeypatch.setattr(lib, "version", None)
    assert jpeg_window.describe().endswith(", version unknown)")


def test_the_scorer_gives_the_same_rows_with_and_without_the_region_decode(tj3):
    from ntf_ray.detector.scorer import Scorer
    from tests.test_scoring import make_detector

    items = [_jpeg(640, 480, 1), _jpeg(301, 257, 2, orientation=6), _jpeg(200, 300, 3),
             _jpeg(1024, 768, 4, progressive=True), _jpeg(900, 700, 5)[:-3000] + b"\xff\xd9", b"not an image"]
    scorer = Scorer(make_detector(), input_size=SIZE, device="cpu", decoder="pil")
    windows = []
    real = jpeg_window.centre_window

    def counted(*args):
        out = real(*args)
        windows.append(out is not None)
        return out

    jpeg_window_path = "ntf_ray.images.jpeg_decode.centre_window"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jpeg_window_path, counted)
        regions = scorer.score_bytes(items)
    with turbojpeg3.using(None):
        wholes = scorer.score_bytes(items)
    assert sum(windows) == 3  # the three plain JPEGs at least the window's size took the region path
    assert regions == wholes
    assert [r.error for r in regions][-2:] == ["decode: truncated image", "decode: not an image"]


def test_a_library_that_fails_hands_the_file_to_the_whole_decode(tj3, monkeypatch):
    lib = jpeg_window.library()

    def broken(*args, **kwargs):
        raise MemoryError("tj3Init failed")

    data = _jpeg(640, 480)
    for name in ("header", "region"):
        with monkeypatch.context() as m:
            m.setattr(lib, name, broken)
            part = decode(data, window=SIZE)
        assert part.ok and not part.window and part.image.shape == (480, 640, 3)
