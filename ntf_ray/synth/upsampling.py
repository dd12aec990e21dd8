"""The upsampling families (``tconv``, ``nnconv``, ``bilinear_conv``): polyphase x2
upsamplers with random kernels, stacked in one or two stages with noise injection, a bias
and a mild nonlinearity between them."""

from __future__ import annotations

import math

import numpy as np

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
