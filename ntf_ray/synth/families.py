"""The generator families (names and kinds) and one image of each label: ``render_real``
and ``render_fake``."""

from __future__ import annotations

import numpy as np

from ntf_ray.synth.full_res import _FULL_RES_RENDER
from ntf_ray.synth.headroom import HEADROOM_GENERATORS, HEADROOM_RENDER
from ntf_ray.synth.scene import _draw_scene, _render_scene, _tone
from ntf_ray.synth.upsampling import _upsample

#: Upsampling generator families, in the default order used for the generator folders
#: (the default of ``make_synthetic(generators=...)``).
GENERATORS: tuple[str, ...] = ("tconv", "nnconv", "bilinear_conv")

#: Full-resolution generator families (selectable, not in the default set): rendered at
#: full resolution like the reals (their high-frequency power matches the reals'), each
#: differs from the reals by a faint trace of its own.
FULL_RES_GENERATORS: tuple[str, ...] = ("fingerprint", "noise_shape")

#: Every known family: ``make_synthetic(generators=...)`` accepts any subset, in any order.
ALL_GENERATORS: tuple[str, ...] = GENERATORS + FULL_RES_GENERATORS

#: Every family ``make_synthetic`` renders: the above and the headroom families
#: (``ntf_ray.synth.headroom``: departures no training family takes, for held-out tests only).
KNOWN_GENERATORS: tuple[str, ...] = ALL_GENERATORS + HEADROOM_GENERATORS

#: Family -> kind: ``"upsampling"`` (rendered at low resolution, then upsampled),
#: ``"full_res"`` (rendered at full resolution with full-resolution noise) or ``"headroom"``.
FAMILY_KIND: dict[str, str] = {
    **{g: "upsampling" for g in GENERATORS},
    **{g: "full_res" for g in FULL_RES_GENERATORS},
    **{g: "headroom" for g in HEADROOM_GENERATORS},
}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def render_real(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One "real" image as a (height, width, 3) uint8 array."""
    p = _draw_scene(rng)
    return _to_uint8(_render_scene(p, rng, height, width, 1))


def render_fake(
    rng: np.random.Generator, width: int, height: int, family: str
) -> np.ndarray:
    """One "fake" image of ``family`` (any of ``KNOWN_GENERATORS``) as a (height, width, 3)
    uint8 array."""
    if family not in KNOWN_GENERATORS:
        raise ValueError(f"unknown generator family {family!r}; known: {KNOWN_GENERATORS}")
    p = _draw_scene(rng)
    if family in _FULL_RES_RENDER:
        return _to_uint8(_FULL_RES_RENDER[family](p, rng, height, width))
    if family in HEADROOM_RENDER:
        return _to_uint8(HEADROOM_RENDER[family](p, rng, height, width))
    stages = 2 if (min(width, height) >= 32 and rng.random() < 0.5) else 1
    low = _render_scene(p, rng, height, width, 2**stages)
    up = _upsample(low * np.float32(1 / 255), family, stages, rng, p["noise"] / 255.0)
    up *= np.float32(255.0)
    up = _tone(up[:, :height, :width], p["mean"], p["std"])
    return _to_uint8(up)
