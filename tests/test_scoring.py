"""Scorer: bytes -> decode -> centre crop -> P(fake), errors as values, batch independence.

Tiny backbone, random init, CPU only.
"""

from __future__ import annotations

import io
import json
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ntf_ray import cli
from ntf_ray.detector.artifact import save_artifact
from ntf_ray.detector.scorer import Scorer, ScoreResult
from ntf_ray.images.decode import decode
from ntf_ray.images.provenance import PROVENANCE_COLUMNS
from ntf_ray.images.transforms import eval_transform, to_tensor
from ntf_ray.nn.model import Detector
from tests.awkward import make_awkward_files, texture

SIZE = 64


def make_detector(seed: int = 0) -> Detector:
    """A random-init tiny Detector with non-trivial BatchNorm statistics (so scores vary)."""
    torch.manual_seed(seed)
    det = Detector.build("tiny")
    for m in det.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    det.train()
    with torch.no_grad():
        for i in range(2):
            det(torch.stack([torch.from_numpy(texture(48, 48, seed=1000 * seed + 10 * i + j)).permute(2, 0, 1)
                             for j in range(8)]))
    return det.eval()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def jpg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def detector() -> Detector:
    return make_detector()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, tuple[bytes, bool]]:
    folder = tmp_path_factory.mktemp("awkward")
    expected = make_awkward_files(folder)
    return {name: ((folder / name).read_bytes(), ok) for name, ok in expected.items()}


@pytest.fixture(scope="module")
def pool() -> list[bytes]:
    """Good images of several sizes and formats (some smaller than SIZE, so upscaled)."""
    shapes = [(64, 64), (80, 96), (120, 70), (50, 40), (200, 260), (64, 65), (33, 100), (90, 90)]
    out = []
    for i, (h, w) in enumerate(shapes):
        arr = texture(h, w, seed=50 + i)
        out.append(jpg(arr) if i % 2 else png(arr))
    return out


# ---------------------------------------------------------------------------------------
# construction


def test_constructor_and_precision_validation(detector):
    s = Scorer(detector, input_size=SIZE, device="cpu")
    assert s.device.type == "cpu" and s.precision == "fp32" and s.input_size == SIZE
    assert not s.detector.training
    # bf16 only takes effect on CUDA (autocast); on the CPU it is accepted and scores as fp32
    bf = Scorer(detector, input_size=SIZE, device="cpu", precision="bf16")
    assert bf.precision == "bf16"
    x = torch.stack([to_tensor(texture(SIZE, SIZE, seed=i)) for i in range(3)])
    assert np.array_equal(bf.score_tensors(x), s.score_tensors(x))
    for bad in ("fp8", "fp16x", "", "FP32"):
        with pytest.raises(ValueError, match="precision"):
            Scorer(detector, input_size=SIZE, device="cpu", precision=bad)
    with pytest.raises(ValueError, match="batch_size"):
        Scorer(detector, input_size=SIZE, device="cpu", batch_size=0)


def test_score_tensors_shape_dtype_and_chunking(detector):
    x = torch.stack([to_tensor(texture(SIZE, SIZE, seed=i)) for i in range(7)])
    full = Scorer(detector, input_size=SIZE, device="cpu", batch_size=64).score_tensors(x)
    assert full.shape == (7,) and full.dtype == np.float32
    assert ((full >= 0) & (full <= 1)).all()
    assert np.ptp(full) > 1e-3, "scores should differ between images for these tests to mean anything"
    for bs in (1, 2, 3, 6):
        np.testing.assert_allclose(Scorer(detector, input_size=SIZE, device="cpu", batch_size=bs).score_tensors(x),
                                   full, rtol=0, atol=1e-6)
    empty = Scorer(detector, input_size=SIZE, device="cpu").score_tensors(torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8))
    assert empty.shape == (0,) and empty.dtype == np.float32


# ---------------------------------------------------------------------------------------
# awkward inputs: errors are values


def test_awkward_files(detector, awkward):
    scorer = Scorer(detector, input_size=SIZE, device="cpu", threshold=0.5)
    names = list(awkward)
    results = scorer.score_bytes([awkward[n][0] for n in names])
    assert len(results) == len(names)
    scored = []
    for name, r in zip(names, results):
        assert isinstance(r, ScoreResult)
        if awkward[name][1]:
            assert r.error is None, (name, r.error)
            assert isinstance(r.score, float) and 0.0 <= r.score <= 1.0, name
            assert r.is_fake is (r.score >= scorer.threshold), name
            assert isinstance(r.width, int) and r.width > 0 and isinstance(r.height, int) and r.height > 0, name
            assert isinstance(r.format, str) and r.format, name
            scored.append(r.score)
        else:
            assert isinstance(r.error, str) and r.error.strip(), name
            assert r.score is None and r.is_fake is None, name
            prefix = "too_large: " if name == "bomb.png" else "decode: "
            assert r.error.startswith(prefix), (name, r.error)
            assert "\n" not in r.error
    assert len(set(scored)) > 3  # the detector does tell images apart
    by_name = dict(zip(names, results))
    assert (by_name["small.png"].width, by_name["small.png"].height) == (50, 40)
    assert (by_name["exif_orient6.jpg"].width, by_name["exif_orient6.jpg"].height) == (240, 300)
    assert by_name["baseline.jpg"].format == "JPEG" and by_name["rgba.png"].format == "PNG"
    assert (by_name["bomb.png"].width, by_name["bomb.png"].height) == (20000, 20000)
    d = by_name["baseline.jpg"].as_dict()
    assert set(d) == {"score", "is_fake", "width", "height", "format", "error", "decoder"}


def test_non_bytes_items_get_read_errors(detector, pool):
    scorer = Scorer(detector, input_size=SIZE, device="cpu")
    alone = scorer.score_bytes([pool[0]])[0].score
    items = [None, pool[0], "a/path.jpg", 123, [1, 2], bytearray(pool[0]), memoryview(pool[0]), 4.5]
    results = scorer.score_bytes(items)
    assert len(results) == len(items)
    for i in (0, 2, 3, 4, 7):
        r = results[i]
        assert r.error.startswith("read: ") and r.score is None and r.is_fake is None
        assert r.width is None and r.height is None and r.format is None
    for i in (1, 5, 6):  # bytes, bytearray and memoryview are all scored, identically
        assert results[i].error is None
        assert results[i].score == pytest.approx(alone, abs=1e-6)
    assert scorer.score_bytes([]) == []


def test_only_broken_inputs(detector, awkward):
    scorer = Scorer(detector, input_size=SIZE, device="cpu")
    broken = [data for data, ok in awkward.values() if not ok]
    results = scorer.score_bytes(broken + [None])
    assert all(r.score is None and r.error for r in results)


def test_threshold_is_inclusive_and_compared_exactly(detector, pool):
    base = Scorer(detector, input_size=SIZE, device="cpu")
    score = base.score_bytes([pool[1]])[0].score
    at = Scorer(detector, input_size=SIZE, device="cpu", threshold=score).score_bytes([pool[1]])[0]
    assert at.score == score and at.is_fake is True  # score == threshold is fake
    # a threshold just above the (float32) score: not fake, even though it rounds to the
    # same float32 value
    above = float(np.nextafter(score, 2.0))
    assert np.float32(above) == np.float32(score)
    r = Scorer(detector, input_size=SIZE, device="cpu", threshold=above).score_bytes([pool[1]])[0]
    assert r.is_fake is False and r.is_fake == (r.score >= above)


# ---------------------------------------------------------------------------------------
# batch independence


def test_batch_independence(detector, pool, awkward):
    alone_scorer = Scorer(detector, input_size=SIZE, device="cpu", batch_size=1)
    alone = [alone_scorer.score_bytes([b])[0].score for b in pool]
    assert all(s is not None for s in alone)
    assert max(alone) - min(alone) > 1e-3
    broken = [data for data, ok in awkward.values() if not ok]
    good_awkward = [data for data, ok in awkward.values() if ok]

    rng = np.random.default_rng(0)
    for batch_size in (1, 2, 3, 5, 64):
        scorer = Scorer(detector, input_size=SIZE, device="cpu", batch_size=batch_size)
        for trial in range(4):
            # a random sub-batch of the pool in random order, padded with other content:
            # broken files, awkward good files, non-bytes items
            k = int(rng.integers(1, len(pool) + 1))
            chosen = rng.permutation(len(pool))[:k].tolist()
            items, where = [], {}
            extras = broken[trial::4] + good_awkward[trial::5] + [None]
            order = [("pool", i) for i in chosen] + [("extra", j) for j in range(len(extras))]
            rng.shuffle(order)
            for kind, idx in order:
                if kind == "pool":
                    where[idx] = len(items)
                    items.append(pool[idx])
                else:
                    items.append(extras[idx])
            results = scorer.score_bytes(items)
            assert len(results) == len(items)
            for idx, pos in where.items():
                assert results[pos].score == pytest.approx(alone[idx], abs=1e-6), (batch_size, trial, idx, pos)

    # the same image many times in one batch, at every position
    scorer = Scorer(detector, input_size=SIZE, device="cpu", batch_size=4)
    repeated = scorer.score_bytes([pool[3]] * 9)
    for r in repeated:
        assert r.score == pytest.approx(alone[3], abs=1e-6)


# ---------------------------------------------------------------------------------------
# crops: upscale small images, never resize big ones


def test_small_image_is_upscaled_not_padded(detector, awkward):
    data = awkward["small.png"][0]  # 50 x 40
    scorer = Scorer(detector, input_size=SIZE, device="cpu")
    r = scorer.score_bytes([data])[0]
    assert r.error is None and 0 <= r.score <= 1 and (r.width, r.height) == (50, 40)
    crop, meta = scorer.preprocess(data)
    assert crop.shape == (3, SIZE, SIZE) and crop.dtype == torch.uint8
    # reference: bilinear upscale so the short side (40) becomes 64 -> 64 x 80, centre crop
    img = to_tensor(decode(data).image)
    up = F.interpolate(img[None].float(), size=(64, 80), mode="bilinear", align_corners=False)[0]
    ref = up[:, :, 8:72]
    assert (crop.float() - ref).abs().max() <= 1.0  # uint8 rounding only
    # padding would leave constant borders; a plain crop without upscaling could not be 64 high
    for border in (crop[:, 0, :], crop[:, -1, :], crop[:, :, 0], crop[:, :, -1]):
        assert border.float().std() > 1.0


@pytest.mark.parametrize("hw", [(64, 64), (65, 64), (64, 65), (100, 77), (64, 300), (300, 64), (301, 299), (1000, 70)])
def test_eval_crop_of_large_images_is_not_resized(hw):
    h, w = hw
    t = to_tensor(texture(h, w, seed=h * 7 + w))
    out = eval_transform(t, SIZE)
    assert out.shape == (3, SIZE, SIZE)
    # a plain centre crop of the tensor (torchvision rounds an odd margin to the nearest even)
    tops = {(h - SIZE) // 2, -(-(h - SIZE) // 2)}
    lefts = {(w - SIZE) // 2, -(-(w - SIZE) // 2)}
    assert any(torch.equal(out, t[:, a : a + SIZE, b : b + SIZE]) for a in tops for b in lefts), hw


def test_scorer_crop_is_native_resolution(detector):
    arr = texture(100, 90, seed=3)
    data = png(arr)
    crop, _ = Scorer(detector, input_size=SIZE, device="cpu").preprocess(data)
    t = to_tensor(arr)
    assert any(torch.equal(crop, t[:, a : a + SIZE, b : b + SIZE]) for a in (18, 19) for b in (13,))


def test_extreme_aspect_ratio_is_refused_not_exploded(detector):
    # 2 x 400 decodes fine, but fitting 64 px on its short side would need 64 x 12800 px
    sliver = png(texture(2, 400, seed=1))
    scorer = Scorer(detector, input_size=SIZE, device="cpu", max_pixels=200_000)
    r = scorer.score_bytes([sliver, png(texture(40, 50, seed=2))])
    assert r[0].score is None and r[0].error.startswith("too_large: ") and (r[0].width, r[0].height) == (400, 2)
    assert r[1].error is None
    # with no pixel ceiling it is scored
    assert Scorer(detector, input_size=SIZE, device="cpu", max_pixels=None).score_bytes([sliver])[0].error is None


# ---------------------------------------------------------------------------------------
# memory: a crop owns its pixels, a frame lives until its crop is taken


@pytest.mark.parametrize("hw", [(600, 400), (SIZE, 5 * SIZE), (SIZE // 2, 3 * SIZE), (SIZE, SIZE)])
def test_crop_owns_its_memory_not_the_frame(detector, hw):
    scorer = Scorer(detector, input_size=SIZE, device="cpu")
    arr = texture(*hw, seed=hw[0] + hw[1])
    crop, meta = scorer.preprocess(png(arr))
    assert meta.error is None and crop.shape == (3, SIZE, SIZE)
    assert crop.untyped_storage().nbytes() == 3 * SIZE * SIZE  # not 3 * H * W
    assert crop.is_contiguous()
    frame = to_tensor(arr)
    crop, _ = scorer.crop(frame, "PNG", "pil")
    assert torch.equal(crop, eval_transform(frame, SIZE))
    assert crop.untyped_storage().nbytes() == 3 * SIZE * SIZE


def _frames_alive_at_each_crop(monkeypatch, scorer: Scorer, items: list[bytes]) -> list[int]:
    """Score ``items`` with the core decoder; for each crop taken, how many decoded frames were still alive."""
    frames: list[weakref.ref] = []
    alive: list[int] = []
    real_decode, real_crop = Scorer.decode, Scorer.crop

    def decode_spy(self, data, **kw):
        image, result = real_decode(self, data, **kw)
        frames.append(weakref.ref(image))
        return image, result

    def crop_spy(self, image, fmt, decoder):
        alive.append(sum(ref() is not None for ref in frames))
        return real_crop(self, image, fmt, decoder)

    monkeypatch.setattr(Scorer, "decode", decode_spy)
    monkeypatch.setattr(Scorer, "crop", crop_spy)
    results = scorer.score_bytes(items)
    assert all(r.error is None for r in results), results
    return alive


def test_core_decoder_path_holds_one_frame_at_a_time(detector, monkeypatch):
    items = [png(texture(200 + 10 * i, 300, seed=70 + i)) for i in range(5)]
    scorer = Scorer(detector, input_size=SIZE, device="cpu", decoder="pil")
    assert _frames_alive_at_each_crop(monkeypatch, scorer, items) == [1] * 5  # views kept 1, 2, 3, ...


def test_batched_jpeg_path_decodes_in_groups_and_holds_one_group_at_a_time(detector, monkeypatch):
    from ntf_ray.images import gpu_decode

    h, w = 96, 128
    items = [jpg(texture(h, w, seed=80 + i)) for i in range(6)]
    groups: list[int] = []
    frames: list[weakref.ref] = []
    alive: list[int] = []
    before: list[int] = []
    real, real_batch = gpu_decode.decode_jpegs, Scorer.crop_batch

    def decode_spy(blobs, device, decode_fn=None):
        groups.append(len(blobs))
        before.append(sum(ref() is not None for ref in frames))  # the last group's frames, still alive?
        out = real(blobs, device, decode_fn)
        frames.extend(weakref.ref(f) for f in out)
        return out

    def crop_batch_spy(self, group_frames, fmt, decoder):
        alive.append(sum(ref() is not None for ref in frames))
        return real_batch(self, group_frames, fmt, decoder)

    monkeypatch.setattr(gpu_decode, "decode_jpegs", decode_spy)
    monkeypatch.setattr(Scorer, "crop_batch", crop_batch_spy)
    # The pixel ceiling bounds each batched call: three of these images per call.
    scorer = Scorer(detector, input_size=SIZE, device="cpu", decoder="nvjpeg", max_pixels=3 * h * w + 1)
    results = scorer.score_bytes(items)
    assert all(r.error is None for r in results), results
    assert groups == [3, 3]
    assert alive == [3, 3]  # the group being cropped; the one before is gone, never the whole batch
    assert before == [0, 0]  # nothing of a group outlives it into the next decode
    pil = Scorer(detector, input_size=SIZE, device="cpu", decoder="pil", max_pixels=3 * h * w + 1)
    monkeypatch.undo()
    assert [r.score for r in scorer.score_bytes(items)] == [r.score for r in pil.score_bytes(items)]
    assert {r.decoder for r in scorer.score_bytes(items)} == {"nvjpeg"}


# ---------------------------------------------------------------------------------------
# from_artifact and the CLI


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory, detector) -> str:
    uri = str(tmp_path_factory.mktemp("art") / "detector")
    save_artifact(uri, detector, input_size=SIZE, threshold=0.45)
    return uri


def test_from_artifact(detector, artifact_dir, pool):
    s = Scorer.from_artifact(artifact_dir, device="cpu")
    assert (s.input_size, s.threshold, len(s.model_id)) == (SIZE, pytest.approx(0.45), 16)
    direct = Scorer(detector, input_size=SIZE, device="cpu", threshold=0.45).score_bytes(pool)
    loaded = s.score_bytes(pool)
    for a, b in zip(direct, loaded):
        assert a.score == pytest.approx(b.score, abs=1e-6) and a.is_fake == b.is_fake
    over = Scorer.from_artifact(artifact_dir, device="cpu", threshold=0.0, batch_size=3)
    assert over.threshold == 0.0 and over.batch_size == 3
    assert all(r.is_fake for r in over.score_bytes(pool))


def test_cli_score(artifact_dir, pool, tmp_path, capsys):
    files = []
    for i, data in enumerate(pool[:3]):
        p = tmp_path / f"img{i}.bin"
        p.write_bytes(data)
        files.append(str(p))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    missing = tmp_path / "missing.png"
    rc = cli.main(["score", "--model", artifact_dir, "--device", "cpu", *files, str(broken), str(missing)])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 5
    rows = [json.loads(ln) for ln in lines]
    for row in rows:
        assert set(row) == {"uri", "score", "is_fake", "error", "decoder", *PROVENANCE_COLUMNS}
    assert [r["uri"] for r in rows] == files + [str(broken), str(missing)]
    want = Scorer.from_artifact(artifact_dir, device="cpu").score_bytes(pool[:3])
    for row, w in zip(rows[:3], want):
        assert row["error"] is None
        assert row["score"] == pytest.approx(w.score, abs=1e-6)
        assert row["is_fake"] == w.is_fake == (row["score"] >= 0.45)
    assert rows[3]["score"] is None and rows[3]["is_fake"] is None and rows[3]["error"].startswith("decode: ")
    assert rows[4]["score"] is None and rows[4]["is_fake"] is None and rows[4]["error"].startswith("read: ")

    # --threshold overrides the artifact's
    rc = cli.main(["score", "--model", artifact_dir, "--device", "cpu", "--threshold", "0", files[0]])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and row["is_fake"] is True and not math.isnan(row["score"])


def test_cli_score_bad_model_is_an_error_not_a_crash(tmp_path, pool, capsys):
    p = tmp_path / "img.png"
    p.write_bytes(pool[0])
    rc = cli.main(["score", "--model", str(tmp_path / "no-model"), "--device", "cpu", str(p)])
    assert rc != 0
    assert "no model.json" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (SIZE + 1, SIZE + 2), (SIZE + 7, 3 * SIZE + 4), (2 * SIZE, SIZE + 3)])
def test_batched_crop_takes_the_same_window_as_the_per_image_crop(detector, shape):
    scorer = Scorer(detector, input_size=SIZE, device="cpu")
    frames = [torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
              for k in range(3)]
    rows, crops, results = scorer.crop_batch(frames, "JPEG", "nvjpeg")
    assert rows == [0, 1, 2] and crops.shape == (3, 3, SIZE, SIZE)
    for frame, crop, r in zip(frames, crops, results):
        assert torch.equal(crop, eval_transform(frame, SIZE))
        assert (r.width, r.height, r.error, r.decoder) == (shape[1], shape[0], None, "nvjpeg")


def test_batched_crop_sends_small_and_sliver_frames_through_the_per_image_crop(detector):
    scorer = Scorer(detector, input_size=SIZE, device="cpu", max_pixels=50_000)
    g = torch.Generator().manual_seed(5)
    frames = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g)
              for s in [(3, SIZE - 5, SIZE + 9), (3, SIZE, SIZE), (3, 1, 20_000), (3, SIZE + 2, SIZE)]]
    rows, crops, results = scorer.crop_batch(frames, "JPEG", "nvjpeg")
    assert rows == [1, 3, 0]  # the whole-window crops first, then the upscaled one; the sliver is refused
    assert results[2].error.startswith("too_large:") and results[2].width == 20_000
    for row, k in enumerate(rows):
        assert torch.equal(crops[row], eval_transform(frames[k], SIZE))


def test_views_into_an_arrow_column_score_as_their_bytes(detector):
    import pyarrow as pa

    from ntf_ray.ray_edge.scan.actor import binary_views

    blobs = [jpg(texture(90, 120, seed=90 + i)) for i in range(3)] + [png(texture(80, 70, seed=99))]
    views = binary_views(pa.array(blobs, pa.binary()))  # how the detector actor hands a batch over
    for decoder in ("pil", "nvjpeg"):
        scorer = Scorer(detector, input_size=SIZE, device="cpu", decoder=decoder)
        results = scorer.score_bytes(views)
        assert [r.as_dict() for r in results] == [r.as_dict() for r in scorer.score_bytes(blobs)]
        assert [r.decoder for r in results] == [decoder] * 3 + ["pil"]


def test_a_detector_actor_imports_no_evaluation_libraries():
    """Every module a detector actor imports is start-up time on the critical path of a scan."""
    import subprocess
    import sys

    code = ("import sys, ntf_ray.ray_edge.scan.actor, ntf_ray.detector.scorer, ntf_ray.detector.artifact; "
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_gpu_decoder_paths_score_within_the_stated_tolerance_of_the_cpu_path(monkeypatch):
    """Parity that can fail: a detector whose scores are spread out (checked), 1,000 held-out
    JPEGs of many sizes and shapes (smaller than the crop too), every GPU decoder's path
    (batched decode, batched crops, routing) against the core decoder's. On a CPU the
    decoders stand in (torchvision's libjpeg-turbo for nvJPEG, Pillow for nvImageCodec), so
    the pixels agree and what is checked is everything around them; the GPU figures are the
    bench's."""
    from ntf_ray.detector.scorer import PARITY_TOLERANCE, parity
    from ntf_ray.images import gpu_decode
    from ntf_ray.nn.model import Detector
    from tests.test_gpu_decode import _FakeNvImageCodec

    torch.manual_seed(0)
    detector = Detector.build("tiny")
    with torch.no_grad():
        detector.classifier.fc.weight.mul_(400.0)  # random weights score everything alike; spread them out
    rng = np.random.default_rng(11)
    blobs = []
    for i in range(1000):
        h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        blobs.append(jpg(texture(h, w, seed=1000 + i), quality=int(rng.integers(60, 96))))
    pil = Scorer(detector, input_size=SIZE // 2, device="cpu", decoder="pil", batch_size=256)
    def logit(r):
        p = min(max(r.score, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    first = [logit(r) for r in pil.score_bytes(blobs)]
    with torch.no_grad():
        detector.classifier.fc.bias.sub_(float(np.median(first)))  # half the files on each side of 0.5
    reference = pil.score_bytes(blobs)
    logits = np.array([logit(r) for r in reference])
    assert logits.std() > 1.0 and 0.1 < np.mean([r.is_fake for r in reference]) < 0.9, logits.std()

    monkeypatch.setattr(gpu_decode, "nvimgcodec_module", lambda: _FakeNvImageCodec())
    for decoder, (max_diff, flipped_share) in PARITY_TOLERANCE.items():
        gpu = Scorer(detector, input_size=SIZE // 2, device="cpu", decoder=decoder, batch_size=256)
        results = gpu.score_bytes(blobs)
        assert sum(r.decoder == decoder for r in results) == len(blobs)  # every file took the batched path
        found = parity(reference, results, pil.threshold)
        assert found.images == len(blobs) and found.within(max_diff, flipped_share), (decoder, found)


def test_threads_scoring_at_once_get_what_each_would_get_alone(detector):
    """A GPU actor scores --streams batches at once from Ray Data's threads: the scorer keeps
    no state between calls, so concurrent calls give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[jpg(texture(60 + 7 * k, 70 + 5 * i, seed=200 + 10 * k + i)) for i in range(6)] + [b"not an image"]
               for k in range(4)]
    for decoder in ("pil", "nvjpeg"):
        scorer = Scorer(detector, input_size=SIZE, device="cpu", decoder=decoder)
        alone = [[r.as_dict() for r in scorer.score_bytes(b)] for b in batches]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: [r.as_dict() for r in scorer.score_bytes(b)], batches * 3))
        assert together == alone * 3


def test_a_detector_that_scores_nan_fails_closed(tmp_path, pool, capsys):
    from ntf_ray.cli import main
    from ntf_ray.errors import DetectorFault
    from tests.conftest import save_nan_detector

    model = save_nan_detector(str(tmp_path / "nan"))
    scorer = Scorer.from_artifact(model, device="cpu")
    with pytest.raises(DetectorFault, match="scored 2 of 2 images NaN or infinity"):
        scorer.score_bytes(pool[:2])
    (tmp_path / "a.png").write_bytes(pool[0])
    assert main(["score", "--model", model, str(tmp_path / "a.png")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "NaN" not in out
    assert err.strip().splitlines() == [err.strip()] and err.startswith("ntf-ray score: error: detector ")


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0, 50.0, 1.0000001])
def test_a_threshold_outside_0_1_is_refused(detector, threshold):
    from ntf_ray.detector.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="expected a number in \\[0, 1\\]"):
        Scorer(detector, input_size=SIZE, device="cpu", threshold=threshold)
