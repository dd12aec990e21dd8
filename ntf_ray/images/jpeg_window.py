"""The centre window of a plain JPEG, decoded without the rest of the frame.

A scan scores the centre ``size x size`` window at native resolution (``TF.center_crop``):
6% of a 1024 x 768 photo, 0.4% of a 12 Mpx one. libjpeg-turbo 3's TurboJPEG API decodes a
region (``tj3SetCroppingRegion``): rows above it are skipped (entropy-decoded, never
transformed), columns beside it are never transformed, upsampled or converted. Here the
region is the window, a margin of three MCUs around it, and every row below it to the end of
the image: those rows are cheap (only the window's columns), and reading them is what
finds a file cut short under its window: any warning from the library hands the file to
the whole decode, which says ``decode: truncated image`` as always. Stopping at the window's
last row would score such files instead.

The margin is what keeps the pixels equal to the full decode's: chroma upsampling and the
block smoothing of an incomplete progressive file read neighbouring samples and blocks,
which the edge of a region replaces by copies of its own (``MARGIN_MCUS``). So the
window's pixels are those of :func:`ntf_ray.images.jpeg_decode.decode_jpeg` followed by the
crop, bit for bit (the same libjpeg-turbo settings: accurate DCT, fancy upsampling, warnings
as errors; a test compares every subsampling, progressive files and all eight EXIF
orientations).

The library is found at run time (``ctypes``, no build step): ``$NTF_RAY_TURBOJPEG`` (a path to
``libturbojpeg``, or ``off``), else the system's ``libturbojpeg`` where it is version 3
(``apt install libturbojpeg0`` on distributions that ship 3.x, ``brew install jpeg-turbo``,
libjpeg-turbo's own packages in ``/opt/libjpeg-turbo``). Without it, or for any file it
does not take, the full decode runs as before: this module changes how fast a row is
written, never what it says. TurboJPEG 2 (Debian 12, Ubuntu 24.04) has no region decode;
its lossless crop followed by a decode was measured slower than the full decode
(``bench/README.md``), so it is not used. :func:`describe` names the library and the
libjpeg-turbo version it says it is (the ``version X.Y.Z (build N)`` string every build carries);
a version ``X.Y.9N`` is a pre-release (libjpeg-turbo numbers its betas so), and is said to be.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re

import numpy as np

from ntf_ray.images.jpeg_screen import MAX_SCANS, Screen

#: ``$NTF_RAY_TURBOJPEG``: the TurboJPEG 3 library to use, or ``off`` for the full decode only.
LIBRARY_ENV = "NTF_RAY_TURBOJPEG"
_KNOWN_PATHS = (
    "/opt/libjpeg-turbo/lib64/libturbojpeg.so.0",
    "/opt/libjpeg-turbo/lib32/libturbojpeg.so.0",
    "/opt/homebrew/opt/jpeg-turbo/lib/libturbojpeg.dylib",
    "/usr/local/opt/jpeg-turbo/lib/libturbojpeg.dylib",
)

# TurboJPEG 3 (turbojpeg.h): enum TJINIT, TJPARAM, TJPF, TJSAMP values.
_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING, _TJPARAM_SUBSAMP, _TJPARAM_JPEGWIDTH, _TJPARAM_JPEGHEIGHT = 0, 4, 5, 6
_TJPARAM_PRECISION, _TJPARAM_FASTUPSAMPLE, _TJPARAM_FASTDCT, _TJPARAM_SCANLIMIT = 7, 9, 10, 13
_TJPF_RGB = 0
#: iMCUs of margin around the window. Chroma upsampling reads one neighbouring sample, and a
#: progressive file that lacks some AC scans (one cut at a scan boundary decodes without a
#: warning) is smoothed from the DC values of two blocks on each side, which a region's edge
#: replaces by copies of its own: three iMCUs keep both away from the window.
MARGIN_MCUS = 3
#: iMCU width and height per TJSAMP (444, 422, 420, GRAY, 440, 411, 441): a region starts
#: on an iMCU column, and one iMCU around the window is the margin.
_MCU = {0: (8, 8), 1: (16, 8), 2: (16, 16), 3: (8, 8), 4: (8, 16), 5: (32, 8), 6: (8, 32)}


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


#: What libjpeg-turbo writes into every build (``jcmaster.c``): "libjpeg-turbo version 3.1.3 (build 20260127)".
_VERSION_STRING = re.compile(rb"version (\d{1,3})\.(\d{1,3})\.(\d{1,3}) \(build \d+\)")
_MAX_LIBRARY_BYTES = 64 << 20


def loaded_file(lib: ctypes.CDLL, candidate: str) -> str | None:
    """The file the dynamic linker loaded ``lib`` from (``dladdr`` of ``tj3Init``), or None."""
    if os.sep in candidate and os.path.isfile(candidate):
        return candidate
    try:
        dladdr = ctypes.CDLL(None).dladdr
        dladdr.restype, dladdr.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if dladdr(ctypes.cast(lib.tj3Init, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError, ValueError, TypeError):
        pass
    return None


def file_version(path: str | None) -> tuple[int, int, int] | None:
    """The libjpeg-turbo version a library file says it is, or None where it says none."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            found = _VERSION_STRING.search(f.read(_MAX_LIBRARY_BYTES))
    except OSError:
        return None
    return tuple(int(g) for g in found.groups()) if found else None


def is_release(version: tuple[int, int, int] | None) -> bool:
    """A released libjpeg-turbo 3 (3.0.0 and on), not a beta: libjpeg-turbo numbers a beta of
    3.0 as 2.1.9N and of 3.1 as 3.0.9N."""
    return version is not None and version[0] >= 3 and version[1] < 90 and version[2] < 90


class _TurboJPEG3:
    """The few TurboJPEG 3 calls a region decode needs. Each decode gets its own handle (a
    handle is not thread-safe; one costs about a microsecond); ctypes lets other threads run
    while libjpeg-turbo works."""

    def __init__(self, lib: ctypes.CDLL, name: str, version: tuple[int, int, int] | None = None):
        self.name = name
        #: ``(major, minor, patch)`` that the library's file says, or None.
        self.version = version
        for fn, res, args in (
            ("tj3Init", ctypes.c_void_p, [ctypes.c_int]),
            ("tj3Destroy", None, [ctypes.c_void_p]),
            ("tj3Set", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
            ("tj3Get", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            ("tj3DecompressHeader", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
            ("tj3SetCroppingRegion", ctypes.c_int, [ctypes.c_void_p, _Region]),
            ("tj3Decompress8", ctypes.c_int,
             [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
            ("tj3GetErrorStr", ctypes.c_char_p, [ctypes.c_void_p]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self._lib = lib

    @contextlib.contextmanager
    def _handle(self):
        lib = self._lib
        handle = lib.tj3Init(_TJINIT_DECOMPRESS)
        if not handle:
            raise MemoryError("tj3Init failed")
        try:
            if (lib.tj3Set(handle, _TJPARAM_STOPONWARNING, 1) or lib.tj3Set(handle, _TJPARAM_FASTUPSAMPLE, 0)
                    or lib.tj3Set(handle, _TJPARAM_FASTDCT, 0) or lib.tj3Set(handle, _TJPARAM_SCANLIMIT, MAX_SCANS)):
                raise RuntimeError(f"TurboJPEG refused a setting: {self._message(handle)}")
            yield handle
        finally:
            lib.tj3Destroy(handle)

    def _message(self, handle) -> str:
        return (self._lib.tj3GetErrorStr(handle) or b"").decode("ascii", "replace")

    def header(self, buf: bytes) -> tuple[int, int, int, int] | str:
        """``(width, height, subsampling, precision)`` from the frame header, or the library's message."""
        with self._handle() as handle:
            if self._lib.tj3DecompressHeader(handle, buf, len(buf)):
                return self._message(handle)
            get = self._lib.tj3Get
            return (get(handle, _TJPARAM_JPEGWIDTH), get(handle, _TJPARAM_JPEGHEIGHT), get(handle, _TJPARAM_SUBSAMP),
                    get(handle, _TJPARAM_PRECISION))

    def region(self, buf: bytes, x: int, y: int, w: int, h: int) -> np.ndarray | str:
        """The ``(h, w, 3)`` RGB pixels of a region (``x`` on an iMCU column), or the library's message."""
        lib = self._lib
        out = np.empty((h, w, 3), np.uint8)
        with self._handle() as handle:
            if (lib.tj3DecompressHeader(handle, buf, len(buf)) or lib.tj3SetCroppingRegion(handle, _Region(x, y, w, h))
                    or lib.tj3Decompress8(handle, buf, len(buf), out.ctypes.data, w * 3, _TJPF_RGB)):
                return self._message(handle)
        return out


@functools.lru_cache(maxsize=1)
def library() -> _TurboJPEG3 | None:
    """The TurboJPEG 3 library this process decodes windows with, or None (full decodes)."""
    chosen = os.environ.get(LIBRARY_ENV, "").strip()
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    found = ctypes.util.find_library("turbojpeg")
    for candidate in ([chosen] if chosen else [found, "libturbojpeg.so.0", *_KNOWN_PATHS]):
        if not candidate:
            continue
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        if hasattr(lib, "tj3SetCroppingRegion") and hasattr(lib, "tj3Decompress8"):
            return _TurboJPEG3(lib, os.path.basename(candidate), file_version(loaded_file(lib, candidate)))
    return None


def describe() -> str:
    """One line for a log: how centre windows of JPEGs are decoded in this process."""
    lib = library()
    if lib is None:
        return "JPEG centre windows: full decode (no libjpeg-turbo 3 TurboJPEG library found; see docs/operations.md)"
    if lib.version is None:
        said = "version unknown"
    else:
        said = "libjpeg-turbo " + ".".join(map(str, lib.version))
        said += "" if is_release(lib.version) else ", a pre-release"
    return f"JPEG centre windows: region decode ({lib.name}, {said})"


def stored_rect(orientation: int, width: int, height: int, top: int, left: int, size: int) -> tuple[int, int]:
    """Where the upright image's ``size`` window at ``(top, left)`` lies in the stored image
    (``width x height`` as stored): its top-left corner there. Each EXIF orientation maps an
    upright pixel ``(r, c)`` to a stored one as ``jpeg_decode._ORIENT`` turns them."""
    last_r, last_c = top + size - 1, left + size - 1
    w1, h1 = width - 1, height - 1
    corners = {
        1: lambda r, c: (r, c), 2: lambda r, c: (r, w1 - c), 3: lambda r, c: (h1 - r, w1 - c),
        4: lambda r, c: (h1 - r, c), 5: lambda r, c: (c, r), 6: lambda r, c: (h1 - c, r),
        7: lambda r, c: (h1 - c, w1 - r), 8: lambda r, c: (c, w1 - r),
    }[orientation]
    a, b = corners(top, left), corners(last_r, last_c)
    return min(a[0], b[0]), min(a[1], b[1])


def centre_window(buf, found: Screen, size: int, turn) -> np.ndarray | None:
    """The upright centre ``size`` window of a plain JPEG (``found.gpu``), decoded as a region.

    None when this path does not take the file (no library, smaller than the window, unusual
    subsampling) or the library says anything at all about it (a warning is an error here): the
    whole decode then decides, so a damaged file's row reads as it always did. ``turn`` is the
    function that shows a stored array upright (EXIF orientation).
    """
    lib = library()
    if lib is None or not found.gpu or not found.width or not found.height:
        return None
    width, height = found.width, found.height
    up_w, up_h = (height, width) if found.orientation in (5, 6, 7, 8) else (width, height)
    if up_w < size or up_h < size:
        return None  # upscaled first: the full frame is needed
    data = bytes(buf) if not isinstance(buf, bytes) else buf
    try:
        head = lib.header(data)
    except Exception:  # noqa: BLE001 - no handle: the whole decode decides, as for any file
        return None
    if isinstance(head, str) or head[:2] != (width, height) or head[3] != 8 or head[2] not in _MCU:
        return None
    mcu_w, mcu_h = _MCU[head[2]]
    top, left = int(round((up_h - size) / 2.0)), int(round((up_w - size) / 2.0))  # as TF.center_crop
    row, col = stored_rect(found.orientation, width, height, top, left, size)
    x0 = max(0, col - MARGIN_MCUS * mcu_w) // mcu_w * mcu_w
    y0 = max(0, row - MARGIN_MCUS * mcu_h)
    x1 = min(width, col + size + MARGIN_MCUS * mcu_w)
    try:
        pixels = lib.region(data, x0, y0, x1 - x0, height - y0)  # to the last row: a cut-short file is found
    except Exception:  # noqa: BLE001 - no handle, no memory: the whole decode decides, as for any file
        return None
    if isinstance(pixels, str):
        return None  # the whole decode says what is wrong, in its own words, as for any file
    window = pixels[row - y0 : row - y0 + size, col - x0 : col - x0 + size]
    window = window if turn is None else turn(window)
    return np.ascontiguousarray(window)
