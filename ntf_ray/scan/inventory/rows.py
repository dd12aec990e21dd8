"""A data file's batch as listing rows: every row of the report's source bucket, the latest
versions that are not delete markers, checked column at a time (a data file holds millions of rows)."""

from __future__ import annotations

from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray.scan.inventory.manifest import NEEDED, OPTIONAL, InventoryError, shown
from ntf_ray.scan.table import LISTING_SCHEMA
from ntf_ray.storage.source import matches

FLAGS = ("is_latest", "is_delete_marker")
CSV_NAME = {column: field for field, column in {**NEEDED, **OPTIONAL}.items()}


def url_decoded(table: pa.Table) -> pa.Table:
    """AWS URL-encodes CSV keys: decoded where they hold a '%' or '+'."""
    index = table.schema.get_field_index("key")
    key = table.column(index).combine_chunks()
    encoded = pc.fill_null(pc.match_substring_regex(key, "[%+]"), False)
    if not pc.any(encoded).as_py():
        return table
    keys = key.to_pylist()
    for i in pc.indices_nonzero(encoded).to_pylist():
        keys[i] = unquote_plus(keys[i])
    return table.set_column(index, "key", pa.array(keys, pa.string()))


def flag(table: pa.Table, name: str, default: bool) -> pa.Array:
    """A flag column (``is_latest``, ``is_delete_marker``) as booleans, ``default`` where it is
    absent or null (checked first by ``_check_flags``)."""
    if name not in table.column_names:
        return pa.array(np.full(table.num_rows, default), pa.bool_())
    column = table.column(name)
    if pa.types.is_boolean(column.type):
        return pc.fill_null(column, default)
    return pc.fill_null(pc.equal(pc.utf8_lower(column.cast(pa.string())), "true"), default)


def _check_flags(table: pa.Table, uri: str) -> None:
    """A flag is a boolean, or in CSV ``true``/``false`` (any case) or empty: anything else
    would read as false and silently drop or keep rows."""
    for name in FLAGS:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_boolean(column.type):
            continue
        if not pa.types.is_string(column.type):
            raise InventoryError(f"{uri}: column {name} is {column.type}, not a boolean as S3 Inventory writes it")
        known = pc.or_(pc.is_null(column), pc.is_in(pc.utf8_lower(column), value_set=pa.array(["true", "false", ""])))
        if not pc.all(known).as_py():
            raise InventoryError(f"{uri}: column {CSV_NAME[name]} holds a value other than true or false")


def times(column: pa.ChunkedArray) -> pa.Array:
    """``LastModifiedDate`` as UTC timestamps (Parquet and ORC's own, or CSV's ISO 8601 text)."""
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("us", tz="UTC"))
    return column.cast(pa.string()).cast(pa.timestamp("us", tz="UTC"))  # ISO 8601, "Z" and milliseconds as AWS writes


def listing_rows(table: pa.Table, uri: str, pattern: str | None, source: str) -> pa.Table:
    """The listing rows of a data file's table: every row of bucket ``source``; the latest
    versions that are not delete markers, folder markers (a key ending in ``/`` of size 0)
    left out, names matching ``pattern``. Column at a time: a data file holds millions of rows."""
    missing = [c for c in NEEDED.values() if c not in table.column_names]
    if missing:
        raise InventoryError(f"{uri}: no column {', '.join(missing)}")
    bucket, key = table.column("bucket").cast(pa.string()), table.column("key").cast(pa.string())
    other = pc.fill_null(pc.not_equal(bucket, source), True)
    if pc.any(other).as_py():
        first = bucket.filter(other)[0].as_py()
        named = "names no bucket" if not first else f"names bucket {shown(first)}"
        raise InventoryError(f"{uri}: a row {named}, not the report's sourceBucket '{source}'; a report lists one "
                             "bucket, so this one is refused whole")
    if key.null_count or pc.any(pc.equal(key, "")).as_py():
        raise InventoryError(f"{uri}: a row without a bucket or a key")
    _check_flags(table, uri)
    sizes = pc.cast(table.column("size"), pa.int64())
    if pc.any(pc.less(sizes, 0)).as_py():
        raise InventoryError(f"{uri}: a row with a negative size")
    table = _filtered(table, pc.and_(pc.invert(flag(table, "is_delete_marker", False)), flag(table, "is_latest", True)))
    key, sizes = table.column("key").cast(pa.string()), pc.cast(table.column("size"), pa.int64())
    folder = pc.and_(pc.ends_with(key, "/"), pc.equal(pc.fill_null(sizes, 0), 0))
    wanted = pc.invert(folder)
    if pattern is not None:  # the name: the key's last part (a trailing "/" left out)
        names = pc.utf8_rtrim(key, "/").to_pylist()
        wanted = pc.and_(wanted, pa.array([matches(n.rsplit("/", 1)[-1], pattern) for n in names], pa.bool_()))
    table = _filtered(table, wanted)
    key = table.column("key").cast(pa.string())
    uris = pc.binary_join_element_wise(f"s3://{source}", key, "/")
    etag = table.column("e_tag").cast(pa.string())
    empty = pc.fill_null(pc.equal(etag, ""), True)
    if pc.any(pc.or_(pc.starts_with(etag, '"'), pc.ends_with(etag, '"'))).as_py():  # quoted, as CSV reports may
        etag = pc.replace_substring_regex(etag, pattern='^"|"$', replacement="")
    etag = pc.if_else(empty, pa.scalar(None, pa.string()), etag)
    return pa.table({"uri": uris, "etag": etag,
                     "size_bytes": pc.cast(table.column("size"), pa.int64()),
                     "last_modified": times(table.column("last_modified_date")),
                     "listing_error": pa.nulls(table.num_rows, pa.string())}, schema=LISTING_SCHEMA)


def _filtered(table: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """``table.filter(mask)`` (a null drops the row), with no copy when every row stays."""
    return table if pc.all(pc.fill_null(mask, False)).as_py() else table.filter(mask)
