"""Decoded Pillow images of any mode -> ``(H, W, 3)`` uint8 RGB, a block of rows at a time
(the mode rules are ``ntf_ray.images.decode``'s docstring), and the decode's deadline."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Pixels leave Pillow a block of rows (about this many pixels) at a time, converted and
# composited block by block, so the temporaries stay a few MB at any image size: the only
# full-size buffers are Pillow's decoded frame and the result. (Whole-image numpy work on
# a 5000x5000 RGBA PNG held about 620 MiB at once.)
_BLOCK_PIXELS = 1 << 20


class BadSamples(Exception):
    """Samples no display mapping fits (the message is the reason)."""


class TooSlow(Exception):
    """The decode's deadline passed."""


def check_deadline(deadline: float | None) -> None:
    """Raise ``TooSlow`` once ``time.monotonic()`` is past ``deadline`` (None: never)."""
    if deadline is not None and time.monotonic() > deadline:
        raise TooSlow


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def to_rgb_array(im: Image.Image, deadline: float | None = None) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``(H, W, 3)`` uint8 RGB (see module doc)."""
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit greyscale: numpy honours the byte order in the array interface.
        return _gray_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "I":
        return _gray_to_rgb(_scale_int32(np.asarray(im)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(im)))
    if _has_transparency(im):
        try:
            return _composite_on_white(im, deadline)
        except (ValueError, TypeError, KeyError):
            # A malformed transparency key (convert("RGBA") refuses it) should not lose the
            # image: ignore it.
            if mode in _ALPHA_MODES:
                raise
    # A fresh array, not np.asarray(im) (read-only: it wraps tobytes()), so downstream code
    # (e.g. torch.from_numpy) gets a writeable, contiguous array.
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    for rows, rgb in _row_blocks(im, "RGB", deadline):
        out[rows] = rgb
    return out


def _row_blocks(im: Image.Image, mode: str, deadline: float | None = None):
    """Yield ``(rows, pixels)``: a ``slice`` of ``im``'s rows and those rows converted to
    ``mode`` as a ``(len(rows), W, C)`` uint8 array, about ``_BLOCK_PIXELS`` at a time.

    Converting a crop gives the same pixels as cropping the converted image: every
    conversion used here (to RGB or RGBA, palette and transparency key included, since a
    crop keeps both) maps each pixel on its own.
    """
    width, height = im.size
    step = max(1, _BLOCK_PIXELS // width)
    for top in range(0, height, step):
        check_deadline(deadline)
        bottom = min(height, top + step)
        block = im if step >= height else im.crop((0, top, width, bottom))
        if block.mode != mode:
            block = block.convert(mode)
        yield slice(top, bottom), np.asarray(block)


def _composite_on_white(im: Image.Image, deadline: float | None = None) -> np.ndarray:
    """An image with transparency -> ``(H, W, 3)`` uint8 RGB over a white background.

    ``out = (rgb * a + 255 * (255 - a) + 127) // 255`` per pixel, in uint16 and in place,
    one block of rows at a time (so no full-size temporaries).
    """
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    for rows, rgba in _row_blocks(im, "RGBA", deadline):
        alpha = rgba[..., 3:]
        if alpha.min() == 255:
            out[rows] = rgba[..., :3]
            continue
        mixed = rgba[..., :3].astype(np.uint16)
        background = alpha.astype(np.uint16)
        # rgb*a + 255*(255-a) <= 255*255, so uint16 cannot overflow; +127 rounds.
        mixed *= background
        np.subtract(255, background, out=background)
        background *= 255
        mixed += background
        mixed += 127
        mixed //= 255
        out[rows] = mixed
    return out


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as ``round(v * 255 / 65535)`` (integer arithmetic, no clipping)."""
    v = values.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _scale_int32(values: np.ndarray) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadSamples(
            "32-bit integer samples outside 0..65535 "
            f"(min {int(values.min())}, max {int(values.max())})"
        )
    return _scale_16bit(values)


def _scale_float(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return values.astype(np.uint8)
    if not np.isfinite(values).all():
        raise BadSamples("float samples are not finite (NaN or inf)")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        raise BadSamples(f"float samples outside [0, 65535] (min {lo:g})")
    if hi <= 1.0:
        scaled = values * np.float32(255.0)
    elif hi <= 255.0:
        scaled = values
    elif hi <= 65535.0:
        scaled = values / np.float32(257.0)
    else:
        raise BadSamples(f"float samples outside [0, 65535] (max {hi:g})")
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(H, W, 3)`` uint8, C-contiguous."""
    return np.repeat(gray[:, :, None], 3, axis=2)
