"""Listing the objects to scan (a local folder, an S3 prefix or a manifest's uris) into the
listing table."""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.ray_scan.table import LISTING_SCHEMA
from ntf_ray.storage import StorageOptions

if TYPE_CHECKING:
    from ntf_ray.ray_scan import ScanSpec


def _local_etag(size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{size}:{mtime_ns}".encode()).hexdigest()[:32]


def _local_row(uri: str, st: os.stat_result) -> dict:
    """A listing row for a local file; its etag is a digest of size and mtime."""
    return {"uri": uri, "etag": _local_etag(st.st_size, st.st_mtime_ns), "size_bytes": st.st_size,
            "last_modified": dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.timezone.utc)}


def _matches(name: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatch(name.lower(), pattern.lower())


def _iter_local(root: str, pattern: str | None) -> Iterator[dict]:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file() and not e.name.startswith(".") and _matches(e.name, pattern):
                    yield _local_row(os.path.abspath(e.path), e.stat())


def _iter_s3(prefix: str, pattern: str | None, options: StorageOptions) -> Iterator[dict]:
    """Paginated ListObjectsV2: one page (up to 1,000 keys) in memory at a time."""
    from fsspec.asyn import sync

    fs = storage.fsspec_filesystem(options)
    bucket, key = storage.split_s3(prefix)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if obj["Key"].endswith("/") or not _matches(name, pattern):
                continue
            yield {"uri": f"s3://{bucket}/{obj['Key']}", "etag": obj.get("ETag", "").strip('"'),
                   "size_bytes": int(obj.get("Size", 0)), "last_modified": obj.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


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


def _to_table(rows: Iterator[dict], limit: int | None, chunk: int = 10_000) -> pa.Table:
    batches, buf, n = [], [], 0
    for row in rows:
        buf.append(row)
        n += 1
        if len(buf) >= chunk:
            batches.append(pa.RecordBatch.from_pylist(buf, schema=LISTING_SCHEMA))
            buf = []
        if limit is not None and n >= limit:
            break
    if buf:
        batches.append(pa.RecordBatch.from_pylist(buf, schema=LISTING_SCHEMA))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)


def list_objects(spec: ScanSpec, options: StorageOptions) -> pa.Table:
    """The objects to scan as an Arrow table (uri, etag, size_bytes, last_modified)."""
    if (spec.input is None) == (spec.manifest is None):
        raise ValueError("give exactly one of an input prefix/folder or a manifest")
    if spec.manifest is not None:
        from ntf_ray.datasets import read_manifest

        uris = [storage.normalize(u) for u in read_manifest(spec.manifest, options).column("uri").to_pylist()]
        uris = [u for u in uris if _matches(u.rsplit("/", 1)[-1], spec.pattern)]
        if spec.limit is not None:
            uris = uris[: spec.limit]
        return _to_table(_stat_many(uris, options), None)
    root = storage.normalize(spec.input)
    if storage.is_s3(root):
        bucket, key = storage.split_s3(root)
        prefix = f"s3://{bucket}/{key.rstrip('/') + '/' if key else ''}"
        return _to_table(_iter_s3(prefix, spec.pattern, options), spec.limit)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    return _to_table(_iter_local(root, spec.pattern), spec.limit)
