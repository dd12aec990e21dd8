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

from ntf_ray.detector.scorer import Scorer
from ntf_ray.images import gpu_decode
from ntf_ray.images.jpeg_screen import screen
from ntf_ray.nn.model import Detector
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


class _FakeNvImageCodec:
    """Stands in for ``nvidia.nvimgcodec`` on a CPU: decodes with Pillow into HWC arrays, None for
    files it 'cannot' decode (those whose bytes contain ``refuse``), as the real one does."""

    def __init__(self, refuse: bytes = b"\x00never\x00"):
        import numpy as np

        self.np, self.refuse, self.decoders = np, refuse, []
        fake = self

        class BackendKind:
            HW_GPU_ONLY, HYBRID_CPU_GPU = "hw", "hybrid"

        class Decoder:
            def __init__(self, device_id, backends):
                self.backends = backends
                fake.decoders.append(self)

            def decode(self, streams, cuda_stream=0):
                return [fake._decode(s) for s in streams]

        self.BackendKind, self.Decoder = BackendKind, Decoder
        self.Backend = lambda kind: kind
        self.CodeStream = lambda array: bytes(array)

    def _decode(self, data: bytes):
        import io

        from PIL import Image

        if self.refuse in data:
            return None
        return self.np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def _commented_jpeg(seed: int, comment: bytes = b"", shape=(40, 56)) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[:2] + (b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment if comment else b"") + data[2:]


def test_nvimgcodec_adapter_gives_chw_images_and_an_exception_per_file_it_cannot_decode():
    from ntf_ray.images.gpu_decode import decode_jpegs, nvimgcodec_fn

    jpeg = _commented_jpeg
    fake = _FakeNvImageCodec(refuse=b"REFUSE")
    blobs = [jpeg(1), jpeg(2, b"REFUSE"), jpeg(3)]
    out = decode_jpegs(blobs, torch.device("cpu"), nvimgcodec_fn(fake))
    assert isinstance(out[1], RuntimeError) and "could not decode" in str(out[1])
    for k in (0, 2):
        want = torch.from_numpy(np.array(Image.open(io.BytesIO(blobs[k])).convert("RGB"))).permute(2, 0, 1)
        assert out[k].shape == (3, 40, 56) and torch.equal(out[k], want)
    assert len(fake.decoders) == 1 and fake.decoders[0].backends == ["hw", "hybrid"]  # one decoder, engines first
    decode_jpegs(blobs[:1], torch.device("cpu"), nvimgcodec_fn(fake))
    assert len(fake.decoders) == 1  # kept for the thread: the engines are set up once


def test_the_nvimgcodec_scorer_routes_refusals_to_the_core_decoder_and_names_its_rows(monkeypatch):
    monkeypatch.setattr(gpu_decode, "nvimgcodec_module", lambda: _FakeNvImageCodec(refuse=b"REFUSE"))
    blobs = [_commented_jpeg(5, shape=(70, 90)), _commented_jpeg(6, b"REFUSE", shape=(70, 90))]
    detector = Detector.build("tiny")
    mine = Scorer(detector, input_size=32, device="cpu", decoder="nvimgcodec").score_bytes(blobs)
    core = Scorer(detector, input_size=32, device="cpu", decoder="pil").score_bytes(blobs)
    assert [r.decoder for r in mine] == ["nvimgcodec", "pil"]
    assert [r.score for r in mine] == [r.score for r in core]  # the fake decodes as Pillow does


def test_the_nvimgcodec_decoder_without_its_package_says_how_to_install_it(monkeypatch):
    import builtins

    from ntf_ray.images.gpu_decode import DecoderUnavailable

    real_import = builtins.__import__

    def no_nvidia(name, *args, **kwargs):
        if name.startswith("nvidia"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nvidia)
    with pytest.raises(DecoderUnavailable, match=r"ntf-ray\[nvimgcodec\]"):
        Scorer(Detector.build("tiny"), input_size=32, device="cpu", decoder="nvimgcodec")
