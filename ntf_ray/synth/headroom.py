"""Headroom families: fakes that depart from the reals' statistics in a direction no
training family takes (``bench/quality.py --headroom``).

The five training families either lack the reals' finest detail (the upsamplers) or add
something faint to it (``fingerprint``: a periodic pattern; ``noise_shape``: coloured noise,
uncorrelated between channels). A detector trained on them learns "smoother than real, or
carrying an added pattern" and can call a fake that goes the other way more real than the
reals. Each family here is one such way, rendered at full resolution from the reals' own
scenes and camera noise, then re-toned to the reals' luminance mean and spread:

* ``sharpened``: unsharp masking (Gaussian radius 0.7-1.4 px, amount 1.5-3): more
  high-frequency energy than any real, edges with halos, the camera noise amplified with its
  channel correlation kept;
* ``saturated``: the chroma (each channel's difference from the luma) scaled by 2.5-4:
  colours no camera records from these scenes, the luma untouched;
* ``impulse``: 0.5-2% of the pixels replaced by a random colour (dead, hot and stuck
  pixels, sparse and uncorrelated with the scene);
* ``halo``: local-contrast enhancement (unsharp masking at radius 4-8 px, amount 1-2), the
  over-processed "HDR" look: wide halos, the finest detail as the reals';
* ``fringe``: the red and blue channels shifted 1-2 px against the green in opposite
  directions (a random axis): colour fringes on every edge, far beyond a lens's;
* ``clipped``: the contrast stretched 2-3x about the mean and clipped: flat, noiseless
  highlights and shadows over a quarter of the image or more.

None of these is in ``ALL_GENERATORS`` (the default data and ``--generators all`` stay as
they were): ``make_synthetic(generators=...)`` takes them by name.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ntf_ray.synth.scene import _LUMA, _render_scene, _tone

HEADROOM_GENERATORS: tuple[str, ...] = ("sharpened", "saturated", "impulse", "halo", "fringe", "clipped")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(img, sigma=(0.0, sigma, sigma), mode="reflect").astype(np.float32)


def _unsharp(p: dict, rng: np.random.Generator, H: int, W: int, amounts: tuple, radii: tuple) -> np.ndarray:
    """The scene with unsharp masking: ``img + amount * (img - blur(img, radius))``, re-toned."""
    img = _render_scene(p, rng, H, W, 1)
    amount = np.float32(rng.uniform(*amounts))
    img = img + amount * (img - _blur(img, float(rng.uniform(*radii))))
    return _tone(img, p["mean"], p["std"])


def _render_sharpened(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    return _unsharp(p, rng, H, W, (1.5, 3.0), (0.7, 1.4))


def _render_saturated(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    img = _render_scene(p, rng, H, W, 1)
    luma = np.tensordot(_LUMA, img, axes=1)[None]
    img = luma + np.float32(rng.uniform(2.5, 4.0)) * (img - luma)
    return _tone(img, p["mean"], p["std"])


def _render_impulse(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    img = _tone(_render_scene(p, rng, H, W, 1), p["mean"], p["std"])
    hit = rng.random((H, W)) < rng.uniform(0.005, 0.02)
    img[:, hit] = rng.uniform(0.0, 255.0, (3, int(hit.sum()))).astype(np.float32)
    return img


def _render_halo(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    return _unsharp(p, rng, H, W, (1.0, 2.0), (4.0, 8.0))


def _render_fringe(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    img = _render_scene(p, rng, H, W, 1)
    shift, axis = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    img[0] = np.roll(img[0], shift, axis=axis - 1)
    img[2] = np.roll(img[2], -shift, axis=axis - 1)
    return _tone(img, p["mean"], p["std"])


def _render_clipped(p: dict, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    img = _tone(_render_scene(p, rng, H, W, 1), p["mean"], p["std"])
    mean = np.float32(p["mean"])
    return mean + np.float32(rng.uniform(2.0, 3.0)) * (img - mean)  # clipped to 0..255 when stored


HEADROOM_RENDER = {
    "sharpened": _render_sharpened,
    "saturated": _render_saturated,
    "impulse": _render_impulse,
    "halo": _render_halo,
    "fringe": _render_fringe,
    "clipped": _render_clipped,
}
