"""Procedural real/fake image sets for the demo, the tests and the benchmarks.

This is *test data*, not a benchmark of real-world accuracy. "Real" images are rendered
directly at full resolution with natural-image statistics (a 1/f^alpha power spectrum with
correlated colour, soft-edged shapes, gratings, a lighting gradient and camera-like sensor
noise). "Fake" images render the same kind of scene at a lower resolution and upsample it
to full size with a randomised upsampling generator, which leaves the periodic, pixel-level
traces that NTF-style detectors learn:

* ``tconv``: stride-2 transposed convolutions (random 3x3 / 4x4 kernels per channel):
  checkerboard artefacts, peaks at the 2-periodic spectral positions.
* ``nnconv``: nearest-neighbour x2 then a random 3x3 convolution: 2x2 block structure,
  (almost) no energy on the Nyquist lines.
* ``bilinear_conv``: bilinear x2 then a random 3x3 convolution: a smooth, faintly
  2-periodic interpolation.

Each family upsamples by x2 or x4 (one or two stages, chosen per image), with a
StyleGAN-like noise injection, a bias and a mild nonlinearity after every stage. All of
them lack the full-resolution detail and sensor noise of the reals above the
low-resolution band, which is part of the trace. These three are ``GENERATORS``, the
default set.

That shared lack of high frequencies is a shortcut: a detector trained on two of them
finds the third by it. The ``FULL_RES_GENERATORS`` (selectable, not in the default set)
render the scene at full resolution like the reals, so the high-frequency content matches
the reals', and differ from them, and from each other, by one trace each:

* ``fingerprint``: the reals' camera noise plus a periodic residual (a random tile of
  period 4-16 px per axis, drawn per image, std 4-10 levels): GAN-like spectral peaks.
* ``noise_shape``: the camera noise replaced by decoder-like noise: spatially coloured
  (a random low-/high-pass or oriented 3-tap filter per axis), (almost) no correlation
  between channels and std 4-9 levels (the reals': white, correlated, 0.8-3).

The traces are larger than the reals' sensor noise because the scenes' own pixel-level
texture is about ten times that noise; they are still hidden in it (see the tests for
statistics that do and do not tell them apart). In a leave-one-generator-out run over
``ALL_GENERATORS`` a held-out full-resolution family is not found by the missing high
frequencies, only by departing from what the reals have in common. ``FAMILY_KIND`` maps
each family to ``"upsampling"`` or ``"full_res"``.

Fakes are re-toned to the same luminance mean and standard deviation as drawn for a real
image, so a detector has to key on local pixel structure rather than global statistics.

The output is a CNNDetection-style folder::

    OUT/<split>/<generator>/0_real/real_000000.png
    OUT/<split>/<generator>/1_fake/fake_000000.png

Everything is deterministic by ``seed``: each image has its own generator seeded from
``(seed, split, label, index)``, and PNG/JPEG files carry no metadata, so equal arguments
give byte-identical files.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "ALL_GENERATORS",
    "FAMILY_KIND",
    "FULL_RES_GENERATORS",
    "GENERATORS",
    "make_synthetic",
    "render_fake",
    "render_real",
]

#: Upsampling generator families, in the default order used for the generator folders
#: (the default of ``make_synthetic(generators=...)``).
GENERATORS: tuple[str, ...] = ("tconv", "nnconv", "bilinear_conv")

#: Full-resolution generator families (selectable, not in the default set): rendered at
#: full resolution like the reals (their high-frequency power matches the reals'), each
#: differs from the reals by a faint trace of its own.
FULL_RES_GENERATORS: tuple[str, ...] = ("fingerprint", "noise_shape")

#: Every known family: ``make_synthetic(generators=...)`` accepts any subset, in any order.
ALL_GENERATORS: tuple[str, ...] = GENERATORS + FULL_RES_GENERATORS

#: Family -> kind: ``"upsampling"`` (rendered at low resolution, then upsampled) or
#: ``"full_res"`` (rendered at full resolution with full-resolution noise).
FAMILY_KIND: dict[str, str] = {
    **{g: "upsampling" for g in GENERATORS},
    **{g: "full_res" for g in FULL_RES_GENERATORS},
}

_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "jpg": ("JPEG", "jpg")}
_DEFAULT_SPLITS = {"train": 0.6, "val": 0.1, "test": 0.3}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------- scene


def _draw_scene(rng: np.random.Generator) -> dict:
    """Resolution-independent scene parameters (lengths in full-resolution pixels or
    fractions of the image)."""
    alpha = rng.uniform(1.5, 2.5)
    p: dict = {
        # power spectrum ~ 1/f^alpha per channel (amplitude 1/f^(alpha/2))
        "alpha": alpha + rng.normal(0.0, 0.08, size=3),
        "chroma": rng.uniform(0.1, 0.35),  # strength of per-channel fields vs shared one
        "gains": 1.0 + rng.normal(0.0, 0.12, size=3),  # colour cast
        "cast": rng.normal(0.0, 0.25, size=3),
    }
    shapes = []
    for _ in range(int(rng.integers(2, 10))):
        shapes.append(
            {
                "rect": bool(rng.random() < 0.45),
                "cx": rng.uniform(-0.1, 1.1),
                "cy": rng.uniform(-0.1, 1.1),
                "rx": rng.uniform(0.04, 0.35),
                "ry": rng.uniform(0.04, 0.35),
                "theta": rng.uniform(0.0, math.pi),
                "soft": rng.uniform(0.6, 3.0),  # edge softness, full-res pixels
                "colour": (rng.normal(0.0, 1.0) + rng.normal(0.0, 0.4, size=3)) * 1.1,
                "keep": rng.uniform(0.1, 0.6),  # how much of the background texture shows
            }
        )
    p["shapes"] = shapes
    gratings = []
    for _ in range(int(rng.integers(0, 3))):
        gratings.append(
            {
                "freq": math.exp(rng.uniform(math.log(0.015), math.log(0.2))),  # cyc/px
                "theta": rng.uniform(0.0, math.pi),
                "phase": rng.uniform(0.0, 2 * math.pi),
                "amp": rng.uniform(0.1, 0.5),
                "cx": rng.uniform(0.0, 1.0),
                "cy": rng.uniform(0.0, 1.0),
                "r": rng.uniform(0.15, 0.6),
                "tint": 1.0 + rng.normal(0.0, 0.2, size=3),
            }
        )
    p["gratings"] = gratings
    p["light"] = rng.normal(0.0, 0.5, size=2)
    p["vignette"] = rng.uniform(0.0, 0.6)
    p["mean"] = rng.uniform(85.0, 170.0)  # target luminance mean (8-bit)
    p["std"] = rng.uniform(32.0, 60.0)  # target luminance std (8-bit)
    p["noise"] = rng.uniform(0.8, 3.0)  # sensor noise sigma (8-bit)
    p["noise_corr"] = rng.uniform(0.3, 0.8)
    return p


def _pink_fields(p: dict, rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """(3, h, w) correlated-colour noise: three fields with power spectrum ~ 1/f^alpha_c
    (about unit variance), each channel = their normalised sum + ``chroma`` x its own.
    Drawn directly in the rfft domain (one inverse FFT per channel). ``scale`` = full-res
    pixels per pixel, so frequencies are in cycles per full-resolution pixel."""
    wr = w // 2 + 1
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None] / scale
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :] / scale
    f2 = fy * fy + fx * fx
    f2[0, 0] = 1.0
    logf = 0.5 * np.log(f2)
    # weight of each rfft bin in the full (Hermitian) spectrum
    wt = np.full((1, wr), 2.0, dtype=np.float32)
    wt[0, 0] = 1.0
    if w % 2 == 0:
        wt[0, -1] = 1.0

    def amp(alpha: float) -> np.ndarray:
        a = np.exp(-0.5 * alpha * logf)
        a[0, 0] = 0.0
        # E|X|^2 = 2|A|^2 for unit-variance real and imaginary parts;
        # var(x) = sum over the full spectrum of E|X|^2 / N^2
        norm = h * w / math.sqrt(2.0 * float((wt * a * a).sum()))
        return (a * np.float32(norm)).astype(np.float32)

    # Uniform draws for the spectrum (several times cheaper than normals); every output
    # pixel sums many bins, so the fields are Gaussian all the same.
    u = rng.random((3, h, wr, 2), dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(math.sqrt(12.0))
    spec = np.empty((3, h, wr), dtype=np.complex64)
    spec.real = u[..., 0]
    spec.imag = u[..., 1]
    for i, a in enumerate(p["alpha"]):
        spec[i] *= amp(float(a))
    shared = spec.sum(axis=0) * np.float32(1.0 / math.sqrt(3.0))
    spec *= np.float32(p["chroma"])
    spec += shared
    return np.fft.irfft2(spec, s=(h, w)).astype(np.float32, copy=False)


def _tone(img: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Affine map of all channels so that the luminance has the given mean/std."""
    lum = _LUMA[0] * img[0] + _LUMA[1] * img[1] + _LUMA[2] * img[2]
    m, s = float(lum.mean()), float(lum.std())
    return (img - np.float32(m)) * np.float32(std / (s + 1e-6)) + np.float32(mean)


def _span(lo: float, hi: float, scale: int, n: int) -> slice:
    """Pixel index range (at ``scale``) whose centres fall in [lo, hi] full-res px."""
    a = max(int(math.floor(lo / scale - 0.5)), 0)
    b = min(int(math.ceil(hi / scale - 0.5)) + 1, n)
    return slice(a, max(a, b))


def _render_scene(
    p: dict, rng: np.random.Generator, H: int, W: int, scale: int, noise: bool = True
) -> np.ndarray:
    """Render scene ``p`` at (ceil(H/scale), ceil(W/scale)) in 8-bit units (float32,
    unclipped; sensor noise included unless ``noise`` is false, which draws none)."""
    h, w = -(-H // scale), -(-W // scale)
    img = _pink_fields(p, rng, h, w, scale)
    img *= p["gains"].astype(np.float32)[:, None, None]
    img += p["cast"].astype(np.float32)[:, None, None]

    # pixel centres in full-resolution pixel units
    ys_all = ((np.arange(h, dtype=np.float32) + 0.5) * scale)[:, None]
    xs_all = ((np.arange(w, dtype=np.float32) + 0.5) * scale)[None, :]
    dim = float(min(H, W))

    for g in p["gratings"]:
        if g["freq"] * scale > 0.4:  # above what the low-res generator can represent
            continue
        cx, cy, r = g["cx"] * W, g["cy"] * H, g["r"] * dim
        sy, sx = _span(cy - 3 * r, cy + 3 * r, scale, h), _span(cx - 3 * r, cx + 3 * r, scale, w)
        ys, xs = ys_all[sy], xs_all[:, sx]
        if ys.size == 0 or xs.size == 0:
            continue
        kx, ky = math.cos(g["theta"]), math.sin(g["theta"])
        wave = np.sin((2 * math.pi * g["freq"]) * (xs * kx + ys * ky) + g["phase"])
        win = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (r * r))
        img[:, sy, sx] += (g["amp"] * wave * win)[None] * g["tint"].astype(np.float32)[
            :, None, None
        ]

    for s in p["shapes"]:
        soft = max(s["soft"], 0.5 * scale)  # band-limit at low resolution
        rx, ry = s["rx"] * dim, s["ry"] * dim
        ct, st = math.cos(s["theta"]), math.sin(s["theta"])
        cx, cy = s["cx"] * W, s["cy"] * H
        if s["rect"]:
            ex, ey = rx * abs(ct) + ry * abs(st), rx * abs(st) + ry * abs(ct)
        else:
            ex, ey = math.hypot(rx * ct, ry * st), math.hypot(rx * st, ry * ct)
        # alpha < 4e-4 beyond this margin: crop the work to the shape's box
        m = 8.0 * soft * max(rx, ry) / min(rx, ry)
        sy = _span(cy - ey - m, cy + ey + m, scale, h)
        sx = _span(cx - ex - m, cx + ex + m, scale, w)
        dx, dy = xs_all[:, sx] - cx, ys_all[sy] - cy
        if dx.size == 0 or dy.size == 0:
            continue
        u = (dx * ct + dy * st) * (1.0 / rx)
        v = (dy * ct - dx * st) * (1.0 / ry)
        if s["rect"]:
            d = np.maximum(np.abs(u), np.abs(v))
        else:
            d = np.sqrt(u * u + v * v)
        t = (d - 1.0) * (min(rx, ry) / soft)
        a = (0.5 - 0.5 * np.tanh(0.5 * t))[None]
        sub = img[:, sy, sx]
        fill = s["colour"].astype(np.float32)[:, None, None] + s["keep"] * sub
        sub += a * (fill - sub)

    lx, ly = float(p["light"][0]), float(p["light"][1])
    light = lx * (xs_all / W - 0.5) + ly * (ys_all / H - 0.5)
    r2 = (xs_all / W - 0.5) ** 2 + (ys_all / H - 0.5) ** 2
    img += (light - np.float32(2.0 * p["vignette"]) * r2)[None]

    img = _tone(img, p["mean"], p["std"])
    if noise:
        img += _sensor_noise(p, rng, h, w)
    return img


def _sensor_noise(p: dict, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gaussian noise, std ``noise`` per channel, inter-channel correlation ``noise_corr``
    (n + g * mean_c(n), rescaled; three draws per pixel)."""
    return _mix_channels(p, rng.standard_normal((3, h, w), dtype=np.float32))


def _mix_channels(p: dict, n: np.ndarray) -> np.ndarray:
    """Give unit-variance, channel-independent noise n (3, h, w) the camera's channel
    correlation ``noise_corr`` and std ``noise`` (in place)."""
    q = p["noise_corr"] / (1.0 - p["noise_corr"])  # corr = q / (1 + q)
    g = math.sqrt(1.0 + 3.0 * q) - 1.0  # cov = (2g + g^2) / 3 = q
    n += np.float32(g / 3.0) * (n[0] + n[1] + n[2])
    n *= np.float32(p["noise"] / math.sqrt(1.0 + q))
    return n


# ---------------------------------------------------------------------- upsamplers


# Each family is "x2 linear upsampling, then a per-channel correlation with a random
# kernel", which is computed in polyphase form on the low-resolution grid: output phase
# (py, px) of out[2i+py, 2j+px] is a small correlation of the (edge-padded) input.
# An upsampler is given per output phase q as {d: w}: up[2i+q] = sum_d w * x[i+d].
_UPSAMPLERS = {
    "zeros": ({0: 1.0}, {}),  # zero insertion (transposed convolution)
    "nearest": ({0: 1.0}, {0: 1.0}),
    "bilinear": ({0: 0.75, -1: 0.25}, {0: 0.75, 1: 0.25}),  # align_corners=False
}


def _poly_up2(x: np.ndarray, up: str, k: np.ndarray, transposed: bool) -> np.ndarray:
    """x2 upsampling of x (C,h,w) by ``up`` followed by per-channel filtering with k
    (C,ks,ks); edge-replicated borders. With ``transposed`` the filter is applied as in
    ``conv_transpose2d(x, k, stride=2, padding=1, output_padding=4-ks, groups=C)``
    (out[o] = sum_a k[a] z[o+1-a]); otherwise as a 'same' correlation
    (out[o] = sum_a k[a] up[o+a-ks//2], i.e. ``conv2d(up, k, padding=ks//2)``)."""
    c, h, w = x.shape
    ks = k.shape[1]
    phases = _UPSAMPLERS[up]
    taps = [(1 - a) if transposed else (a - ks // 2) for a in range(ks)]
    pad = 3
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    out = np.empty((c, 2 * h, 2 * w), dtype=np.float32)

    def eff1d(p: int) -> dict[int, list[tuple[int, float]]]:
        """offset -> [(tap index, upsampler weight)] for output phase p (1-D)."""
        e: dict[int, list[tuple[int, float]]] = {}
        for a, t in enumerate(taps):
            m = p + t
            for d, wu in phases[m % 2].items():
                e.setdefault(m // 2 + d, []).append((a, wu))
        return e

    for py in range(2):
        ey = eff1d(py)
        for px in range(2):
            ex = eff1d(px)
            acc = np.zeros((c, h, w), dtype=np.float32)
            for oy, ly in ey.items():
                for ox, lx in ex.items():
                    wv = np.zeros(c, dtype=np.float32)
                    for a, wa in ly:
                        for b, wb in lx:
                            wv += k[:, a, b] * np.float32(wa * wb)
                    src = xp[:, pad + oy : pad + oy + h, pad + ox : pad + ox + w]
                    acc += wv[:, None, None] * src
            out[:, py::2, px::2] = acc
    return out


def _random_kernel(rng: np.random.Generator, size: int, total: float, eps: float) -> np.ndarray:
    """Three per-channel kernels: a smooth (bilinear-like) base plus a random
    perturbation of relative size ``eps``, normalised to sum ``total``."""
    taps = {3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}[size]
    base = np.outer(taps, taps)
    base = base / base.sum()
    k = base[None] + eps * base.mean() * rng.standard_normal((3, size, size))
    k = k / k.sum(axis=(1, 2), keepdims=True) * total
    return k.astype(np.float32)


def _upsample(
    x: np.ndarray, family: str, stages: int, rng: np.random.Generator, noise: float
) -> np.ndarray:
    """Upsample x (C,h,w), in [0,1] units, by 2**stages with a random generator of
    ``family``; ``noise`` is the std of the per-stage noise injection (StyleGAN-like)."""
    for _ in range(stages):
        if family == "tconv":
            eps = rng.uniform(0.02, 0.08)
            k = _random_kernel(rng, int(rng.choice([3, 4])), 4.0, eps)
            x = _poly_up2(x, "zeros", k, transposed=True)
        elif family == "nnconv":
            eps = rng.uniform(0.2, 0.6)
            x = _poly_up2(x, "nearest", _random_kernel(rng, 3, 1.0, eps), transposed=False)
        elif family == "bilinear_conv":
            eps = rng.uniform(0.2, 0.6)
            x = _poly_up2(x, "bilinear", _random_kernel(rng, 3, 1.0, eps), transposed=False)
        else:  # pragma: no cover - validated by the callers
            raise ValueError(f"unknown generator family {family!r}")
        # noise injection, bias and a mild nonlinearity, as between generator layers
        # (uniform noise of matching std: a few times cheaper to draw than normals)
        inj = rng.random(x.shape, dtype=np.float32)
        inj -= np.float32(0.5)
        inj *= np.float32(noise * rng.uniform(0.3, 1.0) * math.sqrt(12.0))
        x += inj
        bias = rng.normal(0.0, 0.02, size=(3, 1, 1)).astype(np.float32)
        gamma = np.float32(rng.uniform(-0.3, 0.3))
        np.subtract(x, np.float32(0.5), out=inj)
        inj *= inj
        inj *= gamma
        x += inj
        x += bias
    return x


# ------------------------------------------------------------- full-resolution fakes


# Trace strengths of the full-resolution families, in 8-bit levels. Above the reals'
# sensor noise (std 0.8-3) on purpose: the scenes' own pixel-level texture is ~10x that
# (high-pass residual std ~10-30), and at the sensor-noise level a small CNN does not
# pick either trace up in a short training.
_FP_AMP = (4.0, 10.0)  # std of the fingerprint pattern
_NS_SIGMA = (4.0, 9.0)  # std of the decoder noise, per channel


def _render_fingerprint(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """``fingerprint``: a full-resolution scene with the reals' camera noise plus a
    periodic residual, like the spectral fingerprint of a GAN generator: a random zero-mean
    tile (3 x py x px, periods 4-16 px drawn per axis and image, square half of the time,
    partly correlated across channels) repeated over the image at a random offset, with
    std ``_FP_AMP`` levels per channel."""
    img = _render_scene(p, rng, H, W, 1)
    py, px = int(rng.integers(4, 17)), int(rng.integers(4, 17))
    if rng.random() < 0.5:
        px = py  # square tiles half of the time
    amp = rng.uniform(*_FP_AMP)
    tile = rng.standard_normal((3, py, px)).astype(np.float32)
    tile += np.float32(rng.uniform(0.0, 2.0)) * tile.mean(axis=0)  # some channel correlation
    tile -= tile.mean(axis=(1, 2), keepdims=True)
    tile *= np.float32(amp / (tile.std(axis=(1, 2)).mean() + 1e-6))
    oy, ox = int(rng.integers(0, py)), int(rng.integers(0, px))
    reps = (1, -(-(H + oy) // py), -(-(W + ox) // px))
    img += np.tile(tile, reps)[:, oy : oy + H, ox : ox + W]
    return _tone(img, p["mean"], p["std"])


def _render_noise_shape(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """``noise_shape``: a full-resolution scene whose noise is not camera-like, as in the
    output of a decoder (VAE / diffusion): instead of the reals' white noise (std 0.8-3,
    inter-channel correlation 0.3-0.8) it has std ``_NS_SIGMA`` levels, (almost) no
    inter-channel correlation (0-0.15) and is spatially coloured: white noise filtered by
    a separable 3-tap kernel [b, 1, b] per axis, b = +-(0.2-0.5) drawn per axis (low-pass,
    high-pass or oriented grain), renormalised to unit variance."""
    img = _render_scene(p, rng, H, W, 1, noise=False)
    n = rng.standard_normal((3, H + 2, W + 2), dtype=np.float32)
    by, bx = (float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.5)) for _ in range(2))
    n = n[:, 1:-1, :] + np.float32(by) * (n[:, :-2, :] + n[:, 2:, :])
    n = n[:, :, 1:-1] + np.float32(bx) * (n[:, :, :-2] + n[:, :, 2:])
    n *= np.float32(1.0 / math.sqrt((1.0 + 2.0 * by * by) * (1.0 + 2.0 * bx * bx)))
    q = {"noise": rng.uniform(*_NS_SIGMA), "noise_corr": rng.uniform(0.0, 0.15)}
    img += _mix_channels(q, n)
    return _tone(img, p["mean"], p["std"])


_FULL_RES_RENDER = {
    "fingerprint": _render_fingerprint,
    "noise_shape": _render_noise_shape,
}


# ------------------------------------------------------------------------ renderers


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def render_real(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One "real" image as a (height, width, 3) uint8 array."""
    p = _draw_scene(rng)
    return _to_uint8(_render_scene(p, rng, height, width, 1))


def render_fake(
    rng: np.random.Generator, width: int, height: int, family: str
) -> np.ndarray:
    """One "fake" image of ``family`` (any of ``ALL_GENERATORS``) as a (height, width, 3)
    uint8 array."""
    if family not in ALL_GENERATORS:
        raise ValueError(f"unknown generator family {family!r}; known: {ALL_GENERATORS}")
    p = _draw_scene(rng)
    if family in _FULL_RES_RENDER:
        return _to_uint8(_FULL_RES_RENDER[family](p, rng, height, width))
    stages = 2 if (min(width, height) >= 32 and rng.random() < 0.5) else 1
    low = _render_scene(p, rng, height, width, 2**stages)
    up = _upsample(low * np.float32(1 / 255), family, stages, rng, p["noise"] / 255.0)
    up *= np.float32(255.0)
    up = _tone(up[:, :height, :width], p["mean"], p["std"])
    return _to_uint8(up)


# -------------------------------------------------------------------------- dataset


def _split_counts(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of n items to the splits (ties: split order)."""
    names = list(splits)
    raw = [n * splits[s] for s in names]
    counts = [int(math.floor(r + 1e-9)) for r in raw]
    left = n - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: max(left, 0)]:
        counts[i] += 1
    return dict(zip(names, counts))


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    ss = np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8")), label, index])
    return np.random.default_rng(ss)


def _validate(n_real, n_fake, size, seed, image_format, jpeg_quality, splits, generators):
    for name, n in (("n_real", n_real), ("n_fake", n_fake)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        width = height = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size
    ):
        width, height = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an int or a (width, height) pair, got {size!r}")
    if width < 8 or height < 8:
        raise ValueError(f"size must be >= 8 pixels per side, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    fmt = str(image_format).lower() if isinstance(image_format, str) else None
    if fmt not in _FORMATS:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer)) or not (
        1 <= jpeg_quality <= 100
    ):
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")
    if not isinstance(splits, dict) or not splits:
        raise ValueError("splits must be a non-empty dict of split name -> fraction")
    for name, frac in splits.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"bad split name {name!r}")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not frac > 0:
            raise ValueError(f"split fraction for {name!r} must be > 0, got {frac!r}")
    total = float(sum(splits.values()))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total}")
    if isinstance(generators, str):
        raise ValueError("generators must be a sequence of names, not a string")
    gens = list(generators)
    if not gens:
        raise ValueError("generators must not be empty")
    unknown = [g for g in gens if g not in ALL_GENERATORS]
    if unknown:
        raise ValueError(f"unknown generators {unknown}; known: {ALL_GENERATORS}")
    if len(set(gens)) != len(gens):
        raise ValueError(f"duplicate generators in {gens}")
    return width, height, fmt, gens


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def make_synthetic(
    out: str | Path,
    *,
    n_real: int,
    n_fake: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    image_format: str = "png",
    jpeg_quality: int = 95,
    splits: dict[str, float] | None = None,
    generators: Sequence[str] = GENERATORS,
    workers: int | None = None,
) -> list[dict]:
    """Write a procedural real/fake image set in CNNDetection layout under ``out``.

    ``n_real`` / ``n_fake`` images are divided over ``splits`` (default train 0.6, val
    0.1, test 0.3; largest-remainder rounding). Fakes cycle through ``generators`` (any
    of ``ALL_GENERATORS``, in any order; default the upsampling ``GENERATORS``) and
    reals are spread evenly over the same generator folders, as in CNNDetection's
    per-generator folders; the cycle runs on across splits, so ``n_fake >=
    len(generators)`` gives every family. ``size`` is an int (square) or ``(width,
    height)``; ``image_format`` is ``"png"`` or ``"jpeg"`` (``.jpg``, 4:2:0,
    ``jpeg_quality``). ``workers`` threads render and encode (default: usable CPUs, at
    most 8); the files do not depend on it. Files of the same names are overwritten;
    nothing else under ``out`` is touched.

    Returns one record per file, ordered by split, generator folder, label, index::

        {"uri": "/abs/OUT/test/tconv/1_fake/fake_000003.png", "label": 1,
         "generator": "tconv", "split": "test", "source": "tconv", "family": "upsampling"}

    ``source`` is what made the image (``"real"`` for reals); ``family`` is the generator
    folder's kind (``FAMILY_KIND``), the same for its reals and fakes, as the manifest's
    ``family`` column groups generators. This is test data, not a benchmark of real-world
    accuracy.
    """
    if splits is None:
        splits = dict(_DEFAULT_SPLITS)
    width, height, fmt, gens = _validate(
        n_real, n_fake, size, seed, image_format, jpeg_quality, splits, generators
    )
    if workers is None:
        workers = _default_workers()
    elif isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    pil_format, ext = _FORMATS[fmt]
    if pil_format == "PNG":
        save_kw: dict = {"format": "PNG", "compress_level": 6, "optimize": False}
    else:
        save_kw = {
            "format": "JPEG",
            "quality": int(jpeg_quality),
            "subsampling": "4:2:0",
            "optimize": False,
            "progressive": False,
        }
    root = Path(out).expanduser().resolve()
    seed = int(seed)
    counts = {0: _split_counts(int(n_real), splits), 1: _split_counts(int(n_fake), splits)}

    # (split, generator folder, label, index, path); the generator cycle runs on across
    # splits so that small sets still cover every family
    jobs: list[tuple[str, str, int, int, Path]] = []
    offset = {0: 0, 1: 0}
    for split in splits:
        per_gen: dict[str, list] = {g: [] for g in gens}
        for label in (0, 1):
            kind = "real" if label == 0 else "fake"
            for i in range(counts[label][split]):
                gen = gens[(offset[label] + i) % len(gens)]
                path = root / split / gen / f"{label}_{kind}" / f"{kind}_{i:06d}.{ext}"
                per_gen[gen].append((split, gen, label, i, path))
            offset[label] += counts[label][split]
        for g in gens:
            jobs.extend(per_gen[g])
    for folder in sorted({job[4].parent for job in jobs}):
        folder.mkdir(parents=True, exist_ok=True)

    def work(job: tuple[str, str, int, int, Path]) -> None:
        split, gen, label, i, path = job
        rng = _image_rng(seed, split, label, i)
        if label == 0:
            arr = render_real(rng, width, height)
        else:
            arr = render_fake(rng, width, height, gen)
        Image.fromarray(arr).save(path, **save_kw)

    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            work(job)
    else:
        # numpy (FFT, ufuncs, RNG fills) and PIL encoders release the GIL
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:
            for _ in pool.map(work, jobs):
                pass

    return [
        {
            "uri": str(path),
            "label": label,
            "generator": gen,
            "split": split,
            "source": "real" if label == 0 else gen,
            "family": FAMILY_KIND[gen],
        }
        for split, gen, label, _, path in jobs
    ]
