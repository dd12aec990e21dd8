"""What one kind of storage must do for ntf-ray (``Source``), and the values every kind shares.

A source owns the uris of one scheme (``s3://``, local paths, ...). The scan lists a prefix
with it, reads many objects with their versions and a size cap, and writes its table, index
and lease through it; nothing outside a source asks which kind a uri is. A new kind of input
is one module: a ``Source`` subclass, registered with ``ntf_ray.storage.register``.

Every uri names exactly one object: a source never expands a key or path as a pattern.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives. Credentials are deliberately not fields: they stay in the AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, endpoint_url: str | None = None, region: str | None = None) -> StorageOptions:
        """Explicit values win over ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_REGION``."""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint_url=endpoint or None, region=region or None)


class ObjectChanged(OSError):
    """The object read is not the one listed: another etag (S3) or size, time or inode (local)."""


class ObjectTooLarge(OSError):
    """The object holds more bytes than the reader's cap."""


class NotARegularFile(OSError):
    """A name that is a pipe, a device or a socket: reading it would block or never end."""


class Unsupported(ValueError):
    """What this kind of storage cannot do (a read-only input asked to hold an output)."""


#: A listing row: ``uri``, ``etag`` (the version a read must find), ``size_bytes``,
#: ``last_modified`` (a UTC datetime or None) and, where the source refuses the object, a
#: ``listing_error`` that becomes the object's error row (it is then never read).
Row = dict[str, Any]


def error_row(uri: str, error: str) -> Row:
    """The listing row of an object a source refuses (``error`` becomes its row's error).

    A stable etag (a digest of uri and reason): moderate matches rows on (uri, etag, ...), and a
    null never matches, so the same refusal would be written again on every run."""
    etag = "listing-" + hashlib.sha256(f"{uri}\n{error}".encode("utf-8", "backslashreplace")).hexdigest()[:24]
    return {"uri": uri, "etag": etag, "size_bytes": None, "last_modified": None, "listing_error": error}


def matches(name: str, pattern: str | None) -> bool:
    """Whether an object's name matches a listing's ``--glob`` (case-insensitive)."""
    return pattern is None or fnmatch.fnmatch(name.lower(), pattern.lower())


class Source:
    """One kind of storage. Subclasses set ``scheme`` and implement what their uris support;
    the defaults say what a read-only input needs no more than (listing and reading)."""

    #: ``NAME`` of ``NAME://...`` uris; local paths are the ``file`` source's.
    scheme: str = ""

    # ---- names
    def normalize(self, uri: str) -> str:
        """The canonical form of a uri of this source (a clear error for a malformed one)."""
        return uri

    def join(self, base: str, *parts: str) -> str:
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out

    def local_path(self, uri: str) -> str | None:
        """The path of ``uri`` on this machine, where it is one (a folder a library can write to)."""
        return None

    # ---- inputs: what a scan needs
    def list(self, prefix: str, pattern: str | None, options: StorageOptions, *, concurrency: int = 1) -> Iterator[Row]:
        """Every object below ``prefix`` (a folder-like prefix) whose name matches ``pattern``
        (``fnmatch``, case-insensitive, on the last part), as listing rows, page by page;
        ``concurrency``: listers at once, where the source can split its listing."""
        raise Unsupported(f"{self.scheme}:// cannot be listed")

    def stat_many(self, uris: list[str], options: StorageOptions) -> Iterator[Row]:
        """Listing rows for named objects (a manifest's); one that is not there gets a row
        with a null etag (its read then says why)."""
        for uri in uris:
            yield {"uri": uri, "etag": None, "size_bytes": None, "last_modified": None}

    def read_many(self, uris: list[str], options: StorageOptions, *, etags: list[str | None],
                  max_bytes: int | None) -> list[bytes | Exception]:
        """Each object's bytes, or the exception its read raised: ``ObjectChanged`` when its
        version is no longer ``etags[i]`` (when given), ``ObjectTooLarge`` past ``max_bytes``
        (after at most ``max_bytes + 1`` bytes), ``FileNotFoundError`` when it is gone."""
        raise Unsupported(f"{self.scheme}:// cannot be read")

    #: Read failures that trying again cannot mend: the object's row says so at once (the
    #: others are retried a few times, then written as ``read:`` rows a later run retries).
    final_errors: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                     ObjectChanged, ObjectTooLarge)

    # ---- outputs: what the score table, its index and its lease need
    def read_bytes(self, uri: str, options: StorageOptions) -> bytes:
        (value,) = self.read_many([uri], options, etags=[None], max_bytes=None)
        if isinstance(value, Exception):
            raise value
        return value

    def write_bytes(self, uri: str, data: bytes, options: StorageOptions) -> None:
        """Write ``data`` whole: readers see the old object or the new one, never a part."""
        raise Unsupported(f"{self.scheme}:// cannot be written")

    def remove(self, uri: str, options: StorageOptions) -> None:
        """Remove an object, or a folder with everything below it; nothing if it is not there."""
        raise Unsupported(f"{self.scheme}:// cannot be written")

    def prune(self, folder: str, options: StorageOptions) -> None:
        """Remove ``folder`` if nothing is left in it (object stores have no empty folders)."""

    def files(self, folder: str, options: StorageOptions, *, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
        """(path relative to ``folder``, uri, version) of every object below ``folder``; folders
        whose name starts with one of ``skip`` are left out. The version changes whenever the
        object is written again (an S3 ETag; a local file's size, times and inode)."""
        raise Unsupported(f"{self.scheme}:// cannot be listed")

    def version(self, uri: str, options: StorageOptions) -> str:
        """The version ``files`` gives for one object."""
        raise Unsupported(f"{self.scheme}:// has no versions")

    def exists(self, uri: str, options: StorageOptions) -> bool:
        return any(row["etag"] is not None for row in self.stat_many([uri], options))

    def move(self, source: str, target: str, options: StorageOptions) -> None:
        """Put the object ``source`` at ``target`` in one step (readers see it whole or not at all)."""
        raise Unsupported(f"{self.scheme}:// cannot be written")

    def arrow_filesystem(self, uri: str, options: StorageOptions):
        """(pyarrow filesystem, path inside it), for readers and writers of Parquet."""
        raise Unsupported(f"{self.scheme}:// has no pyarrow filesystem")

    def arrow_path(self, uri: str) -> str:
        """The path of ``uri`` inside the filesystem ``arrow_filesystem`` gives."""
        raise Unsupported(f"{self.scheme}:// has no pyarrow filesystem")

    # ---- leases: writes that fail when another writer came first
    def create(self, uri: str, data: bytes, options: StorageOptions) -> tuple[bool, str | None]:
        """Write ``data`` only if nothing is at ``uri``: (written, version token)."""
        raise Unsupported(f"{self.scheme}:// has no conditional writes")

    def replace(self, uri: str, data: bytes, token: str | None, options: StorageOptions) -> tuple[bool, str | None]:
        """Overwrite ``uri`` only if it is still the version ``token`` names: (written, new token).
        A source without versions (one machine's files) writes, last writer wins."""
        raise Unsupported(f"{self.scheme}:// has no conditional writes")

    def read_versioned(self, uri: str, options: StorageOptions) -> tuple[bytes | None, str | None]:
        """(bytes, version token), or (None, None) when nothing is there."""
        try:
            return self.read_bytes(uri, options), None
        except FileNotFoundError:
            return None, None
