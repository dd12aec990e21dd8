"""Listing the objects to scan (a local folder, an S3 prefix or a manifest's uris) into the
listing table.

Every object found gets a row, and only objects found: a local file whose name is not
UTF-8, a symbolic link that leads out of the folder and a subfolder that cannot be read get
a row with ``listing_error`` (written as the row's error), so nothing is silently left out
and nothing outside the input is read. Hidden files and folders (``.git/``) are skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.scan.table import LISTING_SCHEMA
from ntf_ray.storage import StorageOptions

if TYPE_CHECKING:
    from ntf_ray.scan.spec import ScanSpec

log = logging.getLogger(__package__)


def _local_row(uri: str, st: os.stat_result) -> dict:
    """A listing row for a local file."""
    return {"uri": uri, "etag": storage.local_etag(st), "size_bytes": st.st_size,
            "last_modified": dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.timezone.utc)}


def _error_row(uri: str, error: str) -> dict:
    # A stable etag (a digest of uri and reason): moderate matches rows on (uri, etag, ...), and a
    # null never matches, so the same refusal would be written again on every run.
    etag = "listing-" + hashlib.sha256(f"{uri}\n{error}".encode("utf-8", "backslashreplace")).hexdigest()[:24]
    return {"uri": uri, "etag": etag, "size_bytes": None, "last_modified": None, "listing_error": error}


def _printable(path: str) -> str:
    """A path that is valid UTF-8 whatever bytes its name holds (invalid bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes over as surrogates
        return False
    return True


def _matches(name: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatch(name.lower(), pattern.lower())


def _iter_local(root: str, pattern: str | None) -> Iterator[dict]:
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
            yield _error_row(_printable(os.path.abspath(folder)) + os.sep,
                             f"read: cannot list this folder ({type(exc).__name__}); its files are not scanned")
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            uri = os.path.abspath(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                if not _matches(e.name, pattern):
                    continue
                if not _is_utf8(uri):
                    yield _error_row(_printable(uri), "unsupported_name: the file name is not valid UTF-8")
                elif e.is_symlink():  # followed to a file inside the folder only; folders behind links are not
                    target = os.path.realpath(uri)
                    if os.path.commonpath([target, real_root]) != real_root:
                        yield _error_row(uri, "unsupported_name: a symbolic link that leads outside the input folder")
                    elif os.path.isfile(target):
                        yield _local_row(uri, os.stat(target))
                    elif not os.path.isdir(target):
                        yield _error_row(uri, "read: a symbolic link to no regular file")
                elif e.is_file(follow_symlinks=False):  # never a FIFO, socket or device: reading one can block
                    yield _local_row(uri, e.stat(follow_symlinks=False))
            except OSError as exc:
                yield _error_row(_printable(uri), f"read: cannot stat ({type(exc).__name__})")


def _iter_s3(prefix: str, pattern: str | None, options: StorageOptions) -> Iterator[dict]:
    bucket, _ = storage.split_s3(prefix)
    for obj in storage.list_s3(prefix, options):
        if _matches(obj["key"].rstrip("/").rsplit("/", 1)[-1], pattern):
            yield {"uri": f"s3://{bucket}/{obj['key']}", "etag": obj["etag"], "size_bytes": obj["size"],
                   "last_modified": obj["last_modified"]}


def _stat_many(uris: list[str], options: StorageOptions) -> Iterator[dict]:
    """Listing rows for the uris of a manifest; a missing object still gets a row (its read fails)."""
    remote = [u for u in uris if storage.is_s3(u)]
    infos: dict[str, Any] = {}
    if remote:
        from fsspec.asyn import sync

        fs = storage.fsspec_filesystem(options)

        async def info(u: str):
            try:
                return await fs._info(u)
            except (OSError, ValueError) as exc:
                return exc

        for start in range(0, len(remote), 1000):
            chunk = remote[start : start + 1000]
            results = sync(fs.loop, asyncio.gather, *[info(u) for u in chunk])
            infos.update(zip(chunk, results))
    for u in uris:
        if storage.is_s3(u):
            i = infos[u]
            if isinstance(i, Exception):
                yield {"uri": u, "etag": None, "size_bytes": None, "last_modified": None}
            else:
                yield {"uri": u, "etag": str(i.get("ETag", "")).strip('"'), "size_bytes": int(i.get("size", 0)),
                       "last_modified": i.get("LastModified")}
        else:
            try:
                yield _local_row(u, os.stat(u))
            except OSError:
                yield {"uri": u, "etag": None, "size_bytes": None, "last_modified": None}


def _chunks(rows: Iterator[dict], limit: int | None, chunk: int) -> Iterator[pa.Table]:
    buf: list[dict] = []
    for n, row in enumerate(rows, 1):
        buf.append(row)
        if len(buf) >= chunk:
            yield pa.Table.from_pylist(buf, schema=LISTING_SCHEMA)
            buf = []
        if limit is not None and n >= limit:
            break
    if buf:
        yield pa.Table.from_pylist(buf, schema=LISTING_SCHEMA)


def iter_listing(spec: ScanSpec, options: StorageOptions, chunk: int = 10_000) -> Iterator[pa.Table]:
    """The objects to scan as Arrow tables of at most ``chunk`` rows (uri, etag, size_bytes,
    last_modified, listing_error), as the listing pages in: the caller decides what to keep."""
    if (spec.input is None) == (spec.manifest is None):
        raise ValueError("give exactly one of an input prefix/folder or a manifest")
    if spec.manifest is not None:
        from ntf_ray.training.datasets import read_manifest

        uris = [storage.normalize(u) for u in read_manifest(spec.manifest, options, uris_only=True).column("uri").to_pylist()]
        uris = [u for u in uris if _matches(u.rsplit("/", 1)[-1], spec.pattern)]
        unique = list(dict.fromkeys(uris))  # one row per object, however often the manifest names it
        if len(unique) < len(uris):
            log.warning("the manifest names %d objects more than once; each is scored once", len(uris) - len(unique))
        yield from _chunks(_stat_many(unique[: spec.limit] if spec.limit is not None else unique, options), None, chunk)
        return
    root = storage.normalize(spec.input)
    if storage.is_s3(root):
        bucket, key = storage.split_s3(root)
        prefix = f"s3://{bucket}/{key.rstrip('/') + '/' if key else ''}"
        yield from _chunks(_iter_s3(prefix, spec.pattern, options), spec.limit, chunk)
        return
    if not Path(root).is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    yield from _chunks(_iter_local(root, spec.pattern), spec.limit, chunk)


def list_objects(spec: ScanSpec, options: StorageOptions) -> pa.Table:
    """The whole listing as one Arrow table (see ``iter_listing``)."""
    tables = list(iter_listing(spec, options))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
