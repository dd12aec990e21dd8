"""An S3 Inventory report's ``manifest.json``: the bucket it lists, its format, and its data
files, each read beside the manifest (see the package for what is refused and why)."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ntf_ray import storage
from ntf_ray.storage import StorageOptions
from ntf_ray.untrusted_text import visible

FORMATS = ("CSV", "Parquet", "ORC")
#: The fields a listing row needs, as the manifest's fileSchema names them (CSV) and as
#: Parquet and ORC name their columns.
NEEDED = {"Bucket": "bucket", "Key": "key", "Size": "size", "LastModifiedDate": "last_modified_date",
          "ETag": "e_tag"}
OPTIONAL = {"IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker", "VersionId": "version_id"}

#: Defaults of ``Limits``: the most one data file may inflate to, and the rows it may hold.
#: S3 Inventory's CSV rows are about 200 bytes: 512 MiB is some 2.5 million rows of CSV text.
DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_MAX_ROWS = 4_000_000
#: The most a manifest.json may hold: some 80,000 data files' entries.
MANIFEST_MAX_BYTES = 16 * 2**20
#: A data file's name as S3 Inventory writes one (``<uuid>.csv.gz``, ``.parquet``, ``.orc``).
DATA_FILE = re.compile(r"(?:.*/)?data/([A-Za-z0-9_][A-Za-z0-9._-]{0,254})")
MD5 = re.compile(r"[0-9a-fA-F]{32}")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Prefixes and suffixes S3 keeps for itself (access points, aliases, directory buckets).
RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


class InventoryError(ValueError):
    """A manifest or data file that is not an S3 Inventory report this reader can use."""


@dataclass(frozen=True)
class Limits:
    """What one data file of a report may hold (``max_bytes`` inflated, ``max_rows`` rows), and
    whether a file the manifest gives no ``MD5checksum`` for is read (``allow_unchecked``)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    allow_unchecked: bool = False

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_rows < 1:
            raise ValueError(f"inventory limits must be at least 1 (bytes {self.max_bytes}, rows {self.max_rows})")


@dataclass(frozen=True)
class DataFile:
    """One data file of a report: where it is read (beside the manifest), its MD5 and size
    as the manifest gives them (None when it gives none)."""

    uri: str
    md5: str | None
    size: int | None


@dataclass(frozen=True)
class Inventory:
    """What a ``manifest.json`` says: the bucket it lists, the format, the CSV fields, and its data files."""

    manifest: str
    source_bucket: str
    file_format: str
    fields: tuple[str, ...]  # CSV columns in order (Parquet and ORC carry their own names)
    files: tuple[DataFile, ...]


def check_bucket_name(name: object) -> str:
    """``name`` if S3 gives buckets such names (3-63 lowercase letters, digits, '.' and '-',
    a letter or digit at each end, no '..', not an IP address, none of S3's reserved prefixes
    and suffixes); ``ValueError`` otherwise. Names from before 2018 with capitals or '_' are refused."""
    if (not isinstance(name, str) or not BUCKET.fullmatch(name) or ".." in name
            or name.startswith(RESERVED_PREFIXES) or name.endswith(RESERVED_SUFFIXES) or _is_ip(name)):
        raise ValueError(f"{shown(name)} is not an S3 bucket name (3-63 lowercase letters, digits, '.' or '-', "
                         "starting and ending with a letter or digit)")
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def shown(value: object) -> str:
    """A value of a manifest, for an error: visible escapes, and never long."""
    text = visible(value if isinstance(value, str) else repr(value))
    return repr(text if len(text) <= 70 else text[:60] + "...")


def read_inventory(manifest: str, options: StorageOptions, *, limits: Limits = Limits()) -> Inventory:
    """Parse an inventory's ``manifest.json`` (local or ``s3://``; see the package for what is refused)."""
    manifest = storage.normalize(manifest)
    raw = storage.read_input(manifest, options, what="inventory manifest", max_bytes=MANIFEST_MAX_BYTES)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(f"{manifest} is not an S3 Inventory manifest.json ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise InventoryError(f"{manifest} is not an S3 Inventory manifest.json (no 'files' list)")
    if doc.get("sourceBucket") is None:
        raise InventoryError(f"{manifest}: no sourceBucket (the bucket the report lists)")
    try:
        source = check_bucket_name(doc["sourceBucket"])
    except ValueError as exc:
        raise InventoryError(f"{manifest}: sourceBucket {exc}") from None
    file_format = doc.get("fileFormat")
    canonical = {f.lower(): f for f in FORMATS}.get(file_format.lower() if isinstance(file_format, str) else None)
    if canonical is None:
        raise InventoryError(f"{manifest}: fileFormat {shown(file_format)} is not one of {', '.join(FORMATS)}")
    fields: tuple[str, ...] = ()
    if canonical == "CSV":
        schema = doc.get("fileSchema")
        fields = tuple(f.strip() for f in schema.split(",")) if isinstance(schema, str) else ()
        missing = [f for f in NEEDED if f not in fields]
        if missing:
            raise InventoryError(f"{manifest}: its CSV fileSchema lacks {', '.join(missing)}")
        repeated = [f for f in (*NEEDED, *OPTIONAL) if fields.count(f) > 1]
        if repeated:
            raise InventoryError(f"{manifest}: its CSV fileSchema names {repeated[0]} more than once")
    folder = _data_folder(manifest)
    files, names = [], set()
    for i, entry in enumerate(doc["files"], 1):
        files.append(_data_file(manifest, folder, i, entry, limits))
        name = files[-1].uri.rsplit("/", 1)[-1]
        if name in names:
            raise InventoryError(f"{manifest}: names data file {name} more than once")
        names.add(name)
    return Inventory(manifest, source, canonical, fields, tuple(files))


def _data_folder(manifest: str) -> str:
    """Where S3 Inventory puts a report's data files: ``data`` beside the folder of its
    manifest (``CONFIG/DATE/manifest.json`` -> ``CONFIG/data``), in the manifest's own bucket
    or, for a local copy of a report, its own folder."""
    local = storage.local_path(manifest)
    if local is not None:
        return str(PurePosixPath(local).parent.parent / "data")
    scheme, _, rest = manifest.partition("://")
    bucket, _, key = rest.partition("/")
    parts = key.split("/")
    if len(parts) < 2:
        raise InventoryError(f"{manifest} is not where S3 Inventory puts a manifest (BUCKET/.../DATE/manifest.json)")
    return f"{scheme}://{bucket}/" + "/".join([*parts[:-2], "data"])


def _data_file(manifest: str, folder: str, i: int, entry: object, limits: Limits) -> DataFile:
    """A manifest's ``files`` entry ``i`` as the data file it names, beside the manifest."""
    key = entry.get("key") if isinstance(entry, dict) else None
    found = DATA_FILE.fullmatch(key) if isinstance(key, str) else None
    if found is None:
        raise InventoryError(f"{manifest}: files entry {i} is not a data file S3 Inventory writes "
                             "(a key ending in data/NAME)")
    name = found.group(1)
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        text = size if isinstance(size, int) else shown(size)
        raise InventoryError(f"{manifest}: data file {name}: size {text} is not a number of bytes")
    if size is not None and size > limits.max_bytes:
        raise InventoryError(f"{manifest}: data file {name} is {size} bytes, more than {limits.max_bytes} "
                             "(--inventory-max-bytes raises the cap)")
    md5 = entry.get("MD5checksum")
    if md5 is None:
        if not limits.allow_unchecked:
            raise InventoryError(f"{manifest}: data file {name} has no MD5checksum, so nothing shows it is whole; "
                                 "--allow-unchecked-inventory reads such files unchecked")
    elif not isinstance(md5, str) or not MD5.fullmatch(md5):
        raise InventoryError(f"{manifest}: data file {name}: its MD5checksum is not an MD5 (32 hex digits)")
    return DataFile(storage.join(folder, name), md5.lower() if md5 else None, size)
