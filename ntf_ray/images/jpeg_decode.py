"""JPEGs through libjpeg-turbo with its warnings as errors (``simplejpeg``).

Pillow's JPEG plugin ignores libjpeg's warnings, so a file cut short and given an
end-of-image marker decodes there with grey rows. Here a plain JPEG (baseline or
progressive, 8-bit, grey or YCbCr, any EXIF orientation: ``jpeg_screen``) is decoded by the
same libjpeg-turbo with the same settings as Pillow (accurate DCT, fancy upsampling), so the
pixels are Pillow's (a test compares them); any other JPEG is only checked here for data
that ends early, then decoded by Pillow.
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from ntf_ray.errors import DECODE, TOO_LARGE, error
from ntf_ray.images.jpeg_screen import MAX_SCANS, count_scans, screen
from ntf_ray.images.jpeg_window import centre_window

#: EXIF orientation -> the turn that shows the image upright, on an ``(H, W, C)`` array: the
#: same as Pillow's transposes in ``ImageOps.exif_transpose`` (a test compares them).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


def decode_jpeg(buf, limit: int | None, window: int | None = None) -> tuple[np.ndarray | None, str | None, tuple[int, int] | None]:
    """``(None, "too_large: ...")`` for a JPEG of more than ``MAX_SCANS`` scans (its markers are
    walked once, here); ``(pixels, None)`` for a plain JPEG (baseline or progressive, grey or YCbCr, any EXIF
    orientation) decoded by libjpeg-turbo with warnings as errors; ``(None, reason)`` when it
    ends early (``decode: truncated image``); ``(None, None)``: Pillow decodes it. The third
    value is the upright image's ``(width, height)`` when ``pixels`` is only its window (below),
    else None.

    ``window``: the caller keeps only the centre ``window x window`` square of the upright
    image; where ``jpeg_window`` can decode just that region, ``pixels`` is that square (the
    same pixels as the whole frame's centre), else the whole frame as above.

    Pillow's JPEG plugin runs the same libjpeg-turbo with the same settings (accurate DCT,
    fancy upsampling), so the pixels are Pillow's (a test compares them); it ignores
    libjpeg's warnings, and a file cut short then given an end-of-image marker decodes
    with grey rows. Any other warning (extraneous bytes, a restart marker out of place)
    leaves the file to Pillow, as before.
    """
    found = screen(buf, max_pixels=limit, allow_orientation=True)
    if (found.scans if found.scans is not None else count_scans(buf)) > MAX_SCANS:
        return None, error(TOO_LARGE, f"more than {MAX_SCANS} scans (a JPEG decodes its whole image once per scan)"), None
    if not found.gpu:
        return None, (error(DECODE, "truncated image") if ends_early(buf) else None), None
    turn = _ORIENT.get(found.orientation)
    if window is not None:
        pixels = centre_window(buf, found, window, turn)
        if pixels is not None:
            turned = found.orientation in (5, 6, 7, 8)
            return pixels, None, ((found.height, found.width) if turned else (found.width, found.height))
    try:
        pixels = simplejpeg.decode_jpeg(buf, colorspace="RGB", strict=True)
    except ValueError as exc:
        return None, (error(DECODE, "truncated image") if "premature end" in str(exc).lower() else None), None
    return (pixels if turn is None else np.ascontiguousarray(turn(pixels))), None, None


def ends_early(buf) -> bool:
    """Whether libjpeg-turbo finds the JPEG's data ending before its image does."""
    for space in ("RGB", "CMYK"):  # CMYK and YCCK files do not convert to RGB in libjpeg
        try:
            simplejpeg.decode_jpeg(buf, colorspace=space, fastdct=True, fastupsample=True, strict=True)
            return False
        except ValueError as exc:
            message = str(exc).lower()
            if "premature end" in message:
                return True
            if "color" not in message:  # another warning, or a file libjpeg-turbo cannot read: Pillow decides
                return False
    return False
