"""Where objects live, one way in for the whole project: a ``Source`` per kind of uri.

``s3://`` (``s3.S3Source``) and local paths (``local.LocalSource``) are built in; another kind
of input is one module with a ``Source`` subclass, registered here (``register``). Every
function below takes the uri of any registered source and asks that source, so nothing else
in the project branches on the kind of a uri. Credentials are never part of anything this
package returns or logs (``redaction``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ntf_ray.errors import READ, UNSUPPORTED_NAME, error
from ntf_ray.storage.local import LocalSource
from ntf_ray.storage.s3 import ALIASES, S3Source, split_s3
from ntf_ray.storage.source import (
    NotARegularFile,
    ObjectChanged,
    ObjectTooLarge,
    Row,
    Source,
    StorageOptions,
    Unsupported,
)

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_READ_AHEAD_BYTES", "INPUT_MAX_BYTES", "InputError", "InputMissing", "ObjectChanged", "ObjectTooLarge", "Row", "Source",
           "StorageOptions", "Unsupported", "arrow_filesystem", "arrow_paths", "binary_views", "create", "exists", "files", "join",
           "list_names", "list_objects", "local_path", "move", "name_error", "normalize", "prune", "read_bytes", "read_error",
           "read_input", "read_many", "read_versioned", "redact", "register", "remove", "unregister", "replace", "source_for", "stat_many",
           "version", "write_bytes"]

#: Default cap on an object's size for a scan: far above any photo (a 100 Mpx JPEG is ~50 MB),
#: far below what hurts a worker.
DEFAULT_MAX_BYTES = 128 * 2**20
#: What a scan holds in Ray's object store at most (read blocks waiting for a detector, and
#: scored rows waiting to be written): without a cap, reads run gigabytes ahead of the actors.
DEFAULT_READ_AHEAD_BYTES = 2 * 1024**3

_SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Make ``source`` the one for ``source.scheme://`` uris (here and in every Ray task that
    reads through this package: the scan hands its sources to its read tasks)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", source.scheme or ""):
        raise ValueError(f"a source needs a scheme of lowercase letters, digits, '+', '-' or '.': {source.scheme!r}")
    _SOURCES[source.scheme] = source
    return source


def unregister(scheme: str) -> None:
    """Forget the source of ``scheme://`` uris (the built-in ones stay)."""
    if scheme not in ("file", "s3"):
        _SOURCES.pop(scheme, None)


register(LocalSource())
register(S3Source())


def scheme_of(uri: str | Path) -> str:
    """The scheme a uri names, as written before ``://`` (``file`` for a plain path)."""
    text = str(uri)
    if ALIASES.match(text):
        return "s3"
    head, sep, _ = text.partition("://")
    return head if sep else "file"


def source_for(uri: str | Path) -> Source:
    """The registered source of ``uri``'s scheme; a ValueError for any other (``gs://``,
    ``http://``, ``S3://``: nothing is guessed)."""
    scheme = scheme_of(uri)
    if scheme not in _SOURCES:
        others = "".join(f", {s}://..." for s in sorted(_SOURCES) if s not in ("file", "s3"))
        raise ValueError(f"unsupported URI scheme in {str(uri)!r}: use a local path or s3://bucket/key{others}")
    return _SOURCES[scheme]


def sources() -> list[Source]:
    """The registered sources, for handing to Ray tasks (they register them in their process)."""
    return list(_SOURCES.values())


def normalize(uri: str | Path) -> str:
    """The canonical uri: an absolute local path, or ``scheme://...`` as its source writes it."""
    return source_for(uri).normalize(str(uri))


def name_error(uri: object) -> str | None:
    """Why ``uri`` cannot name one object to read (an ``unsupported_name:`` row), or None.

    Checked per object before a block is read: one row of a manifest or an inventory with an
    empty or odd bucket (``s3:///k.png``), an unknown scheme or no uri at all costs its own row,
    never its block's."""
    if not isinstance(uri, str) or not uri:
        return error(UNSUPPORTED_NAME, "no uri")
    if "\x00" in uri:
        return error(UNSUPPORTED_NAME, "a NUL byte in the name")
    try:
        name = normalize(uri)
        if scheme_of(name) == "s3" and not split_s3(name)[1]:
            return error(UNSUPPORTED_NAME, "an s3 uri without a key names a bucket, not an object")
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        return error(UNSUPPORTED_NAME, reason if len(reason) <= 200 else reason[:197] + "...")
    return None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a uri."""
    return source_for(base).join(base, *parts)


def local_path(uri: str) -> str | None:
    """The path of ``uri`` on this machine, if it is one (else None: an object store)."""
    return source_for(uri).local_path(normalize(uri))


def list_objects(prefix: str, pattern: str | None = None, options: StorageOptions | None = None, *,
                 concurrency: int = 1) -> Iterator[Row]:
    """Listing rows of every object below ``prefix`` (see ``Source.list``)."""
    prefix = normalize(prefix)
    source = source_for(prefix)
    options = options or StorageOptions.resolve()
    if concurrency > 1:
        return source.list(prefix, pattern, options, concurrency=concurrency)
    return source.list(prefix, pattern, options)  # a source that cannot split its listing need not know


def stat_many(uris: list[str], options: StorageOptions | None = None) -> Iterator[Row]:
    """Listing rows of named objects, in order, each asked of its own source."""
    options = options or StorageOptions.resolve()
    rows: dict[int, Row] = {}
    for source, where in _by_source(uris).items():
        rows.update(zip(where, source.stat_many([uris[i] for i in where], options)))
    return (rows[i] for i in range(len(uris)))


def _by_source(uris: list[str]) -> dict[Source, list[int]]:
    groups: dict[Source, list[int]] = {}
    for i, u in enumerate(uris):
        groups.setdefault(source_for(u), []).append(i)
    return groups


def read_many(uris: list[str], options: StorageOptions | None = None, *, etags: list[str | None] | None = None,
              max_bytes: int | None = None) -> list[bytes | Exception]:
    """Read many objects; each result is the bytes or the exception it raised.

    Each uri names exactly one object: nothing is expanded as a pattern (``*``, ``?``, ``[``
    are ordinary characters in a key). With ``etags``, an object whose version is no longer
    the one given reads as ``ObjectChanged``, so the bytes read are always the bytes listed.
    With ``max_bytes``, an object larger than that reads as ``ObjectTooLarge`` after at most
    ``max_bytes + 1`` bytes.
    """
    uris = [normalize(u) for u in uris]
    etags = list(etags) if etags is not None else [None] * len(uris)
    options = options or StorageOptions.resolve()
    out: list[bytes | Exception] = [b""] * len(uris)
    for source, where in _by_source(uris).items():
        got = source.read_many([uris[i] for i in where], options, etags=[etags[i] for i in where], max_bytes=max_bytes)
        for i, value in zip(where, got):
            out[i] = value
    return out


def _one(name: str):
    def call(uri: str, *args, options: StorageOptions | None = None, **kwargs):
        uri = normalize(uri)
        return getattr(source_for(uri), name)(uri, *args, options or StorageOptions.resolve(), **kwargs)

    return call


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """Whole object or file as bytes."""
    return _one("read_bytes")(uri, options=options)


#: The cap ``read_input`` puts on a file an operator names, unless its caller sets another.
INPUT_MAX_BYTES = 64 * 2**20


class InputError(ValueError):
    """A file an operator named (a model card, a manifest, a report, a trust list, a config)
    is not one that can be read: missing, a folder, not a regular file, or too large."""


class InputMissing(InputError, FileNotFoundError):
    """The file an operator named does not exist."""


def read_input(uri: str, options: StorageOptions | None = None, *, what: str,
               max_bytes: int = INPUT_MAX_BYTES) -> bytes:
    """The bytes of a file an operator named (``what`` says which, for the error), read the
    way every such file is: a regular file or object only (a FIFO would block, ``/dev/zero``
    would never end, whatever a link points at), at most ``max_bytes``; ``InputError`` with
    one clear line otherwise. Never a pattern, never a folder."""
    uri = normalize(uri)
    (value,) = source_for(uri).read_many([uri], options or StorageOptions.resolve(), etags=[None],
                                         max_bytes=max_bytes)
    if not isinstance(value, Exception):
        return value
    shown = redact(uri)
    if isinstance(value, ObjectTooLarge):
        raise InputError(f"{what} {shown} is larger than {max_bytes} bytes, the most read for it") from None
    if isinstance(value, IsADirectoryError):
        raise InputError(f"{what} {shown} is a folder, not a file") from None
    if isinstance(value, (FileNotFoundError, NotADirectoryError)):
        raise InputMissing(f"{what} {shown} does not exist") from None
    if isinstance(value, PermissionError):
        raise InputError(f"{what} {shown} cannot be read: permission denied") from None
    if isinstance(value, NotARegularFile):
        raise InputError(f"{what} {shown} is not a regular file (a pipe, device or socket is never read)") from None
    raise value


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write bytes whole (local parent folders created; an S3 PUT)."""
    _one("write_bytes")(uri, data, options=options)


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Remove a file, or a folder with everything under it; nothing if it is not there."""
    _one("remove")(uri, options=options)


def prune(folder: str, options: StorageOptions | None = None) -> None:
    """Remove ``folder`` if it is empty (object stores have no empty folders)."""
    _one("prune")(folder, options=options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    return _one("exists")(uri, options=options)


def version(uri: str, options: StorageOptions | None = None) -> str:
    """An object's version: it changes whenever the object is written again."""
    return _one("version")(uri, options=options)


def files(folder: str, options: StorageOptions | None = None, *, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
    """(path relative to ``folder``, uri, version) of every object below it (``Source.files``)."""
    folder = normalize(folder)
    return source_for(folder).files(folder, options or StorageOptions.resolve(), skip=skip)


def list_names(folder: str, options: StorageOptions | None = None) -> list[str]:
    """Every file under ``folder``, as paths relative to it (none if it is not there)."""
    return sorted(rel for rel, _, _ in files(folder, options))


def move(source: str, target: str, options: StorageOptions | None = None) -> None:
    """Put the object at ``source`` at ``target`` in one step (both of one source)."""
    source, target = normalize(source), normalize(target)
    source_for(target).move(source, target, options or StorageOptions.resolve())


def arrow_filesystem(uri: str, options: StorageOptions | None = None):
    """(pyarrow filesystem, path inside it) for a uri."""
    return _one("arrow_filesystem")(uri, options=options)


def arrow_paths(uris: list[str], options: StorageOptions | None = None):
    """(one pyarrow filesystem, each uri's path in it), for uris of one source."""
    fs, _ = arrow_filesystem(uris[0], options)
    return fs, [source_for(u).arrow_path(normalize(u)) for u in uris]


def create(uri: str, data: bytes, options: StorageOptions | None = None) -> tuple[bool, str | None]:
    """Write only if nothing is there: (written, version token)."""
    return _one("create")(uri, data, options=options)


def replace(uri: str, data: bytes, token: str | None, options: StorageOptions | None = None) -> tuple[bool, str | None]:
    """Overwrite only if still the version ``token`` names: (written, new token)."""
    return _one("replace")(uri, data, token, options=options)


def read_versioned(uri: str, options: StorageOptions | None = None) -> tuple[bytes | None, str | None]:
    """(bytes, version token), or (None, None) when nothing is there."""
    return _one("read_versioned")(uri, options=options)


def redact(text: str) -> str:
    """``text`` without the credentials in use or anything that looks like one (``ntf_ray.storage.redaction``)."""
    from ntf_ray.storage.redaction import redact as redacted

    return redacted(text)


def read_error(exc: BaseException) -> str:
    """The ``read:`` error of one object, as a scan row, a score line or a log says it.

    One line of at most 200 characters, without secrets; a missing object reads as such,
    since between a listing and its read it most likely was deleted.
    """
    if isinstance(exc, FileNotFoundError):
        return error(READ, "not found (deleted after listing?)")
    if isinstance(exc, ObjectChanged):
        return error(READ, "changed after listing")
    if isinstance(exc, IsADirectoryError):
        return error(READ, "a folder, not a file")
    if isinstance(exc, NotARegularFile):
        return error(READ, "not a regular file (a pipe, device or socket is never read)")
    # no endpoint in a row or a log: "Could not connect to the endpoint URL: http://minio.internal:9000/..."
    message = re.sub(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", "<endpoint>", " ".join(redact(str(exc)).split()))
    text = error(READ, f"{type(exc).__name__}: {message}") if message else error(READ, f"{type(exc).__name__}")
    return text if len(text) <= 200 else text[:197] + "..."


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[memoryview | None]:
    """Each value of a binary column as a memoryview into Arrow's buffer, not a copy (None for nulls).

    A batch of 256 photos is about 100 MB: ``to_pylist`` would copy it once more under the GIL.
    """
    out: list[memoryview | None] = []
    for arr in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
            raise TypeError(f"expected a binary column, got {arr.type}")
        _, offsets_buf, data_buf = arr.buffers()
        width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        offsets = np.frombuffer(offsets_buf, width)[arr.offset : arr.offset + len(arr) + 1].tolist() if len(arr) else []
        # Arrow exports its buffers as signed chars ("b"): b"\xff" would not compare equal to them
        data = memoryview(data_buf).cast("B") if data_buf is not None else memoryview(b"")
        valid = arr.is_valid().to_pylist() if arr.null_count else [True] * len(arr)
        out.extend(data[offsets[k] : offsets[k + 1]] if valid[k] else None for k in range(len(arr)))
    return out
