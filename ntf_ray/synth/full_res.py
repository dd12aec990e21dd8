"""The full-resolution families (``fingerprint``, ``noise_shape``): scenes rendered at full
resolution like the reals, each with one trace of its own."""

from __future__ import annotations

import math

import numpy as np

from ntf_ray.synth.scene import _mix_channels, _render_scene, _tone

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
