"""A TurboJPEG 3 library for the tests of ``images.jpeg_window``, wherever one is.

In order: ``$NTF_RAY_TURBOJPEG`` where it names a file; the copy that ``make test`` puts in the
virtual environment (``python -m tests.turbojpeg3 fetch``, below); the system's ``libturbojpeg``
where it is version 3. ``NTF_REQUIRE_TURBOJPEG3`` (set by CI) makes a missing library fail the
tests that need it instead of skipping them, and so does a library that is not a released
libjpeg-turbo 3 (a beta such as 2.1.92, or one that says no version).

The copy: Debian 12 ships TurboJPEG 2.1 (no region decode) and PyPI has no wheel that carries
libjpeg-turbo's own ``libturbojpeg.so.0`` at a released 3.x, so it comes from the npm registry:
the ``@julusian/jpeg-turbo`` package ships, beside its Node.js binding, the ``libturbojpeg.so.0``
it builds from the libjpeg-turbo 3.1.3 release. ``npm pack`` downloads the package (no install,
no script of it runs), the file for this platform is taken out of it and checked against the
digest below, and none of that package's code runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from ntf_ray.images import jpeg_window

#: The npm package whose ``prebuilds/`` carry libjpeg-turbo 3.1.3's TurboJPEG library.
NPM_PACKAGE = "@julusian/jpeg-turbo@3.0.1"
#: Its ``libturbojpeg.so.0`` for each platform it builds one for, and that file's SHA-256.
PREBUILDS = {
    ("x86_64", "glibc"): ("jpeg-turbo-linux-x64",
                          "6facda09ef3e2308608f2b0214c040791e276305a48a27036362402f95fffcf5"),
    ("x86_64", "musl"): ("jpeg-turbo-linux-x64-musl",
                         "f0ab907a77c73f2450725e9236abd999b731be1adda2fa80cc9b5d2b4d780241"),
    ("aarch64", "glibc"): ("jpeg-turbo-linux-arm64",
                           "a84dbc892b9e438c72022bc6ad892400d21ffdf5d7184928d59807371b7c86d5"),
}
LIBRARY_NAME = "libturbojpeg.so.0"


def fetched_path() -> Path:
    """Where ``fetch`` puts the library: inside the virtual environment this Python runs in."""
    return Path(sys.prefix) / "turbojpeg3" / LIBRARY_NAME


def _has_tj3(path: str) -> bool:
    try:
        return hasattr(ctypes.CDLL(path), "tj3SetCroppingRegion")
    except OSError:
        return False


def library_path() -> str | None:
    chosen = os.environ.get(jpeg_window.LIBRARY_ENV, "").strip()
    if chosen and os.path.isfile(chosen) and _has_tj3(chosen):
        return chosen
    fetched = fetched_path()
    if fetched.is_file() and _has_tj3(str(fetched)):
        return str(fetched)
    system = ctypes.util.find_library("turbojpeg")
    if system and _has_tj3(system):
        return system
    return None


def version_of(path: str) -> tuple[int, int, int] | None:
    """The libjpeg-turbo version that the library at ``path`` says it is (as the loader reads it)."""
    lib = ctypes.CDLL(path)
    return jpeg_window.file_version(jpeg_window.loaded_file(lib, path))


def describe() -> str:
    """One line for the test report: which library the window-decode tests use, and its version."""
    path = library_path()
    if path is None:
        return "TurboJPEG 3 for the window decode: none (its tests skip, or fail under NTF_REQUIRE_TURBOJPEG3)"
    version = version_of(path)
    said = "unknown version" if version is None else "libjpeg-turbo " + ".".join(map(str, version))
    if version is not None and not jpeg_window.is_release(version):
        said += ", a pre-release"
    return f"TurboJPEG 3 for the window decode: {os.path.basename(path)} ({said})"


def require() -> str:
    path = library_path()
    required = bool(os.environ.get("NTF_REQUIRE_TURBOJPEG3"))
    if path is None:
        if required:
            pytest.fail("no TurboJPEG 3 library (`make test` fetches one: python -m tests.turbojpeg3 fetch)")
        pytest.skip("no TurboJPEG 3 library here")
    if required and not jpeg_window.is_release(version_of(path)):
        pytest.fail(f"NTF_REQUIRE_TURBOJPEG3: {describe()}; a released libjpeg-turbo 3 is required")
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


def _platform_key() -> tuple[str, str] | None:
    if sys.platform != "linux":
        return None
    libc = platform.libc_ver()[0]
    return platform.machine(), "glibc" if libc == "glibc" else "musl"


def fetch(dest: Path | None = None) -> Path | None:
    """Put libjpeg-turbo 3's ``libturbojpeg.so.0`` at ``dest`` (default: :func:`fetched_path`).

    Nothing to do where it is there already with the expected digest. Returns None, saying why,
    where this platform has no such file in the package or npm is missing: the tests then skip
    (or fail, under ``NTF_REQUIRE_TURBOJPEG3``).
    """
    dest = Path(dest) if dest else fetched_path()
    key = _platform_key()
    if key not in PREBUILDS:
        print(f"turbojpeg3: no prebuilt libturbojpeg for {key or sys.platform} in {NPM_PACKAGE}; "
              "install libjpeg-turbo 3 (see docs/operations.md) or name one with NTF_RAY_TURBOJPEG")
        return None
    folder, digest = PREBUILDS[key]
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == digest:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        print(f"turbojpeg3: npm not found, so {NPM_PACKAGE}'s libturbojpeg was not fetched")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", "--silent", "--ignore-scripts", "--pack-destination", tmp, NPM_PACKAGE],
                           check=True, stdout=subprocess.DEVNULL, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"turbojpeg3: npm could not download {NPM_PACKAGE} ({exc})")
            return None
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            member = tar.getmember(f"package/prebuilds/{folder}/{LIBRARY_NAME}")
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise SystemExit(f"turbojpeg3: {NPM_PACKAGE}'s {folder}/{LIBRARY_NAME} is not the file this "
                         "project checked (SHA-256 differs); not used")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    part.replace(dest)
    return dest


if __name__ == "__main__":
    if sys.argv[1:2] != ["fetch"]:
        raise SystemExit("usage: python -m tests.turbojpeg3 fetch")
    got = fetch()
    if got is not None:
        version = version_of(str(got))
        print(f"turbojpeg3: {got.name} (libjpeg-turbo {'.'.join(map(str, version or ())) or 'version unknown'})")
