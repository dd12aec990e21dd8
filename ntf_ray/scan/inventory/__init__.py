"""Scanning from an S3 Inventory report instead of listing the bucket.

Large buckets are not listed: S3 writes a daily or weekly **inventory** of every object, data
files (CSV, ORC or Parquet) behind a ``manifest.json``. ``--inventory MANIFEST`` reads those
files and gives the scan its listing rows with no LIST or HEAD call: ``s3://SOURCE/KEY``, the
ETag, the size and the last-modified time. Delete markers and versions that are not the latest
are left out (the scan reads an object's latest version); an empty ``folder/`` marker is left
out as a listing leaves it out. CSV keys are URL-encoded by AWS and decoded here; Parquet and ORC keys are not.

**A report stays inside what it inventories.** Whoever can write the report's destination
(S3 lets another account) writes its manifest and data files, so nothing in them may send the
scan elsewhere:

- The manifest is read with the guarded reader (a regular file or object, at most
  ``MANIFEST_MAX_BYTES``). Its ``sourceBucket`` is required and must be a name S3 gives a
  bucket (``check_bucket_name``).
- Every row's ``Bucket`` must be that ``sourceBucket``. A row naming another bucket (or none)
  refuses the **whole report** with one error naming the data file and the first such bucket,
  not an error row per object: S3 Inventory never lists another bucket, so such a row shows
  the report was not written by it or was changed since, and then none of its rows can be
  trusted (the rows of the source bucket beside it are the forger's choice too). Error rows
  would also publish a run that looks complete, write another bucket's object names into the
  table and its review pages, and come back on every run; a refused report costs one line
  and exit status 2, as an MD5 mismatch does.
- Data files are read beside the manifest, never where the manifest says: a manifest at
  ``.../CONFIG/DATE/manifest.json`` reads an entry ``.../data/NAME`` from ``.../CONFIG/data/NAME``
  in the same bucket (or, for a local copy of a report, the same folder), as S3 Inventory lays
  a report out. ``destinationBucket`` is not used; an entry that is not ``.../data/NAME``
  (``NAME`` a plain file name) is refused.
- Each data file's ``MD5checksum`` is required and checked before a row of it is used; a
  manifest without one for a file is refused unless the run allows unchecked files
  (``--allow-unchecked-inventory``). The MD5 shows a file is whole, not that it is harmless:
  the same writer writes the manifest.

**A data file is bounded** whatever it declares (``Limits``, ``data_files``): it is read whole
(at most ``max_bytes`` stored bytes) and checked against the manifest, then every format is
counted in a first pass that holds one piece or batch at a time, before a listing row of it is
built: CSV (gzip or plain) is inflated a MiB at a time, its bytes and lines counted, then parsed
by pyarrow's streaming CSV reader; Parquet's declared rows and uncompressed column sizes are
checked before a row is read, then its batches are counted with their strings still
dictionary-encoded (a few values may stand for any number of rows); ORC's declared rows are
checked before a row is read, then its batches are counted as they are read (ORC declares no
uncompressed sizes). More than ``max_bytes`` inflated or ``max_rows`` rows is refused with one
line naming the file and the option that raises the cap. So a bomb costs one batch, and a task
holds at most one file and its listing rows, whatever the report's size. A file that does not
parse is named, never quoted (its bytes are the writer's).

The package: ``manifest`` (what a report names and where its files are), ``data_files``
(reading one within its caps), ``rows`` (a batch as listing rows), and here the listing of a
whole report, a data file at a time.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow as pa

from ntf_ray.scan.inventory.data_files import batches, read_checked
from ntf_ray.scan.inventory.manifest import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    DataFile,
    Inventory,
    InventoryError,
    Limits,
    check_bucket_name,
    read_inventory,
)
from ntf_ray.scan.inventory.rows import listing_rows, url_decoded
from ntf_ray.scan.table import LISTING_SCHEMA
from ntf_ray.storage import StorageOptions

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ROWS", "DataFile", "Inventory", "InventoryError", "Limits", "MapFiles",
           "check_bucket_name", "iter_inventory", "read_inventory", "rows_of"]


def rows_of(inventory: Inventory, file: DataFile, options: StorageOptions, *, limits: Limits = Limits(),
            pattern: str | None = None) -> pa.Table:
    """One data file's listing rows (``LISTING_SCHEMA``), read a batch at a time within ``limits``."""
    data = read_checked(file, options, limits)
    parts = []
    try:
        for batch in batches(inventory, data, file.uri, limits):
            table = pa.Table.from_batches([batch])
            if inventory.file_format == "CSV":
                table = url_decoded(table)
            parts.append(listing_rows(table, file.uri, pattern, inventory.source_bucket))
    except InventoryError:
        raise
    except (pa.ArrowException, OSError, EOFError, ValueError, zlib.error) as exc:
        # The library's message may quote the file's bytes (a row, a value): its kind only.
        raise InventoryError(f"{file.uri} is not a readable {inventory.file_format} inventory data file "
                             f"({type(exc).__name__})") from None
    return pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()


#: How an inventory's data files are read: ``map_files(read, files)`` yields ``read(file)`` for
#: each file, in order. The default reads them here, one after the other; the Ray edge passes
#: one that reads them in Ray tasks, several at once.
MapFiles = Callable[[Callable[[DataFile], pa.Table], Sequence[DataFile]], Iterable[pa.Table]]


def iter_inventory(manifest: str, options: StorageOptions, *, pattern: str | None = None,
                   map_files: MapFiles = map, keep: Callable[[pa.Table], pa.Table] | None = None,
                   limits: Limits = Limits()) -> Iterator[tuple[int, pa.Table]]:
    """(rows listed, the rows ``keep`` kept of them) of every data file of an inventory, a
    file at a time, in the manifest's order; ``keep`` runs where the file is read."""
    inventory = read_inventory(manifest, options, limits=limits)
    yield from map_files(functools.partial(_file_rows, inventory, options, pattern, keep, limits), inventory.files)


def _file_rows(inventory: Inventory, options: StorageOptions, pattern: str | None,
               keep: Callable[[pa.Table], pa.Table] | None, limits: Limits, file: DataFile) -> tuple[int, pa.Table]:
    rows = rows_of(inventory, file, options, limits=limits, pattern=pattern)
    return rows.num_rows, (rows if keep is None else keep(rows))
