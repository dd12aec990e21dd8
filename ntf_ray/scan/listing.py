"""Listing the objects to scan (a prefix of any source, or a manifest's uris) into the listing
table, chunk by chunk as the source pages in.

Every object found gets a row, and only objects found: what a source refuses (a local file
whose name is not UTF-8, a symbolic link out of the folder, ...) gets a row with
``listing_error`` (written as the row's error), so nothing is silently left out
(``ntf_ray.storage.local``, ``ntf_ray.storage.s3``).
"""

from __future__ import annotations

import functools
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


#: What a listing keeps of each table of rows it reads (``keep(rows) -> rows``): the objects not
#: scored yet, in ``moderate``. Applied where the rows are read: an inventory's data file in its
#: Ray task, so that what is skipped never reaches the driver.
Keep = Callable[[pa.Table], pa.Table]


def iter_listing(spec: ScanSpec, options: StorageOptions, chunk: int = 10_000,
                 map_files: Callable | None = None) -> Iterator[pa.Table]:
    """The objects to scan as Arrow tables of at most ``chunk`` rows (uri, etag, size_bytes,
    last_modified, listing_error), as the listing pages in: the caller decides what to keep.
    ``map_files``: how an inventory's data files, and a manifest's objects, are read (a Ray
    task each, in the scan; ``scan.inventory.MapFiles``).
    """
    for _, rows in iter_kept(spec, options, chunk=chunk, map_files=map_files):
        yield rows


def iter_kept(spec: ScanSpec, options: StorageOptions, *, keep: Keep | None = None, chunk: int = 10_000,
              map_files: Callable | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(objects listed, the rows of them ``keep`` kept) as the listing pages in; tables of at most ``chunk`` rows.

    With ``--limit``, the limit counts objects listed, and ``keep`` runs here, after it.
    """
    if sum(x is not None for x in (spec.input, spec.manifest, spec.inventory)) != 1:
        raise ValueError("give exactly one of an input prefix/folder, a manifest or an inventory")
    map_files = map_files or map
    if spec.inventory is not None:
        from ntf_ray.scan.inventory import Limits, iter_inventory

        limits = Limits(max_bytes=spec.inventory_max_bytes, max_rows=spec.inventory_max_rows,
                        allow_unchecked=spec.allow_unchecked_inventory)
        if keep is not None and spec.limit is None:  # each data file kept in its own task
            tables = iter_inventory(spec.inventory, options, pattern=spec.pattern, map_files=map_files, keep=keep,
                                    limits=limits)
            for listed, table in tables:
                parts = [table.slice(start, chunk) for start in range(0, table.num_rows, chunk)] or [table]
                for i, part in enumerate(parts):
                    yield (listed if i == 0 else 0), part
            return
        tables = (t for _, t in iter_inventory(spec.inventory, options, pattern=spec.pattern, map_files=map_files,
                                               limits=limits))
        yield from _kept(_table_chunks(tables, spec.limit, chunk), keep)
        return
    if spec.manifest is not None:
        from ntf_ray.training.datasets import read_manifest

        uris = [storage.normalize(u) for u in read_manifest(spec.manifest, options, uris_only=True).column("uri").to_pylist()]
        uris = [u for u in uris if matches(u.rsplit("/", 1)[-1], spec.pattern)]
        unique = list(dict.fromkeys(uris))  # one row per object, however often the manifest names it
        if len(unique) < len(uris):
            log.warning("the manifest names %d objects more than once; each is scored once", len(uris) - len(unique))
        del uris
        if spec.limit is not None:
            unique = unique[: spec.limit]
        groups = [unique[start:start + STAT_GROUP] for start in range(0, len(unique), STAT_GROUP)]
        del unique
        stat = functools.partial(_stat_group, options, storage.sources())
        yield from _kept((t for table in map_files(stat, groups) for t in _table_chunks([table], None, chunk)), keep)
        return
    rows = storage.list_objects(spec.input, spec.pattern, options, concurrency=spec.list_concurrency)
    yield from _kept(_chunks(rows, spec.limit, chunk), keep)


def _kept(tables: Iterator[pa.Table], keep: Keep | None) -> Iterator[tuple[int, pa.Table]]:
    for table in tables:
        yield table.num_rows, (table if keep is None else keep(table))


#: Objects of a manifest HEAD-ed in one Ray task (each a HEAD request of its own).
STAT_GROUP = 1000


def _stat_group(options: StorageOptions, sources: list, uris: list[str]) -> pa.Table:
    """Listing rows of named objects (``storage.stat_many``), in a Ray task: the driver's
    registered sources registered here first."""
    for source in sources:
        storage.register(source)
    rows = list(storage.stat_many(uris, options))
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA) if rows else LISTING_SCHEMA.empty_table()


def list_objects(spec: ScanSpec, options: StorageOptions) -> pa.Table:
    """The whole listing as one Arrow table (see ``iter_listing``)."""
    tables = list(iter_listing(spec, options))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
