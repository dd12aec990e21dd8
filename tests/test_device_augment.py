"""The train worker's device path against the CPU path it replaces on GPU workers.

Every operation is checked against torchvision's own kernel, and each stage's random draws
against the CPU path's (``ntf_ray.images.transforms``) from what the views show: images whose
pixels say where they came from (a ramp per axis), so the crop box, the flip, the SCL
crop's offset and whether a blur or a JPEG touched the view can be read back from any
view. Distributions are compared with two-sample Kolmogorov-Smirnov tests and rates with
binomial bounds; all draws are seeded, so a run is repeatable.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.stats import chisquare, ks_2samp, kstest, uniform

from ntf_ray.images import batch_ops as B
from ntf_ray.images.transforms import Stage1Views, Stage2Transform, to_tensor
from ntf_ray.training import device_augment as D
from ntf_ray.training.config import TrainConfig

N = 600  # views per path in each distribution test
#: where the device path runs in these tests: the CPU always, a GPU too when there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
P_MIN = 1e-3  # KS p-value below which two samples are called different


def _rate_bound(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma of a binomial share


def ramp(h: int = 256, w: int = 256) -> torch.Tensor:
    """R = column, G = row (both 0..255), B = 8 px squares: a view's R and G say where it came
    from, and how far a blur or a JPEG moved its squares says how strong it was."""
    assert h <= 256 and w <= 256
    x = torch.arange(w).expand(h, w)
    y = torch.arange(h).unsqueeze(1).expand(h, w)
    return torch.stack([x, y, 255 * ((x // 8 + y // 8) % 2)]).to(torch.uint8)


# ---------------------------------------------------------------- operations


def _batch(n=16, h=20, w=24, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op,ref,low,high", [
    (B.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
    (B.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
    (B.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    (B.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_each_colour_operation_is_torchvisions_with_one_factor_per_view(op, ref, low, high):
    x = _batch()
    factors = torch.linspace(low, high, len(x))
    ours = op(x.float(), factors)
    theirs = torch.stack([ref(x[i], float(factors[i])) for i in range(len(x))]).float()
    diff = (ours - theirs).abs()
    # saturation blends in another float order than torchvision's fused add: a level, rarely
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.equal(ours, ours.floor())  # whole levels between operations, as uint8 kernels leave them


def test_grayscale_is_torchvisions():
    x = _batch()
    theirs = torch.stack([TF.rgb_to_grayscale(i, num_output_channels=3) for i in x]).float()
    assert torch.equal(B.grayscale(x.float()), theirs)


def test_colour_jitter_applies_each_views_operations_in_its_own_order():
    x = _batch(n=24)
    g = torch.Generator().manual_seed(3)
    factors = torch.stack([B.uniform(24, 0.6, 1.4, g), B.uniform(24, 0.6, 1.4, g), B.uniform(24, 0.6, 1.4, g),
                           B.uniform(24, -0.1, 0.1, g)], dim=1)
    order = torch.argsort(torch.rand((24, 4), generator=g), dim=1)
    ours = B.color_jitter(x.float(), factors, order)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        img = x[i]
        for op_id in order[i].tolist():
            img = refs[op_id](img, float(factors[i, op_id]))
        assert (ours[i] - img.float()).abs().max() <= 1, (i, order[i])


@pytest.mark.parametrize("box", [(10, 20, 100, 120), (0, 0, 256, 300), (5, 7, 60, 50), (30, 20, 224, 224)])
def test_resized_crops_are_torchvisions_within_a_level_on_average(box):
    img = TF.gaussian_blur(ramp(256, 256).repeat(1, 1, 2)[:, :, :300] if box[3] > 256 else ramp(), [5, 5], [1.5, 1.5])
    ours = B.crop_resize(img, [box], 224)[0].round().clamp(0, 255)
    theirs = TF.resized_crop(img, *box, [224, 224], antialias=True).float()
    diff = (ours - theirs).abs()
    if box[2:] == (224, 224):
        assert torch.equal(ours, theirs)  # a window of the crop's size is copied, not resampled
    # measured: mean 0.21-0.44 levels, max 4-10 on noise (an area mean where torchvision has a triangle filter)
    assert diff.mean() < 1.0


# ---------------------------------------------------------------- stage 1 draws


def _cpu_stage1(img, n, **kw):
    torch.manual_seed(11)
    t = Stage1Views(224, **kw)
    views = [v for _ in range(n // 2) for v in t(img)]
    return torch.stack(views)


def _device_stage1(img, n, **kw):
    views = D.Stage1DeviceViews(224, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    a, b = views([img] * (n // 2), torch.Generator().manual_seed(12))
    return torch.cat([a, b])


def _boxes(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Crop geometry read back from views of ``ramp()``: area share, log aspect, centre, flipped."""
    v = views.float()
    r_first, r_last = v[:, 0, :, 0].mean(1), v[:, 0, :, -1].mean(1)
    g_first, g_last = v[:, 1, 0, :].mean(1), v[:, 1, -1, :].mean(1)
    w = (r_last - r_first).abs() * 224 / 223
    h = (g_last - g_first) * 224 / 223
    return {"area": (w * h / 256 ** 2).numpy(), "log_aspect": torch.log(w / h).numpy(),
            "cx": ((r_first + r_last) / 2).numpy(), "cy": ((g_first + g_last) / 2).numpy(),
            "flipped": (r_first > r_last).numpy()}


def test_stage1_crops_and_flips_draw_the_cpu_paths_distributions():
    img = ramp()
    cpu = _boxes(_cpu_stage1(img, N, jitter=0.0, grayscale_prob=0.0))
    dev = _boxes(_device_stage1(img, N, jitter=0.0, grayscale_prob=0.0))
    for key in ("area", "log_aspect", "cx", "cy"):
        assert ks_2samp(cpu[key], dev[key]).pvalue > P_MIN, key
    # the draws' ranges: area in crop_scale, aspect in [3/4, 4/3] (read back within rounding)
    assert dev["area"].min() > 0.07 and dev["area"].max() < 1.02
    assert dev["log_aspect"].min() > math.log(3 / 4) - 0.05 and dev["log_aspect"].max() < math.log(4 / 3) + 0.05


def test_stage1_flips_half_the_views_as_the_cpu_path():
    img, n = ramp(), 2000
    for views in (_cpu_stage1(img, n, crop_scale=[1.0, 1.0], jitter=0.0, grayscale_prob=0.0),
                  _device_stage1(img, n, crop_scale=[1.0, 1.0], jitter=0.0, grayscale_prob=0.0)):
        assert abs(_boxes(views)["flipped"].mean() - 0.5) < 3 * math.sqrt(0.25 / n)


def test_stage1_native_crops_draw_every_position_as_the_cpu_path():
    img = ramp()
    cpu = _boxes(_cpu_stage1(img, N, resized_crop=False, jitter=0.0, grayscale_prob=0.0))
    dev = _boxes(_device_stage1(img, N, resized_crop=False, jitter=0.0, grayscale_prob=0.0))
    for key in ("cx", "cy"):
        assert ks_2samp(cpu[key], dev[key]).pvalue > P_MIN, key
    assert np.allclose(dev["area"], (224 / 256) ** 2, atol=0.01)


def _two_colours() -> torch.Tensor:
    img = torch.empty((3, 224, 224), dtype=torch.uint8)
    img[:, :, :112] = torch.tensor([200, 120, 40], dtype=torch.uint8).view(3, 1, 1)
    img[:, :, 112:] = torch.tensor([30, 90, 160], dtype=torch.uint8).view(3, 1, 1)
    return img


def _colour_stats(views: torch.Tensor, img: torch.Tensor) -> dict[str, np.ndarray]:
    v = views.float()
    luma = v[:, 0] * 0.2989 + v[:, 1] * 0.587 + v[:, 2] * 0.114
    same = [(torch.equal(x, img) or torch.equal(x, img.flip(-1))) for x in views]
    return {"r": v[:, 0].mean((1, 2)).numpy(), "g": v[:, 1].mean((1, 2)).numpy(), "b": v[:, 2].mean((1, 2)).numpy(),
            "chroma": (v.amax(1) - v.amin(1)).mean((1, 2)).numpy(),
            "contrast": (luma[:, :, :100].mean((1, 2)) - luma[:, :, 124:].mean((1, 2))).abs().numpy(),
            "untouched": np.asarray(same), "gray": ((v[:, 0] == v[:, 1]) & (v[:, 1] == v[:, 2])).all(-1).all(-1).numpy()}


def test_stage1_colour_jitter_draws_the_cpu_paths_distributions():
    img = _two_colours()  # a crop of all of it (scale 1), so only colour changes the views
    kw = dict(crop_scale=[1.0, 1.0], jitter=0.5, grayscale_prob=0.0)
    cpu = _colour_stats(_cpu_stage1(img, N, **kw), img)
    dev = _colour_stats(_device_stage1(img, N, **kw), img)
    for key in ("r", "g", "b", "chroma", "contrast"):
        assert ks_2samp(cpu[key], dev[key]).pvalue > P_MIN, key
    for stats in (cpu, dev):  # jitter applied with probability 0.8
        assert abs(stats["untouched"].mean() - 0.2) < _rate_bound(0.2, N)


def test_stage1_jitter_draws_are_colorjitters():
    s, n = 0.5, 20000
    apply, factors, order = D.Stage1DeviceViews(jitter=s).jitter_draws(n, torch.Generator().manual_seed(9))
    assert abs(apply.float().mean() - 0.8) < _rate_bound(0.8, n)
    for k, (low, high) in enumerate([(1 - 0.8 * s, 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]):
        assert kstest(factors[:, k].numpy(), uniform(loc=low, scale=high - low).cdf).pvalue > P_MIN, k
    for position in range(4):  # every operation equally likely at every place
        share = torch.bincount(order[:, position], minlength=4).float() / n
        assert (share - 0.25).abs().max() < _rate_bound(0.25, n)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))


def test_stage2_blur_and_jpeg_draws_are_the_cpu_paths():
    n = 20000
    views = D.Stage2DeviceViews(blur_prob=0.1, blur_sigma=(0.0, 3.0), jpeg_prob=0.2, jpeg_quality=(30, 100))
    blur, sigmas, jpeg, qualities = views.degrade_draws(n, torch.Generator().manual_seed(10))
    assert abs(blur.float().mean() - 0.1) < _rate_bound(0.1, n) and abs(jpeg.float().mean() - 0.2) < _rate_bound(0.2, n)
    assert kstest(sigmas.numpy(), uniform(loc=0.0, scale=3.0).cdf).pvalue > P_MIN
    counts = torch.bincount(qualities, minlength=101)[30:]
    assert qualities.min() == 30 and qualities.max() == 100 and len(counts) == 71
    assert chisquare(counts.numpy()).pvalue > P_MIN  # every quality from 30 to 100 equally likely


def test_stage1_grayscale_rate_is_the_cpu_paths():
    img = _two_colours()
    kw = dict(crop_scale=[1.0, 1.0], jitter=0.0, grayscale_prob=0.2)
    for stats in (_colour_stats(_cpu_stage1(img, N, **kw), img), _colour_stats(_device_stage1(img, N, **kw), img)):
        assert abs(stats["gray"].mean() - 0.2) < _rate_bound(0.2, N)
        assert (stats["gray"] | stats["untouched"]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_stage1_views_of_frames_of_many_sizes_stay_with_their_frame(device):
    g = torch.Generator().manual_seed(5)
    sizes = [(300, 260), (224, 224), (256, 400), (300, 260), (230, 500)]
    colours = torch.randint(0, 256, (len(sizes), 3), generator=g, dtype=torch.uint8)
    frames = [c.view(3, 1, 1).expand(3, h, w).contiguous().to(device) for c, (h, w) in zip(colours, sizes)]
    a, b = D.Stage1DeviceViews(224, jitter=0.0, grayscale_prob=0.0)(frames, g)
    for views in (a.cpu(), b.cpu()):
        assert views.shape == (len(sizes), 3, 224, 224) and views.dtype == torch.uint8 and views.is_contiguous()
        assert torch.equal(views[:, :, 0, 0], colours) and torch.equal(views.amin((2, 3)), views.amax((2, 3)))
    assert a.device.type == device


# ---------------------------------------------------------------- stage 2 draws


def _cpu_stage2(img, n, **kw):
    t = Stage2Transform(224, 32, seed=21, **kw)
    pairs = [t(img) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _device_stage2(img, n, **kw):
    views = D.Stage2DeviceViews(224, 32, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    return views([img] * n, torch.Generator().manual_seed(22))


def _stage2_stats(crops: torch.Tensor, scl: torch.Tensor, img: torch.Tensor) -> dict[str, np.ndarray]:
    """Where each crop came from (read on its ramps), whether it is that window of ``img``
    untouched, how far its noise channel moved from it, and the SCL crop's offset in it."""
    out = {k: [] for k in ("top", "left", "flipped", "changed", "moved", "scl_top", "scl_left")}
    for crop, small in zip(crops, scl):
        c = crop.long()
        flipped = bool(c[0, 112, 0] > c[0, 112, -1])
        top = int(c[1, 112, 112]) - 112  # interior pixels: a blur leaves a ramp's interior alone
        left = int(c[0, 112, 112]) - (111 if flipped else 112)
        top, left = min(max(top, 0), img.shape[1] - 224), min(max(left, 0), img.shape[2] - 224)
        best = None
        for dt in range(-3, 4):  # a JPEG may move the ramps a little: take the closest window
            for dl in range(-3, 4):
                t, l = top + dt, left + dl
                if 0 <= t <= img.shape[1] - 224 and 0 <= l <= img.shape[2] - 224:
                    window = img[:, t : t + 224, l : l + 224]
                    window = window.flip(-1) if flipped else window
                    d = (window.long() - c).abs()
                    if best is None or d.sum() < best[0].sum():
                        best, where = (d, (t, l))
        out["top"].append(where[0])
        out["left"].append(where[1])
        out["flipped"].append(flipped)
        out["changed"].append(bool(best[0].any()))
        out["moved"].append(float(best[0][2].float().mean()))
        # the SCL crop is a window of the crop, pixel for pixel: find it
        first = (crop[:, :193, :193] == small[:, :1, :1]).all(0).nonzero().tolist()
        found = [(t, l) for t, l in first if torch.equal(crop[:, t : t + 32, l : l + 32], small)]
        out["scl_top"].append(found[0][0] if found else -1)
        out["scl_left"].append(found[0][1] if found else -1)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("kw", [dict(blur_prob=0.5, jpeg_prob=0.0), dict(blur_prob=0.0, jpeg_prob=0.5)],
                         ids=["blur", "jpeg"])
def test_stage2_blur_jpeg_crop_flip_and_scl_crop_draw_the_cpu_paths_distributions(kw):
    img = ramp()
    n = 400
    cpu = _stage2_stats(*_cpu_stage2(img, n, **kw), img)
    dev = _stage2_stats(*_device_stage2(img, n, **kw), img)
    rate = max(kw.values())
    for stats in (cpu, dev):
        # sigma ~ U[0, 3] below ~0.3 px leaves uint8 pixels as they were: a blur changes ~90% of its views
        low = 0.85 * rate if kw["blur_prob"] else rate
        assert low - _rate_bound(rate, n) < stats["changed"].mean() < rate + _rate_bound(rate, n)
        assert abs(stats["flipped"].mean() - 0.5) < _rate_bound(0.5, n)
    assert abs(cpu["changed"].mean() - dev["changed"].mean()) < 2 * _rate_bound(rate, n)
    # how strong: sigma's or quality's distribution, seen in how far the noise moved
    assert ks_2samp(cpu["moved"][cpu["changed"]], dev["moved"][dev["changed"]]).pvalue > P_MIN
    for key in ("top", "left", "scl_top", "scl_left"):
        assert ks_2samp(cpu[key], dev[key]).pvalue > P_MIN, key
    assert dev["scl_top"].min() >= 0 and dev["scl_left"].min() >= 0
    assert dev["scl_top"].max() <= 192 and dev["scl_left"].max() <= 192


@pytest.mark.parametrize("device", DEVICES)
def test_stage2_views_are_valid_images_and_small_frames_are_upscaled_after_blur(device):
    g = torch.Generator().manual_seed(8)
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device)
              for h, w in ((100, 150), (224, 224), (300, 260))]
    crops, scl = D.Stage2DeviceViews(224, 32, blur_prob=1.0, jpeg_prob=1.0)(frames, g)
    assert crops.shape == (3, 3, 224, 224) and scl.shape == (3, 3, 32, 32) and crops.device.type == device
    assert crops.dtype == scl.dtype == torch.uint8 and crops.is_contiguous() and scl.is_contiguous()
    assert all(len(torch.unique(c)) > 16 for c in crops)  # pictures, not a constant fill


# ---------------------------------------------------------------- the worker's batches


def _jpeg(img: torch.Tensor, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_decoded_frames_are_the_core_decoders_and_bad_files_are_left_out():
    g = torch.Generator().manual_seed(4)
    imgs = [torch.randint(0, 256, (3, 40 + 8 * i, 48), dtype=torch.uint8, generator=g) for i in range(4)]
    blobs = [_jpeg(imgs[0]), _png(imgs[1]), b"not an image", None, _jpeg(imgs[2])[:200], _jpeg(imgs[3]), b""]
    from ntf_ray.images.decode import decode

    got = {}
    for group, frames in D.decode_frames(blobs, torch.device("cpu"), max_pixels=None):
        got.update(zip(group, frames))
    assert sorted(got) == [0, 1, 5]  # the truncated JPEG, the text, the failed read and the empty file are out
    for i in got:
        assert torch.equal(got[i], to_tensor(decode(blobs[i], max_pixels=None).image))


def test_device_batches_drop_and_count_what_cannot_be_used_and_keep_labels_aligned():
    cfg = TrainConfig.from_dict({"crop_size": 32, "scl_crop_size": 8, "max_pixels": 100_000})
    g = torch.Generator().manual_seed(6)
    imgs = [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g) for _ in range(3)]
    sliver = torch.zeros((3, 1, 4000), dtype=torch.uint8)  # would need 32 x 128,000 px to fit the crop
    blobs = [_jpeg(imgs[0]), b"junk", _png(imgs[1]), _png(sliver), _jpeg(imgs[2]), None]
    batch = pa.table({"label": pa.array([0, 1, 1, 0, 1, 0], pa.int64()), "data": pa.array(blobs, pa.binary())})
    for stage, keys, second in ((1, ("view1", "view2"), 32), (2, ("image", "crop"), 8)):
        make = D.DeviceBatches(stage, cfg, torch.device("cpu"), seed=0)
        out = make(batch)
        assert out["label"].tolist() == [0, 1, 1] and make.dropped == 3
        assert out[keys[0]].shape == (3, 3, 32, 32) and out[keys[1]].shape == (3, 3, second, second)
        empty = make(batch.slice(1, 1))
        assert empty["label"].shape == (0,) and empty[keys[0]].shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_batches_on_a_gpu_give_both_stages_batches_there():
    """Run where a GPU is: nvJPEG for the JPEGs, the CPU decoder for the PNG, a side stream."""
    cfg = TrainConfig.from_dict({"crop_size": 224, "scl_crop_size": 32})
    g = torch.Generator().manual_seed(2)
    imgs = [torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8, generator=g) for _ in range(3)]
    batch = pa.table({"label": pa.array([0, 1, 1], pa.int64()),
                      "data": pa.array([_jpeg(imgs[0]), _png(imgs[1]), _jpeg(imgs[2])], pa.binary())})
    for stage in (1, 2):
        make = D.DeviceBatches(stage, cfg, torch.device("cuda"), seed=0)
        out = next(D.prefetch([batch], make, torch.device("cuda")))
        assert all(t.device.type == "cuda" for t in out.values()) and out["label"].tolist() == [0, 1, 1]


def test_prefetch_keeps_order_raises_where_the_batch_failed_and_stops_with_its_consumer():
    made = []

    def make(x):
        made.append(x)
        if x == 5:
            raise ValueError("bad batch 5")
        return {"x": torch.tensor([x])}

    out = D.prefetch(range(10), make, torch.device("cpu"), depth=2)
    assert [int(b["x"]) for _, b in zip(range(5), out)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad batch 5"):
        next(out)
    early_made = []
    early = D.prefetch(iter(range(1000)), lambda x: early_made.append(x) or {"x": torch.tensor([x])},
                       torch.device("cpu"), depth=2)
    assert int(next(early)["x"]) == 0
    early.close()  # the thread stops: it made at most the batches the queue holds, and the one in hand
    assert len(early_made) <= 4


def test_device_batches_hold_one_decoder_group_at_a_time_and_group_nothing_into_the_draws(monkeypatch):
    import weakref

    from ntf_ray.images.gpu_decode import _decode_fn

    g = torch.Generator().manual_seed(7)
    blobs = [_jpeg(torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)) for _ in range(5)]
    batch = pa.table({"label": pa.array([0, 1, 0, 1, 1], pa.int64()), "data": pa.array(blobs, pa.binary())})
    decode = _decode_fn()
    alive_at_calls, frames = [], []

    def spy(data, device):
        alive_at_calls.append(sum(ref() is not None for ref in frames))
        out = decode(data, device)
        frames.extend(weakref.ref(f) for f in (out if isinstance(out, list) else [out]))
        return out

    outputs = []
    cfg = TrainConfig.from_dict({"crop_size": 32, "scl_crop_size": 8})
    for budget in (48 * 40, D.DECODE_GROUP_PIXELS):  # a group per image, then one group
        monkeypatch.setattr(D, "DECODE_GROUP_PIXELS", budget)
        alive_at_calls.clear()
        outputs.append(D.DeviceBatches(1, cfg, torch.device("cpu"), seed=3, decode_fn=spy)(batch))
        assert len(alive_at_calls) == (5 if budget == 48 * 40 else 1)
        assert alive_at_calls == [0] * len(alive_at_calls)  # no earlier group's frame outlives its crops
    for key in ("view1", "view2", "label"):
        assert torch.equal(outputs[0][key], outputs[1][key])


def test_frames_the_core_decoder_makes_come_in_groups_of_the_same_budget():
    pngs = [_png(torch.full((3, 40, 48), k, dtype=torch.uint8)) for k in range(5)]
    groups = list(D.decode_frames(pngs, torch.device("cpu"), max_pixels=None, group_pixels=2 * 48 * 40))
    assert [g for g, _ in groups] == [[0, 1], [2, 3], [4]]
    assert [int(f[0, 0, 0]) for _, frames in groups for f in frames] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- one definition per augmentation

#: Each augmentation parameter and the test that draws it on the CPU and the GPU path alike.
#: A parameter added to ``Stage1Augment`` or ``Stage2Augment`` fails the test below until a
#: distribution check of both paths is named here.
DISTRIBUTION_CHECKS = {
    "Stage1Augment": {
        "size": "test_stage1_native_crops_draw_every_position_as_the_cpu_path",
        "resized_crop": "test_stage1_native_crops_draw_every_position_as_the_cpu_path",
        "crop_scale": "test_stage1_crops_and_flips_draw_the_cpu_paths_distributions",
        "jitter": "test_stage1_colour_jitter_draws_the_cpu_paths_distributions",
        "grayscale_prob": "test_stage1_grayscale_rate_is_the_cpu_paths",
    },
    "Stage2Augment": {
        name: "test_stage2_blur_jpeg_crop_flip_and_scl_crop_draw_the_cpu_paths_distributions"
        for name in ("size", "scl_size", "blur_prob", "blur_sigma", "jpeg_prob", "jpeg_quality", "flip")
    },
}


def test_every_augmentation_parameter_has_a_cpu_and_gpu_distribution_check():
    import dataclasses
    import inspect

    from ntf_ray.images import augment

    for name, checks in DISTRIBUTION_CHECKS.items():
        params = getattr(augment, name)
        assert set(checks) == {f.name for f in dataclasses.fields(params)}, name
        stage = name[len("Stage")]
        for field, test in checks.items():
            source = inspect.getsource(globals()[test])
            assert f"_cpu_stage{stage}(" in source and f"_device_stage{stage}(" in source, (field, test)


def test_both_paths_are_built_from_one_set_of_parameters():
    """The CPU transforms take every parameter by name; the GPU views are the parameters."""
    from ntf_ray.images.augment import Stage1Augment, Stage2Augment
    from ntf_ray.training.stages import STAGE1, STAGE2

    cfg = TrainConfig(crop_size=64, scl_crop_size=16, stage1_jitter=0.3, blur_prob=0.25, jpeg_quality=[40, 90])
    one, two = STAGE1.augment(cfg), STAGE2.augment(cfg)
    assert isinstance(STAGE1.device_views(cfg), Stage1Augment) and STAGE1.device_views(cfg) == D.Stage1DeviceViews(
        **{f: getattr(one, f) for f in one.__dataclass_fields__})
    cpu1, cpu2 = STAGE1.transform(cfg), STAGE2.transform(cfg, seed=0)
    assert (cpu1.size, cpu1.resized_crop) == (64, one.resized_crop)
    assert (cpu2.size, cpu2.scl_size, cpu2.blur_prob, cpu2.jpeg_quality) == (64, 16, 0.25, (40, 90))
    assert isinstance(STAGE2.device_views(cfg), Stage2Augment) and STAGE2.device_views(cfg) == D.Stage2DeviceViews(
        **{f: getattr(two, f) for f in two.__dataclass_fields__})
    assert two.jpeg_quality == (40, 90) and two.blur_prob == 0.25
