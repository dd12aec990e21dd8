"""Decode untrusted image bytes into full-resolution RGB ``uint8`` arrays.

This is the only place in ``ntf_ray`` that turns file bytes into pixels. It is pure
Python + Pillow + numpy (no Ray) so it can run anywhere: in a Ray Data ``map_batches``
worker, in a DataLoader, or in a unit test.

Design rules (the detector keys on pixel-level traces, and the input is a crawl):

* **Never raises for bad data.** Every failure becomes a :class:`Decoded` with
  ``image=None`` and a short one-line ``error`` whose prefix says the kind:

  - ``"decode: empty file"``: zero bytes;
  - ``"unsupported_format: <NAME>"``: a format this module does not open on purpose
    (only :data:`ntf_ray.images.formats.FORMATS` are decoded): one that another Pillow plugin recognises from
    its first bytes (``EPS``, ``PPM``, ``PSD``, ``JPEG2000``, ...), or ``SVG``, ``PDF``,
    ``HEIC`` / ``HEIF`` / ``AVIF``; ``format`` holds the name. Final: the same bytes
    always get the same answer. No other plugin ever opens or loads the bytes (EPS
    would hand them to Ghostscript, an interpreter);
  - ``"decode: not an image"``: not recognised as any image format;
  - ``"decode: truncated image"``: the data ends early (never silently padded:
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set);
  - ``"decode: <short message>"``: any other decoder error (corrupt data, unsupported
    mode, ...), with memory addresses scrubbed so equal failures read the same;
  - ``"too_large: <W>x<H> = <N> px > limit <M>"``: the header declares more pixels
    than ``max_pixels`` (a decompression bomb or just a huge scan); nothing is
    allocated for the pixels.

  Only programmer errors raise: a wrong ``data`` / ``max_pixels`` type (``TypeError``)
  or a non-positive ``max_pixels`` (``ValueError``).
* **Full resolution, no shortcuts.** No ``draft()`` (JPEG DCT-domain downscaling), no
  ``reduce``, no resizing: the array holds exactly the decoded pixels.
* **EXIF orientation is applied**, with the same orientation -> transpose table as
  :func:`PIL.ImageOps.exif_transpose`; ``width``/``height`` are after the transpose.
* **No colour management.** ICC profiles are ignored; values are Pillow's conversion
  of the stored samples.
* **Bounded memory.** Pixels leave Pillow a block of rows at a time (converted and
  composited per block), so besides Pillow's decoded frame the result is the only
  full-size buffer (16-bit, ``I`` and ``F`` greyscale excepted: their scaling reads the
  whole image).

Mode handling (all results are ``(H, W, 3)`` ``uint8`` RGB, C-contiguous, writeable):

* ``RGB`` as is; ``1``, ``L``, ``P``, ``CMYK`` (including Adobe-inverted CMYK and YCCK
  JPEGs, which Pillow/libjpeg hand over as CMYK), ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``
  ... via ``Image.convert("RGB")``.
* Anything with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, or a ``P`` / ``L`` /
  ``RGB`` / ``1`` image with a ``transparency`` key) is **alpha-composited onto a white
  background**: ``out = (rgb * a + 255 * (255 - a)) / 255``, rounded. White (not black)
  because that is how browsers and viewers show transparent PNG/GIF/WebP on a page, so
  the result matches what a person sees; fully opaque images are unchanged.
* 16-bit greyscale (``I;16``, ``I;16B``, ...): scaled, not clipped,
  ``v8 = round(v16 * 255 / 65535)`` (so 32768 -> 128). 16-bit RGB(A) PNG/TIFF: Pillow
  itself keeps the high byte (``v >> 8``), within 1 of the same scaling.
* 32-bit integer ``I``: Pillow uses it for >8-bit greyscale (e.g. some TIFFs); samples in
  0..65535 are treated as 16-bit and scaled as above, anything else is a decode error.
* 32-bit float ``F``: finite samples in [0, 1] -> ``round(v * 255)``; in [0, 255] ->
  ``round(v)``; in [0, 65535] -> ``round(v / 257)``; negative / non-finite / larger
  values are a decode error (there is no sensible display mapping).
* Multi-frame files (GIF, APNG, animated WebP, multi-page TIFF, MPO): the first frame.

Bounded work. Besides the pixel limit below, every declared size is checked before any
decoder allocates for it: a TIFF's tiles and strips (at most the image's own pixels, or
16 Mpx, and never over ``max_pixels``), an ICO's embedded images (an ICO's directory may
say 16 x 16 over a 12000 x 12000 PNG; its plugin decodes that inside ``Image.open``, so the
embedded headers are read first), and a JPEG's progressive scans (at most
:data:`ntf_ray.images.jpeg_screen.MAX_SCANS`, ``too_large: ...``). A truncated JPEG is an error
however it ends: one cut short and given an end-of-image marker decodes with grey rows in
Pillow (libjpeg only warns), so JPEGs go through libjpeg-turbo with warnings as errors
(``simplejpeg``; plain files are decoded there, with the same pixels as Pillow's; others
are checked there, then decoded by Pillow). And ``deadline_s`` (default
:data:`DEFAULT_DEADLINE_S`) bounds the time one decode may take: it is checked each time
the decoder asks for more input and between blocks of rows, and ``decode: too slow ...``
is the result when it passes.

Decompression bombs. ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) is compared with
the header's ``width * height`` right after ``Image.open`` (which reads the header only)
and before ``load()``, so a bomb is never allocated. ``max_pixels=None`` disables this
check. Pillow has its own process-global guard, ``PIL.Image.MAX_IMAGE_PIXELS``: above it
Pillow warns (``DecompressionBombWarning``), above twice it ``Image.open`` raises
``DecompressionBombError``. This module never changes that global (doing so per call is
not thread-safe). Instead, when Pillow refuses at open time, the header is re-read through
the same plugin Pillow picked but without Pillow's check, and ``max_pixels`` decides:

* over ``max_pixels`` -> ``too_large: ...`` with the real size, nothing allocated;
* within ``max_pixels`` (or ``None``) -> decoded normally, so a ``max_pixels`` above
  Pillow's limit works for formats whose plugin leaves the check to ``Image.open``
  (JPEG, PNG, BMP, and GIF unless frames grow the canvas).
  Some plugins check Pillow's global themselves, while opening (WebP) or loading (TIFF,
  MPO, ICO, ...); those still report ``too_large: ... > Pillow limit ...`` (without
  ``WxH`` when the header could not be read). To decode such images, raise
  ``PIL.Image.MAX_IMAGE_PIXELS`` (or set it to ``None``) once at process start.

Between 1x and 2x Pillow's global, Pillow emits a ``DecompressionBombWarning`` and
decoding goes on; that warning is left alone (filtering it per call is not thread-safe).
"""

from __future__ import annotations

import io
import operator
import re
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ntf_ray.errors import DECODE, TOO_LARGE, UNSUPPORTED_FORMAT, error
from ntf_ray.images.decode_limits import declared_work, icon_too_large
from ntf_ray.images.decode_pixels import BadSamples, TooSlow, check_deadline, to_rgb_array
from ntf_ray.images.formats import FORMATS, OPENERS, unsupported_format
from ntf_ray.images.jpeg_decode import decode_jpeg

__all__ = ["DEFAULT_DEADLINE_S", "DEFAULT_MAX_PIXELS", "FORMATS", "Decoded", "decode"]

#: Default ceiling on ``width * height`` (100 Mpx, e.g. 12000 x 8333). A 100 Mpx RGB
#: image is 300 MB as uint8; anything bigger in a web crawl is almost surely not a photo
#: worth scoring at full resolution, or a deliberate bomb.
DEFAULT_MAX_PIXELS = 100_000_000
#: Default time one decode may take (seconds). A 100 Mpx PNG decodes in a few seconds on one
#: core; what takes longer is a file built to hold its decoder.
DEFAULT_DEADLINE_S = 30.0

# Keep error reasons short and on one line so they can be stored in a table column and
# counted by prefix.
_MAX_REASON_CHARS = 200

_EXIF_ORIENTATION_TAG = 0x0112

# Identical to the table in PIL.ImageOps.exif_transpose. We apply it ourselves instead of
# calling exif_transpose because exif_transpose also rewrites the EXIF/XMP metadata of the
# result, which costs time and can raise on malformed EXIF even when the pixels are fine.
_ORIENTATION_TO_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}



# Pillow puts the BytesIO repr ("<_io.BytesIO object at 0x7f...>") into some messages;
# scrub it so identical failures produce identical reasons.
_ADDRESS_RE = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Decoded:
    """Result of :func:`decode`.

    Attributes:
        image: ``(H, W, 3)`` ``uint8`` RGB array, C-contiguous and writeable, after EXIF
            orientation; ``None`` on error.
        format: one of :data:`FORMATS` (Pillow's names) when the bytes were opened; the
            refused format's name with an ``unsupported_format`` error; ``None`` if the
            bytes were not identified.
        width: width in pixels of ``image`` (after EXIF orientation). On error: the size
            declared by the header when it was read (as stored, before orientation), else
            ``None``.
        height: height in pixels, same rules as ``width``.
        error: ``None`` when ok, else a short one-line reason starting with ``"decode: "``,
            ``"too_large: "`` or ``"unsupported_format: "``.
        window: ``image`` holds only the centre window asked for by ``decode(..., window=N)``.
    """

    image: np.ndarray | None
    format: str | None
    width: int | None
    height: int | None
    error: str | None
    window: bool = False  # ``image`` is the centre window only (``decode(..., window=N)``)

    @property
    def ok(self) -> bool:
        """True when ``image`` holds decoded pixels (``error is None``)."""
        return self.error is None


class _TooLarge(Exception):
    """Internal: Pillow's own bomb guard fired while loading (message is the reason)."""


class _Timed(io.BytesIO):
    """The file Pillow reads: each read past the deadline raises ``TooSlow``, so a decoder
    that keeps asking for input stops there."""

    def __init__(self, buf, deadline: float | None):
        super().__init__(buf)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        check_deadline(self.deadline)
        return super().read(size)


def _too_slow(deadline_s: float | None) -> str:
    return error(DECODE, f"too slow (over {deadline_s:g} s)")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    deadline_s: float | None = DEFAULT_DEADLINE_S,
    window: int | None = None,
) -> Decoded:
    """Decode encoded image bytes to a full-resolution ``(H, W, 3)`` ``uint8`` RGB array.

    Args:
        data: the whole encoded file (``bytes``, ``bytearray`` or ``memoryview``; a
            non-contiguous memoryview is copied).
        max_pixels: refuse images whose header declares more than this many pixels
            (``width * height``) before any pixel memory is allocated; ``None`` disables
            the check. See the module docstring for how this interacts with Pillow's
            global ``Image.MAX_IMAGE_PIXELS``.
        deadline_s: give up after this many seconds (``decode: too slow``); None: no deadline.
        window: the caller keeps only the centre ``window x window`` square of the upright
            image (``TF.center_crop`` at native resolution). Where a plain JPEG at least that
            big on each side can be decoded as that region (:mod:`ntf_ray.images.jpeg_window`),
            ``image`` is the square and ``Decoded.window`` is True; ``width`` / ``height`` stay
            the whole image's. The square's pixels are the whole frame's, and errors are the
            same; otherwise the whole frame is decoded as without it.

    Returns:
        A :class:`Decoded`. Never raises for bad data; check ``.ok`` / ``.error``.

    Raises:
        TypeError: ``data`` is not bytes-like as above, or ``max_pixels`` is not an int
            or ``None``.
        ValueError: ``max_pixels`` is not positive.
    """
    buf = _as_buffer(data)
    limit = _check_max_pixels(max_pixels)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if len(buf) == 0:
        return _failure(error(DECODE, "empty file"))
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    icon = icon_too_large(buf, limit)
    if icon is not None:  # before Image.open: the ICO plugin decodes its embedded image there
        return Decoded(None, "ICO", None, None, icon)

    # 1) Identify and read the header only (Image.open is lazy), trying only the plugins
    # of FORMATS: no other plugin's open or load ever sees the bytes.
    try:
        im = Image.open(_Timed(buf, deadline), formats=OPENERS)
    except TooSlow:
        return _failure(_too_slow(deadline_s))
    except UnidentifiedImageError:
        name = unsupported_format(buf)
        if name is None:
            return _failure(error(DECODE, "not an image"))
        return Decoded(None, name, None, None, error(UNSUPPORTED_FORMAT, f"{name}"))
    except Image.DecompressionBombError as exc:
        # Pillow's global guard (2 x Image.MAX_IMAGE_PIXELS) fired inside Image.open. Re-read
        # the header without that guard so max_pixels, not the global, decides.
        try:
            im = _open_without_pillow_bomb_check(buf)
        except Exception:  # noqa: BLE001 - fall back to Pillow's own numbers
            im = None
        if im is None:
            return _failure(_pillow_bomb_reason(exc))
    except MemoryError:
        return _failure(error(DECODE, "out of memory"))
    except Exception as exc:  # noqa: BLE001 - bad data must never raise (see docstring)
        return _failure(_reason(exc))

    with im:
        fmt = im.format
        width, height = im.size
        # 2) Refuse oversized images from the header alone, before any pixel allocation.
        if limit is not None and width * height > limit:
            return Decoded(
                None,
                fmt,
                width,
                height,
                error(TOO_LARGE, f"{width}x{height} = {width * height} px > limit {limit}"),
            )
        if width <= 0 or height <= 0:
            return Decoded(None, fmt, width, height, error(DECODE, f"empty image ({width}x{height})"))
        refused = declared_work(im, buf, limit)
        if refused is not None:
            return Decoded(None, fmt, width, height, refused)
        if fmt in ("JPEG", "MPO"):
            image, reason, whole = decode_jpeg(buf, limit, window)
            if reason is not None:
                return Decoded(None, fmt, width, height, reason)
            if whole is not None:  # the centre window only; the size is the upright image's
                return Decoded(image, fmt, whole[0], whole[1], None, window=True)
            if image is not None:
                return Decoded(image, fmt, int(image.shape[1]), int(image.shape[0]), None)
        # 3) Decode fully. load() surfaces truncation as OSError since we never set
        # ImageFile.LOAD_TRUNCATED_IMAGES; then orient and convert.
        try:
            image = _load_oriented_rgb(im, deadline)
        except TooSlow:
            return Decoded(None, fmt, width, height, _too_slow(deadline_s))
        except _TooLarge as exc:
            return Decoded(None, fmt, width, height, str(exc))
        except MemoryError:
            return Decoded(None, fmt, width, height, error(DECODE, "out of memory"))
        except Exception as exc:  # noqa: BLE001 - bad data must never raise
            return Decoded(None, fmt, width, height, _reason(exc))

    out_h, out_w = image.shape[:2]
    return Decoded(image, fmt, int(out_w), int(out_h), None)


# --------------------------------------------------------------------------- helpers


def _as_buffer(data: object) -> bytes | bytearray | memoryview:
    """Validate ``data`` and return something ``io.BytesIO`` accepts (contiguous bytes)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        # BytesIO needs a C-contiguous buffer; len() must count bytes, not items.
        if data.c_contiguous:
            return data.cast("B") if data.format != "B" or data.ndim != 1 else data
        return data.tobytes()
    raise TypeError(
        f"decode() expects bytes, bytearray or memoryview, got {type(data).__name__}"
    )


def _check_max_pixels(max_pixels: object) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool):
        raise TypeError("max_pixels must be an int or None, got bool")
    try:
        limit = operator.index(max_pixels)
    except TypeError:
        raise TypeError(
            f"max_pixels must be an int or None, got {type(max_pixels).__name__}"
        ) from None
    if limit <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {limit}")
    return limit


def _failure(reason: str) -> Decoded:
    return Decoded(None, None, None, None, reason)


def _reason(exc: BaseException) -> str:
    """Short one-line ``decode: ...`` reason for a decoder exception."""
    if isinstance(exc, BadSamples):
        msg = str(exc)
    else:
        msg = " ".join(str(exc).split())
        msg = _ADDRESS_RE.sub("<buffer>", msg)
        if "truncated" in msg.lower():
            # Pillow: "image file is truncated (N bytes not processed)", "Truncated File Read"
            return error(DECODE, "truncated image")
        if isinstance(exc, EOFError):
            return error(DECODE, "truncated image")
        if not msg:
            msg = type(exc).__name__
        elif not isinstance(exc, (OSError, SyntaxError, ValueError)):
            # e.g. KeyError('273') would read as just "273" without its type.
            msg = f"{type(exc).__name__}: {msg}"
    reason = error(DECODE, f"{msg}")
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return reason


def _pillow_bomb_reason(exc: BaseException) -> str:
    """``too_large`` reason from Pillow's DecompressionBombError when we lack the size."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = match.group(1) if match else "?"
    return error(TOO_LARGE, f"{pixels} px > Pillow limit {_pillow_hard_limit()}")


def _pillow_hard_limit() -> int | None:
    # Image.open / plugins raise DecompressionBombError above twice the global.
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _open_without_pillow_bomb_check(buf: bytes | bytearray | memoryview):
    """Identify ``buf`` like ``Image.open(..., formats=OPENERS)``, minus Pillow's bomb check.

    Tries the same plugins (``Image.OPEN``) in the same order with the same accept / open
    steps as ``Image.open``, so it picks the same plugin that just refused. Only the
    header is read. Returns ``None`` if nothing opens it.
    """
    fp = io.BytesIO(buf)
    prefix = fp.read(16)
    Image.init()
    for fmt in OPENERS:
        factory, accept = Image.OPEN[fmt]
        result = not accept or accept(prefix)
        if not result or isinstance(result, str):
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    return None


def _load_oriented_rgb(im: Image.Image, deadline: float | None = None) -> np.ndarray:
    """Fully decode ``im``, apply EXIF orientation, return ``(H, W, 3)`` uint8 RGB."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        # Some plugins (TIFF, GIF, ...) re-check Pillow's global limit while loading.
        w, h = im.size
        raise _TooLarge(
            f"too_large: {w}x{h} = {w * h} px > Pillow limit {_pillow_hard_limit()}"
            " (raise PIL.Image.MAX_IMAGE_PIXELS)"
        ) from exc
    method = _ORIENTATION_TO_TRANSPOSE.get(_exif_orientation(im))
    if method is not None:
        # Transposing before the RGB conversion keeps mode, palette and transparency
        # info, and moves fewer bytes for 1-byte modes.
        im = im.transpose(method)
    return to_rgb_array(im, deadline)


def _exif_orientation(im: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; 1 when absent or malformed.

    Read after ``load()`` because PNG can store EXIF after the image data. Malformed EXIF
    must not fail an otherwise good image, so any error here means "no orientation".
    """
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - metadata is optional
        return 1
    return value if 1 <= value <= 8 else 1
