"""Listing the objects to scan (a prefix of any source, or a manifest's uris) into the listing
table, chunk by chunk as the source pages in.

Every object found gets a row, and only objects found: what a source refuses (a local file
whose name is not UTF-8, a symbolic link out of the folder, ...) gets a row with
``listing_error`` (written as the row's error), so nothing is silently left out
(``ntf_ray.storage.local``, ``ntf_ray.storage.s3``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.scan.table import LISTING_SCHEMA
from ntf_ray.storage import StorageOptions
from ntf_ray.storage.source import matches

if TYPE_CHECKING:
    from ntf_ray.scan.spec import ScanSpec

log = logging.getLogger(__package__)


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


def _table_chunks(tables: Iterator[pa.Table], limit: int | None, chunk: int) -> Iterator[pa.Table]:
    left = limit
    for table in tables:
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        for start in range(0, table.num_rows, chunk):
            yield table.slice(start, chunk)
        if left == 0:
            return


def iter_listing(spec: ScanSpec, options: StorageOptions, chunk: int = 10_000,
                 map_files: Callable | None = None) -> Iterator[pa.Table]:
    """The objects to scan as Arrow tables of at most ``chunk`` rows (uri, etag, size_bytes,
    last_modified, listing_error), as the listing pages in: the caller decides what to keep.
    ``map_files``: how an inventory's data files are read (``scan.inventory.MapFiles``).
    """
    if sum(x is not None for x in (spec.input, spec.manifest, spec.inventory)) != 1:
        raise ValueError("give exactly one of an input prefix/folder, a manifest or an inventory")
    if spec.inventory is not None:
        from ntf_ray.scan.inventory import iter_inventory

        tables = iter_inventory(spec.inventory, options, pattern=spec.pattern, map_files=map_files or map)
        yield from _table_chunks(tables, spec.limit, chunk)
        return
    if spec.manifest is not None:
        from ntf_ray.training.datasets import read_manifest

        uris = [storage.normalize(u) for u in read_manifest(spec.manifest, options, uris_only=True).column("uri").to_pylist()]
        uris = [u for u in uris if matches(u.rsplit("/", 1)[-1], spec.pattern)]
        unique = list(dict.fromkeys(uris))  # one row per object, however often the manifest names it
        if len(unique) < len(uris):
            log.warning("the manifest names %d objects more than once; each is scored once", len(uris) - len(unique))
        yield from _chunks(storage.stat_many(unique[: spec.limit] if spec.limit is not None else unique, options),
                           None, chunk)
        return
    rows = storage.list_objects(spec.input, spec.pattern, options, concurrency=spec.list_concurrency)
    yield from _chunks(rows, spec.limit, chunk)


def list_objects(spec: ScanSpec, options: StorageOptions) -> pa.Table:
    """The whole listing as one Arrow table (see ``iter_listing``)."""
    tables = list(iter_listing(spec, options))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
