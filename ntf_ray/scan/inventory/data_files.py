"""Reading one data file of a report within its caps (``Limits``): its bytes checked against
the manifest, then its rows a batch at a time, each format counted before a listing row of it
is built (see the package)."""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray import storage
from ntf_ray.scan.inventory.manifest import NEEDED, OPTIONAL, DataFile, Inventory, InventoryError, Limits
from ntf_ray.storage import StorageOptions

#: The columns read (the version id is not: the scan reads an object's latest version), and
#: those of strings (kept dictionary-encoded in Parquet until counted).
USED = (*NEEDED.values(), "is_latest", "is_delete_marker")
STRINGS = ("bucket", "key", "e_tag")
#: Rows of Parquet and of ORC read at once (ORC's are counted once built: fewer), and the bytes
#: of CSV inflated at once when counted.
BATCH_ROWS = 16_384
ORC_BATCH_ROWS = 4_096
CSV_PIECE = 2**20
GZIP_MAGIC = b"\x1f\x8b"


def batches(inventory: Inventory, data: bytes, uri: str, limits: Limits) -> Iterator[pa.RecordBatch]:
    """A data file's rows as record batches of the columns of ``USED`` it holds (Parquet and
    ORC names; CSV's as its fileSchema maps them), within ``limits``."""
    if inventory.file_format == "CSV":
        return _csv_batches(inventory, data, uri, limits)
    return (_parquet_batches if inventory.file_format == "Parquet" else _orc_batches)(data, uri, limits)


def read_checked(file: DataFile, options: StorageOptions, limits: Limits) -> bytes:
    """A data file's bytes, read with the guarded reader (at most ``max_bytes``: a file holds no
    more than it inflates to) and checked against the manifest's size and MD5."""
    data = storage.read_input(file.uri, options, what="inventory data file", max_bytes=limits.max_bytes)
    if file.md5 is not None and hashlib.md5(data).hexdigest() != file.md5:
        raise InventoryError(f"{file.uri}: its MD5 is not the manifest's (a partial or replaced data file)")
    if file.size is not None and len(data) != file.size:
        raise InventoryError(f"{file.uri}: {len(data)} bytes, not the manifest's {file.size} (a partial or replaced "
                             "data file)")
    return data


def _too_large(uri: str, cap: int) -> InventoryError:
    return InventoryError(f"{uri} inflates to more than {cap} bytes (--inventory-max-bytes raises the cap)")


def _too_many(uri: str, cap: int, declared: int | None = None) -> InventoryError:
    what = f"declares {declared} rows, more than {cap}" if declared is not None else f"holds more than {cap} rows"
    return InventoryError(f"{uri} {what} (--inventory-max-rows raises the cap)")


def _csv_batches(inventory: Inventory, data: bytes, uri: str, limits: Limits) -> Iterator[pa.RecordBatch]:
    """A CSV data file's rows (gzip or plain), parsed by pyarrow's streaming reader once a
    first pass has inflated it piece by piece and counted its bytes and lines within the caps:
    a bomb is refused before a row of it is parsed, holding one piece."""
    import pyarrow.csv as pacsv

    def inflated() -> io.BufferedIOBase:
        return gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == GZIP_MAGIC else io.BytesIO(data)

    size = lines = 0
    stream, blank = inflated(), True
    while chunk := stream.read(CSV_PIECE):
        size, lines, blank = size + len(chunk), lines + chunk.count(b"\n"), blank and not chunk.strip()
        if size > limits.max_bytes:
            raise _too_large(uri, limits.max_bytes)
        if lines > limits.max_rows:  # a row is a line: AWS URL-encodes the keys
            raise _too_many(uri, limits.max_rows)
    if blank:  # a report of an empty bucket
        return
    names = [NEEDED.get(f) or OPTIONAL.get(f) or f"_{i}" for i, f in enumerate(inventory.fields)]
    used = [n for n in names if n in USED]
    reader = pacsv.open_csv(inflated(), read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
                            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in used},
                                                                 include_columns=used, strings_can_be_null=True))
    rows = 0
    for batch in reader:
        rows += batch.num_rows
        if rows > limits.max_rows:  # the last line, without its newline
            raise _too_many(uri, limits.max_rows)
        yield batch


def _check_columns(schema: pa.Schema, uri: str) -> list[str]:
    """The columns of ``USED`` a Parquet or ORC file holds, each once and of the type S3
    Inventory writes (its dictionary-encoded form too); ``InventoryError`` otherwise."""
    expected = {"bucket": (pa.types.is_string, "a string"), "key": (pa.types.is_string, "a string"),
                "e_tag": (pa.types.is_string, "a string"), "size": (pa.types.is_integer, "an integer"),
                "last_modified_date": (pa.types.is_timestamp, "a timestamp"),
                "is_latest": (pa.types.is_boolean, "a boolean"), "is_delete_marker": (pa.types.is_boolean, "a boolean")}
    present = []
    for name in USED:
        indices = schema.get_all_field_indices(name)
        if len(indices) > 1:
            raise InventoryError(f"{uri}: more than one column {name}")
        if not indices:
            if name in NEEDED.values():
                raise InventoryError(f"{uri}: no column {name}")
            continue
        kind = schema.field(indices[0]).type
        value = kind.value_type if pa.types.is_dictionary(kind) else kind
        test, what = expected[name]
        if not (test(value) or (what == "a string" and pa.types.is_large_string(value))):
            raise InventoryError(f"{uri}: column {name} is {value}, not {what} as S3 Inventory writes it")
        present.append(name)
    return present


def _parquet_batches(data: bytes, uri: str, limits: Limits) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(pa.BufferReader(data))
    if meta.metadata.num_rows > limits.max_rows:
        raise _too_many(uri, limits.max_rows, meta.metadata.num_rows)
    columns = _check_columns(meta.schema_arrow, uri)
    declared = sum(group.column(j).total_uncompressed_size
                   for group in map(meta.metadata.row_group, range(meta.metadata.num_row_groups))
                   for j in range(group.num_columns) if group.column(j).path_in_schema in columns)
    if declared > limits.max_bytes:
        raise _too_large(uri, limits.max_bytes)

    def read() -> Iterator[pa.RecordBatch]:
        # Strings stay dictionary-encoded: a few values can stand for any number of rows.
        file = pq.ParquetFile(pa.BufferReader(data), read_dictionary=[c for c in STRINGS if c in columns])
        return file.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)

    _count(read(), uri, limits)
    for batch in read():
        yield pa.RecordBatch.from_arrays(
            [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in batch.columns],
            names=batch.schema.names)


def _orc_batches(data: bytes, uri: str, limits: Limits) -> Iterator[pa.RecordBatch]:
    import pyarrow.dataset as ds
    import pyarrow.orc as orc

    meta = orc.ORCFile(pa.BufferReader(data))
    if meta.nrows > limits.max_rows:
        raise _too_many(uri, limits.max_rows, meta.nrows)
    columns = _check_columns(meta.schema, uri)

    def read() -> Iterator[pa.RecordBatch]:
        fragment = ds.OrcFileFormat().make_fragment(pa.BufferReader(data))
        return fragment.to_batches(columns=columns, batch_size=ORC_BATCH_ROWS, use_threads=False)

    _count(read(), uri, limits)
    yield from read()


def _count(batches: Iterator[pa.RecordBatch], uri: str, limits: Limits) -> None:
    """A first pass over a file's batches, one at a time: ``InventoryError`` once they inflate
    past ``limits.max_bytes``, before a listing row of the file is built."""
    inflated = 0
    for batch in batches:
        inflated += sum(_inflated_size(column) for column in batch.columns)
        if inflated > limits.max_bytes:
            raise _too_large(uri, limits.max_bytes)


def _inflated_size(column: pa.Array) -> int:
    """The bytes ``column`` holds once its dictionary (if any) is decoded."""
    if not pa.types.is_dictionary(column.type):
        return column.nbytes
    lengths = pc.binary_length(column.dictionary).take(column.indices)
    return int(pc.sum(lengths).as_py() or 0) + 4 * (len(column) + 1)
