"""A TurboJPEG 3 library for the tests of ``images.jpeg_window``, wherever one is.

The system's ``libturbojpeg`` where it is version 3; else the copy of libjpeg-turbo 3 that the
``turbojpeg`` package's wheel carries (a test dependency, there only for that library: no code
of that package runs). ``NTF_REQUIRE_TURBOJPEG3`` (set by CI) makes a missing library fail the
tests that need it instead of skipping them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from importlib import metadata

import pytest

from ntf_ray.images import jpeg_window


def _has_tj3(path: str) -> bool:
    try:
        return hasattr(ctypes.CDLL(path), "tj3SetCroppingRegion")
    except OSError:
        return False


def library_path() -> str | None:
    system = ctypes.util.find_library("turbojpeg")
    if system and _has_tj3(system):
        return system
    try:
        files = metadata.files("turbojpeg") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parent.name == "turbojpeg.libs" and f.name.startswith("libturbojpeg"):
            path = str(f.locate())
            if _has_tj3(path):
                return path
    return None


def require() -> str:
    path = library_path()
    if path is None:
        if os.environ.get("NTF_REQUIRE_TURBOJPEG3"):
            pytest.fail("no TurboJPEG 3 library (the test extra's turbojpeg wheel carries one)")
        pytest.skip("no TurboJPEG 3 library here")
    return path


@contextlib.contextmanager
def using(path: str | None):
    """``images.jpeg_window`` decodes with the library at ``path`` (``None``: with none) inside."""
    old = os.environ.get(jpeg_window.LIBRARY_ENV)
    os.environ[jpeg_window.LIBRARY_ENV] = path or "off"
    jpeg_window.library.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(jpeg_window.LIBRARY_ENV, None)
        else:
            os.environ[jpeg_window.LIBRARY_ENV] = old
        jpeg_window.library.cache_clear()
