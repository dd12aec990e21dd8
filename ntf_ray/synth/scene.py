"""The scene of every image: drawn parameters, correlated 1/f^alpha colour fields, shapes,
gratings and lighting rendered at any scale, camera-like sensor noise and the tone mapping
to a target luminance mean and std."""

from __future__ import annotations

import math

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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
