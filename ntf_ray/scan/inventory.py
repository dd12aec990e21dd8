"""Scanning from an S3 Inventory report instead of listing the bucket.

Large buckets are not listed: S3 writes a daily or weekly **inventory** of every object, data
files (CSV, ORC or Parquet) behind a ``manifest.json``. ``--inventory MANIFEST`` reads those
files and gives the scan its listing rows with no LIST or HEAD call: ``s3://SOURCE/KEY``, the
ETag, the size and the last-modified time. Delete markers and versions that are not the latest
are left out (the scan reads an object's latest version); an empty ``folder/`` marker is left
out as a listing leaves it out. CSV keys are URL-encoded by AWS and decoded here; Parquet and ORC keys are not.

The manifest names its data files by key in the destination bucket. A manifest on S3 reads
them there; a local copy of a report (``.../CONFIG/YYYY-MM-DDTHH-MMZ/manifest.json`` beside
``.../CONFIG/data/``) reads them from the ``data`` folder next to the manifest's own folder.
Each data file's MD5 is checked against the manifest's before a row of it is used.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray import storage
from ntf_ray.scan.table import LISTING_SCHEMA
from ntf_ray.storage import StorageOptions
from ntf_ray.storage.source import matches

FORMATS = ("CSV", "Parquet", "ORC")
#: The fields a listing row needs, as the manifest's fileSchema names them (CSV) and as
#: Parquet and ORC name their columns.
NEEDED = {"Bucket": "bucket", "Key": "key", "Size": "size", "LastModifiedDate": "last_modified_date",
          "ETag": "e_tag"}
OPTIONAL = {"IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker", "VersionId": "version_id"}


class InventoryError(ValueError):
    """A manifest or data file that is not an S3 Inventory report this reader can use."""


@dataclass(frozen=True)
class Inventory:
    """What a ``manifest.json`` says: the format, the CSV fields, and each data file's uri and MD5."""

    manifest: str
    file_format: str
    fields: tuple[str, ...]  # CSV columns in order (Parquet and ORC carry their own names)
    files: tuple[tuple[str, str | None], ...]  # (uri, md5) of each data file


def read_inventory(manifest: str, options: StorageOptions) -> Inventory:
    """Parse an inventory's ``manifest.json`` (local or ``s3://``)."""
    manifest = storage.normalize(manifest)
    try:
        doc = json.loads(storage.read_bytes(manifest, options))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(f"{manifest} is not an S3 Inventory manifest.json ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise InventoryError(f"{manifest} is not an S3 Inventory manifest.json (no 'files' list)")
    file_format = str(doc.get("fileFormat", ""))
    canonical = {f.lower(): f for f in FORMATS}.get(file_format.lower())
    if canonical is None:
        raise InventoryError(f"{manifest}: fileFormat {file_format!r} is not one of {', '.join(FORMATS)}")
    fields: tuple[str, ...] = ()
    if canonical == "CSV":
        fields = tuple(f.strip() for f in str(doc.get("fileSchema", "")).split(","))
        missing = [f for f in NEEDED if f not in fields]
        if missing:
            raise InventoryError(f"{manifest}: its CSV fileSchema lacks {', '.join(missing)}")
    destination = str(doc.get("destinationBucket", ""))
    bucket = destination.rsplit(":", 1)[-1]  # "arn:aws:s3:::name" -> "name"
    local = storage.local_path(manifest)
    files = []
    for entry in doc["files"]:
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key:
            raise InventoryError(f"{manifest}: a 'files' entry without a key")
        if local is not None:
            # a local copy: CONFIG/DATE/manifest.json beside CONFIG/data/FILE
            uri = str(PurePosixPath(local).parent.parent / "data" / PurePosixPath(key).name)
        elif bucket:
            uri = f"s3://{bucket}/{key}"
        else:
            raise InventoryError(f"{manifest}: no destinationBucket to read its data files from")
        md5 = entry.get("MD5checksum")
        files.append((uri, md5 if isinstance(md5, str) else None))
    return Inventory(manifest, canonical, fields, tuple(files))


def _table(inventory: Inventory, data: bytes, uri: str) -> pa.Table:
    """A data file's rows with the columns of ``NEEDED``/``OPTIONAL`` (Parquet/ORC names)."""
    if inventory.file_format == "CSV":
        import pyarrow.csv as pacsv

        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        if not raw.strip():  # a report of an empty bucket
            return pa.table({c: pa.array([], pa.string()) for c in NEEDED.values()})
        names = [NEEDED.get(f) or OPTIONAL.get(f) or f"_{i}" for i, f in enumerate(inventory.fields)]
        table = pacsv.read_csv(io.BytesIO(raw), read_options=pacsv.ReadOptions(column_names=names),
                               convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
        key = table.column("key").combine_chunks()
        encoded = pc.fill_null(pc.match_substring_regex(key, "[%+]"), False)  # AWS URL-encodes CSV keys
        if pc.any(encoded).as_py():
            keys = key.to_pylist()
            for i in pc.indices_nonzero(encoded).to_pylist():
                keys[i] = unquote_plus(keys[i])
            key = pa.array(keys, pa.string())
        return table.set_column(table.column_names.index("key"), "key", key)
    if inventory.file_format == "Parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    import pyarrow.orc as orc

    return orc.read_table(io.BytesIO(data))


def _flag(table: pa.Table, name: str, default: bool) -> pa.Array:
    if name not in table.column_names:
        return pa.array(np.full(table.num_rows, default), pa.bool_())
    column = table.column(name)
    if pa.types.is_boolean(column.type):
        return pc.fill_null(column, default)
    return pc.fill_null(pc.equal(pc.utf8_lower(column.cast(pa.string())), "true"), default)


def _times(column: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("us", tz="UTC"))
    return column.cast(pa.string()).cast(pa.timestamp("us", tz="UTC"))  # ISO 8601, "Z" and milliseconds as AWS writes


def rows_of(inventory: Inventory, uri: str, md5: str | None, options: StorageOptions, *,
            pattern: str | None = None) -> pa.Table:
    """One data file's listing rows (``LISTING_SCHEMA``)."""
    data = storage.read_bytes(uri, options)
    if md5 and hashlib.md5(data).hexdigest() != md5.lower():
        raise InventoryError(f"{uri}: its MD5 is not the manifest's (a partial or replaced data file)")
    try:
        return _rows(_table(inventory, data, uri), uri, pattern)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, InventoryError):
            raise
        raise InventoryError(f"{uri} is not a readable {inventory.file_format} inventory file ({exc})") from None


def _rows(table: pa.Table, uri: str, pattern: str | None) -> pa.Table:
    """The listing rows of a data file's table: the latest versions that are not delete
    markers, folder markers (a key ending in ``/`` of size 0) left out, names matching
    ``pattern``. Column at a time: a data file holds millions of rows."""
    missing = [c for c in NEEDED.values() if c not in table.column_names]
    if missing:
        raise InventoryError(f"{uri}: no column {', '.join(missing)}")
    table = _filtered(table, pc.and_(pc.invert(_flag(table, "is_delete_marker", False)), _flag(table, "is_latest", True)))
    bucket, key = table.column("bucket").cast(pa.string()), table.column("key").cast(pa.string())
    if bucket.null_count or key.null_count:
        raise InventoryError(f"{uri}: a row without a bucket or a key")
    sizes = pc.cast(table.column("size"), pa.int64())
    folder = pc.and_(pc.ends_with(key, "/"), pc.equal(pc.fill_null(sizes, 0), 0))
    wanted = pc.invert(folder)
    if pattern is not None:  # the name: the key's last part (a trailing "/" left out)
        names = pc.utf8_rtrim(key, "/").to_pylist()
        wanted = pc.and_(wanted, pa.array([matches(n.rsplit("/", 1)[-1], pattern) for n in names], pa.bool_()))
    table = _filtered(table, wanted)
    key, bucket = table.column("key").cast(pa.string()), table.column("bucket").cast(pa.string())
    uris = pc.binary_join_element_wise("s3:/", bucket, key, "/")
    etag = table.column("e_tag").cast(pa.string())
    empty = pc.fill_null(pc.equal(etag, ""), True)
    if pc.any(pc.or_(pc.starts_with(etag, '"'), pc.ends_with(etag, '"'))).as_py():  # quoted, as CSV reports may
        etag = pc.replace_substring_regex(etag, pattern='^"|"$', replacement="")
    etag = pc.if_else(empty, pa.scalar(None, pa.string()), etag)
    return pa.table({"uri": uris, "etag": etag,
                     "size_bytes": pc.cast(table.column("size"), pa.int64()),
                     "last_modified": _times(table.column("last_modified_date")),
                     "listing_error": pa.nulls(table.num_rows, pa.string())}, schema=LISTING_SCHEMA)


def _filtered(table: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """``table.filter(mask)`` (a null drops the row), with no copy when every row stays."""
    return table if pc.all(pc.fill_null(mask, False)).as_py() else table.filter(mask)


#: How an inventory's data files are read: ``map_files(read, files)`` yields ``read(file)`` for
#: each file, in order. The default reads them here, one after the other; the Ray edge passes
#: one that reads them in Ray tasks, several at once.
MapFiles = Callable[[Callable[[tuple[str, str | None]], pa.Table], Sequence[tuple[str, str | None]]],
                    Iterable[pa.Table]]


def iter_inventory(manifest: str, options: StorageOptions, *, pattern: str | None = None,
                   map_files: MapFiles = map, keep: Callable[[pa.Table], pa.Table] | None = None,
                   ) -> Iterator[tuple[int, pa.Table]]:
    """(rows listed, the rows ``keep`` kept of them) of every data file of an inventory, a
    file at a time, in the manifest's order; ``keep`` runs where the file is read."""
    inventory = read_inventory(manifest, options)
    yield from map_files(functools.partial(_file_rows, inventory, options, pattern, keep), inventory.files)


def _file_rows(inventory: Inventory, options: StorageOptions, pattern: str | None,
               keep: Callable[[pa.Table], pa.Table] | None, file: tuple[str, str | None]) -> tuple[int, pa.Table]:
    uri, md5 = file
    rows = rows_of(inventory, uri, md5, options, pattern=pattern)
    return rows.num_rows, (rows if keep is None else keep(rows))
