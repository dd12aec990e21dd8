"""Files on this machine: plain paths (``file://`` accepted) as a ``Source``.

A listing gives every regular file below the folder a row, and only those: a file whose name
is not UTF-8, a symbolic link that leads out of the folder and a subfolder that cannot be read
get a row with ``listing_error``, so nothing is silently left out and nothing outside the
input is read. Hidden files and folders (``.git/``) are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import datetime as dt
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from ntf_ray.errors import READ, UNSUPPORTED_NAME, error
from ntf_ray.storage.source import (
    NotARegularFile,
    ObjectChanged,
    ObjectTooLarge,
    Row,
    Source,
    StorageOptions,
    error_row,
    matches,
)


def local_etag(st: os.stat_result) -> str:
    """A local file's etag: a digest of its size, mtime, ctime and inode.

    ctime cannot be set by a user, so a file rewritten with the same size and mtime (``cp -p``,
    ``touch -d``, rsync ``-t``) still reads as changed.
    """
    key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _row(uri: str, st: os.stat_result) -> Row:
    return {"uri": uri, "etag": local_etag(st), "size_bytes": st.st_size,
            "last_modified": dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.timezone.utc)}


def _printable(path: str) -> str:
    """A path that is valid UTF-8 whatever bytes its name holds (invalid bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes over as surrogates
        return False
    return True


def _read(path: str, etag: str | None, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: a file swapped for a FIFO after listing must not block the open itself
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)  # before fdopen, which refuses a folder with a bare "Is a directory: <fd>"
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", path)
        raise NotARegularFile(f"{path} is not a regular file")  # a FIFO or device would block or never end
    with os.fdopen(fd, "rb", buffering=0) as f:
        if etag is not None and local_etag(st) != etag:
            raise ObjectChanged(f"{path} changed after it was listed")
        data = f.read() if max_bytes is None else _read_capped(f, st.st_size, max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLarge(f"more than {max_bytes} bytes")
    return data


def _read_capped(f, size: int, cap: int) -> bytes:
    """At most ``cap`` bytes of ``f``, in pieces sized by the file: ``f.read(cap)`` would set aside
    the whole cap (4 GiB for a model's weights) before reading a byte."""
    parts, got = [], 0
    want = min(size + 1, cap)  # one byte past the listed size tells a file that grew
    while got < cap:
        part = f.read(min(want, cap - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
        want = min(8 * 2**20, cap - got)
    return b"".join(parts)


class LocalSource(Source):
    scheme = "file"

    def normalize(self, uri: str) -> str:
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        return str(Path(uri).expanduser().absolute())

    def join(self, base: str, *parts: str) -> str:
        return str(Path(base, *parts))

    def local_path(self, uri: str) -> str | None:
        return self.normalize(uri)

    def list(self, prefix: str, pattern: str | None, options: StorageOptions, *, concurrency: int = 1) -> Iterator[Row]:
        root = prefix
        if not Path(root).is_dir():
            raise FileNotFoundError(f"input folder {root} does not exist")
        real_root = os.path.realpath(root)
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if folder == root:
                    raise
                yield error_row(_printable(os.path.abspath(folder)) + os.sep,
                                error(READ, f"cannot list this folder ({type(exc).__name__}); its files are not scanned"))
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                uri = os.path.abspath(e.path)
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    if not matches(e.name, pattern):
                        continue
                    if not _is_utf8(uri):
                        yield error_row(_printable(uri), error(UNSUPPORTED_NAME, "the file name is not valid UTF-8"))
                    elif e.is_symlink():  # followed to a file inside the folder only; folders behind links are not
                        target = os.path.realpath(uri)
                        if os.path.commonpath([target, real_root]) != real_root:
                            yield error_row(uri, error(UNSUPPORTED_NAME, "a symbolic link that leads outside the input folder"))
                        elif os.path.isfile(target):
                            yield _row(uri, os.stat(target))
                        elif not os.path.isdir(target):
                            yield error_row(uri, error(READ, "a symbolic link to no regular file"))
                    elif e.is_file(follow_symlinks=False):  # never a FIFO, socket or device: reading one can block
                        yield _row(uri, e.stat(follow_symlinks=False))
                except OSError as exc:
                    yield error_row(_printable(uri), error(READ, f"cannot stat ({type(exc).__name__})"))

    def stat_many(self, uris: list[str], options: StorageOptions) -> Iterator[Row]:
        for uri in uris:
            try:
                yield _row(uri, os.stat(uri))
            except OSError:
                yield {"uri": uri, "etag": None, "size_bytes": None, "last_modified": None}

    def read_many(self, uris: list[str], options: StorageOptions, *, etags: list[str | None],
                  max_bytes: int | None) -> list[bytes | Exception]:
        out: list[bytes | Exception] = []
        for uri, etag in zip(uris, etags):
            try:
                out.append(_read(uri, etag, max_bytes))
            except (OSError, ValueError) as exc:  # ValueError: a name with a NUL byte, this object's alone
                out.append(exc)
        return out

    def read_bytes(self, uri: str, options: StorageOptions) -> bytes:
        return Path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes, options: StorageOptions) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name in the same folder (threads of one process may write the same
        # file), removed if the write fails; os.replace makes the file appear whole or not at all.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "xb") as f:  # mode 0666 minus the umask, like any new file
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def remove(self, uri: str, options: StorageOptions) -> None:
        if os.path.isdir(uri) and not os.path.islink(uri):
            shutil.rmtree(uri, ignore_errors=True)
        else:
            Path(uri).unlink(missing_ok=True)

    def prune(self, folder: str, options: StorageOptions) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if nothing is left

    def files(self, folder: str, options: StorageOptions, *, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
        if not os.path.isdir(folder):
            return
        for at, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not (skip and d.startswith(skip)))
            rel = os.path.relpath(at, folder)
            for name in sorted(names):
                path = os.path.join(at, name)
                try:
                    st = os.stat(path)
                except OSError:  # removed while listed, or a broken link
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield (name if rel == "." else f"{rel}/{name}").replace(os.sep, "/"), path, _version(st)

    def version(self, uri: str, options: StorageOptions) -> str:
        return _version(os.stat(uri))

    def exists(self, uri: str, options: StorageOptions) -> bool:
        return Path(uri).exists()

    def move(self, source: str, target: str, options: StorageOptions) -> None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def arrow_filesystem(self, uri: str, options: StorageOptions):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), uri

    def arrow_path(self, uri: str) -> str:
        return uri

    def create(self, uri: str, data: bytes, options: StorageOptions) -> tuple[bool, str | None]:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False, None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True, None

    def replace(self, uri: str, data: bytes, token: str | None, options: StorageOptions) -> tuple[bool, str | None]:
        self.write_bytes(uri, data, options)  # one machine: a rename, last writer wins
        return True, None
