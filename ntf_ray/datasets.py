"""The dataset manifest and a torch Dataset over it.

A manifest is a Parquet or CSV table with columns ``uri`` (local path or ``s3://``),
``label`` (0 real / 1 fake, null when unknown), ``generator`` (e.g. ``progan``; ``real``
for reals without one) and ``split`` (``train`` / ``val`` / ``test``).
``index_folder`` builds one from the CNNDetection layout
``ROOT/[split/]<generator-or-class>/.../{0_real,1_fake}/*``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from ntf_ray import storage
from ntf_ray.decode import DEFAULT_MAX_PIXELS, decode
from ntf_ray.storage import StorageOptions
from ntf_ray.transforms import to_tensor

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_DIRS = {"0_real": 0, "1_fake": 1}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("generator", pa.string()),
        pa.field("split", pa.string()),
    ]
)


def manifest_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Records with at least ``uri`` -> a table with the manifest schema (extra keys dropped)."""
    rows = list(records)
    cols = {f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}
    try:
        # Types are inferred, then cast by validate_manifest, so a bad value gets its message.
        table = pa.table(cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"manifest records do not fit the manifest schema ({exc})") from None
    return validate_manifest(table)


def validate_manifest(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Check columns and values and cast to the manifest schema; a clear error otherwise."""
    if "uri" not in table.column_names:
        raise ValueError(f"{source} has no 'uri' column (columns: {table.column_names})")
    for f in MANIFEST_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    table = table.select([f.name for f in MANIFEST_SCHEMA])
    # Before the cast: casting nulls into the non-nullable uri field fails with a message
    # that does not say which rows are wrong.
    if table.column("uri").null_count:
        raise ValueError(f"{source}: {table.column('uri').null_count} rows have no uri")
    try:
        table = table.cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ValueError(f"{source}: columns do not fit the manifest schema ({exc})") from None
    bad_labels = [v for v in table.column("label").to_pylist() if v not in (0, 1, None)]
    if bad_labels:
        raise ValueError(f"{source}: labels must be 0 (real), 1 (fake) or null, found {sorted(set(bad_labels))[:10]} "
                         f"in {len(bad_labels)} rows")
    bad_splits = [v for v in table.column("split").to_pylist() if v is not None and v not in SPLITS]
    if bad_splits:
        raise ValueError(f"{source}: split must be one of {SPLITS} or null, found {sorted(set(bad_splits))[:10]} "
                         f"in {len(bad_splits)} rows")
    return table


def read_manifest(uri: str, options: StorageOptions | None = None) -> pa.Table:
    """Read a Parquet (``.parquet``/``.pq``) or CSV manifest, local or ``s3://``.

    Relative local ``uri`` entries are resolved against the manifest's folder.
    """
    uri = storage.normalize(uri)
    data = storage.read_bytes(uri, options)
    if uri.lower().endswith(".csv"):
        # Empty CSV fields are nulls (write_manifest writes a null as an empty field), and the
        # string columns stay strings whatever they look like (a generator named "1" or "true").
        convert = pacsv.ConvertOptions(
            strings_can_be_null=True,
            column_types={f.name: f.type for f in MANIFEST_SCHEMA if pa.types.is_string(f.type)},
        )
        try:
            table = pacsv.read_csv(io.BytesIO(data), convert_options=convert)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{uri} is not a readable CSV manifest ({exc})") from None
    else:
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{uri} is not a Parquet manifest ({exc}); CSV manifests must end in .csv") from None
    table = validate_manifest(table, uri)
    if not storage.is_s3(uri):
        base = Path(uri).parent
        uris = [u if storage.is_s3(u) or Path(u).is_absolute() else str(base / u) for u in table.column("uri").to_pylist()]
        table = table.set_column(0, MANIFEST_SCHEMA.field("uri"), pa.array(uris, pa.string()))
    return table


def write_manifest(table: pa.Table, uri: str, options: StorageOptions | None = None) -> None:
    table = validate_manifest(table)
    uri = storage.normalize(uri)
    buf = io.BytesIO()
    if uri.lower().endswith(".csv"):
        pacsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), options)


def index_folder(root: str | Path, *, default_split: str = "test") -> pa.Table:
    """Manifest for a local CNNDetection-layout folder.

    ``ROOT/<split>/<generator>/.../<0_real|1_fake>/file`` or, without a split level,
    ``ROOT/<generator>/...`` (split = ``default_split``). The generator is the first folder
    below the split (the root folder's name for a flat ``ROOT/{0_real,1_fake}`` set); files not under a ``0_real``/``1_fake`` folder, files without an image
    extension and hidden files or folders (``.name``, e.g. macOS ``._x.png`` resource forks)
    are skipped.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}")
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        parts = rel[:-1]
        label_dirs = [p for p in parts if p in LABEL_DIRS]
        if not label_dirs:
            continue
        split = parts[0] if parts[0] in SPLITS else default_split
        rest = parts[1:] if parts[0] in SPLITS else parts
        # A flat ROOT/{0_real,1_fake} set has no generator folder: both classes take the
        # root's name, so they stay one group with defined per-generator AP.
        generator = rest[0] if rest and rest[0] not in LABEL_DIRS else root.name
        records.append({"uri": str(path), "label": LABEL_DIRS[label_dirs[-1]], "generator": generator, "split": split})
    if not records:
        raise ValueError(f"no images under {root} in a 0_real/ or 1_fake/ folder")
    return manifest_table(records)


def select(table: pa.Table, *, split: str | None = None, labels: Sequence[int] | None = None,
           generators: Sequence[str] | None = None) -> pa.Table:
    """Rows of one split / some labels / some generators."""
    mask = None

    def both(a, b):
        return b if a is None else pc.and_(a, b)

    if split is not None:
        mask = both(mask, pc.equal(table["split"], split))
    if labels is not None:
        mask = both(mask, pc.is_in(table["label"], pa.array(list(labels), pa.int8())))
    if generators is not None:
        mask = both(mask, pc.is_in(table["generator"], pa.array(list(generators), pa.string())))
    return table if mask is None else table.filter(mask)


class ManifestDataset(torch.utils.data.Dataset):
    """Images of a manifest, decoded and passed through ``transform``.

    Item: ``transform(image_tensor)`` merged with ``label`` (and ``index``) into a dict; a
    ``transform`` returning a tuple names its parts by ``keys``. Undecodable images give
    ``None`` (count and drop them with ``collate_drop_none``) so one bad file never stops
    training.
    """

    def __init__(
        self,
        table: pa.Table,
        transform: Callable[[torch.Tensor], Any],
        *,
        keys: Sequence[str] = ("image",),
        options: StorageOptions | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.uris = table.column("uri").to_pylist()
        self.labels = table.column("label").to_pylist()
        self.transform = transform
        self.keys = tuple(keys)
        self.options = options
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        uri = self.uris[index]
        try:
            data = storage.read_bytes(uri, self.options)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: read: %s", uri, storage.redact(str(exc))[:200])
            return None
        decoded = decode(data, max_pixels=self.max_pixels)
        if not decoded.ok:
            log.warning("skipping %s: %s", uri, decoded.error)
            return None
        out = self.transform(to_tensor(decoded.image))
        parts = out if isinstance(out, tuple) else (out,)
        if len(parts) != len(self.keys):
            raise ValueError(f"transform returned {len(parts)} parts for keys {self.keys}")
        item = dict(zip(self.keys, parts))
        label = self.labels[index]
        item["label"] = torch.tensor(-1 if label is None else label, dtype=torch.long)
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item


def collate_drop_none(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Default collate over the decodable items; ``dropped`` counts the rest."""
    kept = [it for it in items if it is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["dropped"] = len(items) - len(kept)
    return batch
