"""The GPU decode path's CPU-side logic: the JPEG marker screen, batched decode with a
per-file retry, and the Scorer's routing.

torchvision's CPU JPEG decoder stands in for nvJPEG (it gives Pillow's pixels exactly),
so the ``nvjpeg`` Scorer must produce the very same rows as the ``pil`` one here: same
scores, same errors. On a GPU the pixels differ (chroma upsampling); that difference is
measured by ``bench/scan_gpu_bench.py``, not here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ntf_ray import gpu_decode
from ntf_ray.jpeg_screen import screen
from ntf_ray.model import Detector
from ntf_ray.scoring import Scorer
from tests.awkward import make_awkward_files, texture


def jpg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("awkward")
    make_awkward_files(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector.build("tiny").eval()


# ---------------------------------------------------------------- the screen


def test_screen_passes_plain_jpegs_and_reads_their_size(awkward):
    for name in ("baseline.jpg", "progressive.jpg", "gray.jpg"):
        s = screen(awkward[name], max_pixels=None)
        assert s.gpu, (name, s.reason)
    s = screen(awkward["baseline.jpg"], max_pixels=None)
    assert (s.width, s.height) == (320, 256)
    padded = awkward["baseline.jpg"] + b"\x00" * 16  # zero padding after the end marker is common
    assert screen(padded, max_pixels=None).gpu


@pytest.mark.parametrize("name, reason", [
    ("cmyk.jpg", "CMYK/YCCK"),
    ("exif_orient6.jpg", "orientation 6"),
    ("truncated.jpg", "no end-of-image marker"),
    ("jpeg_header_only.jpg", "no end-of-image marker"),
    ("jpeg_soi_garbage.jpg", "no end-of-image marker"),
    ("empty.jpg", "not a JPEG"),
    ("rgba.png", "not a JPEG"),
    ("notes.txt", "not a JPEG"),
])
def test_screen_sends_awkward_files_to_the_cpu(awkward, name, reason):
    s = screen(awkward[name], max_pixels=None)
    assert not s.gpu and s.reason.startswith(reason), s


def test_screen_pixel_limit_orientation_one_and_cmyk_without_adobe_marker(awkward):
    assert screen(awkward["baseline.jpg"], max_pixels=320 * 256).gpu
    s = screen(awkward["baseline.jpg"], max_pixels=320 * 256 - 1)
    assert not s.gpu and s.reason == "over the pixel limit"
    img = Image.fromarray(texture(48, 64, seed=1))
    exif = Image.Exif()
    exif[0x0112] = 1
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert screen(buf.getvalue(), max_pixels=None).gpu  # "normal" orientation needs nothing
    # A frame header declaring 4 components is refused whatever the APP14 segment says.
    data = bytearray(awkward["cmyk.jpg"])
    adobe = data.find(b"Adobe")
    data[adobe:adobe + 5] = b"Xdobe"
    assert screen(bytes(data), max_pixels=None).reason == "CMYK/YCCK"


def test_screen_refuses_rgb_coded_and_12_bit_jpegs(awkward):
    # Adobe transform 0 on three components means RGB samples, not YCbCr: Pillow's business.
    data = bytearray(awkward["baseline.jpg"])
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    rgb_coded = bytes(data[:2]) + app14 + bytes(data[2:])
    assert screen(rgb_coded, max_pixels=None).reason.startswith("RGB-coded")
    sof = data.find(b"\xff\xc0")
    data[sof + 4] = 12
    assert screen(bytes(data), max_pixels=None).reason == "12-bit samples"


# ---------------------------------------------------------------- batched decode, per-file retry


def test_batched_decode_retries_file_by_file_when_the_batch_fails(awkward):
    good = [awkward["baseline.jpg"], awkward["gray.jpg"], awkward["progressive.jpg"]]
    poison = jpg(texture(32, 32, seed=4))
    real = gpu_decode._decode_fn()
    calls = []

    def flaky(data, device):
        calls.append(len(data) if isinstance(data, list) else 1)
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == poison for t in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, device)

    out = gpu_decode.decode_jpegs([good[0], poison, good[1], good[2]], torch.device("cpu"), decode_fn=flaky)
    assert calls == [4, 1, 1, 1, 1]  # one batched call, then each file on its own
    assert isinstance(out[1], RuntimeError)
    for i, data in zip((0, 2, 3), good):
        expected = real(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.device("cpu"))
        assert torch.equal(out[i], expected)
    assert gpu_decode.decode_jpegs([], torch.device("cpu")) == []


def test_batched_decode_result_count_mismatch_is_a_batch_failure(awkward):
    real = gpu_decode._decode_fn()

    def short(data, device):
        return real(data, device)[:-1] if isinstance(data, list) else real(data, device)

    blobs = [awkward["baseline.jpg"], awkward["gray.jpg"]]
    out = gpu_decode.decode_jpegs(blobs, torch.device("cpu"), decode_fn=short)
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 3 for t in out)


# ---------------------------------------------------------------- the Scorer's routing


def test_nvjpeg_scorer_gives_the_cpu_rows_on_every_awkward_file(detector, awkward):
    names = sorted(awkward)
    items = [awkward[n] for n in names] + [None]
    cpu = Scorer(detector, input_size=64, device="cpu", decoder="pil").score_bytes(items)
    routed = Scorer(detector, input_size=64, device="cpu", decoder="nvjpeg").score_bytes(items)
    assert len(cpu) == len(routed) == len(items)
    for name, a, b in zip([*names, "None"], cpu, routed):
        assert (a.score, a.is_fake, a.width, a.height, a.format, a.error) == \
               (b.score, b.is_fake, b.width, b.height, b.format, b.error), name
    by_name = dict(zip(names, routed))
    assert {n for n, r in by_name.items() if r.decoder == "nvjpeg"} == {"baseline.jpg", "progressive.jpg", "gray.jpg"}
    assert by_name["cmyk.jpg"].decoder == "pil" and by_name["cmyk.jpg"].error is None
    assert by_name["truncated.jpg"].error.startswith("decode: truncated")
    assert all(r.decoder == "pil" for n, r in by_name.items() if r.error)


def test_a_file_the_batched_decoder_fails_on_goes_to_the_cpu_and_costs_only_itself(detector, awkward, monkeypatch):
    real = gpu_decode._decode_fn()
    bad = awkward["progressive.jpg"]

    def no_progressive(data, device):
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == bad for t in items):
            raise RuntimeError("unsupported JPEG")
        return real(data, device)

    monkeypatch.setattr(gpu_decode, "_decode_fn", lambda: no_progressive)
    items = [awkward["baseline.jpg"], bad, awkward["gray.jpg"]]
    routed = Scorer(detector, input_size=64, device="cpu", decoder="nvjpeg").score_bytes(items)
    cpu = Scorer(detector, input_size=64, device="cpu", decoder="pil").score_bytes(items)
    assert [r.decoder for r in routed] == ["nvjpeg", "pil", "nvjpeg"]
    assert [r.score for r in routed] == [r.score for r in cpu]


def test_decoder_option_validation(detector):
    assert Scorer(detector, device="cpu", decoder="auto").decoder == "pil"
    with pytest.raises(ValueError, match="decoder"):
        Scorer(detector, device="cpu", decoder="turbo")
