"""The dataset manifest and a torch Dataset over it.

A manifest is a Parquet or CSV table with columns ``uri`` (absolute local path or
``s3://bucket/key``), ``label`` (0 real / 1 fake, null when unknown), ``generator`` (e.g.
``progan``; ``real`` for reals without one) and ``split`` (``train`` / ``val`` / ``test``),
plus an optional ``family`` column.

``family`` (string, nullable) names a generator family (e.g. ``gan`` for progan and
stylegan, ``dm`` for ddpm and ldm) for evaluations that average per family. It is a
property of the *generator*: every row of one generator, its reals and its fakes alike,
carries the same family (the reals of a generator folder are scored against that
generator's fakes, so they belong to its family). The column is present only when the
table or the records have it: manifests without it read, validate and write exactly as
before (the four columns of ``MANIFEST_SCHEMA``), with it they have ``MANIFEST_SCHEMA``
plus ``family`` last. Other unknown columns are dropped.

``index_root`` (also importable as ``index_folder``) builds a manifest by listing a local
folder or an ``s3://bucket/prefix`` in one of two layouts, see its docstring:
CNNDetection ``ROOT/[split/]<generator>/.../{0_real,1_fake}/*`` and GenImage
``ROOT/[<generator>/...]/{train,val}/{ai,nature}/*``.
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
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS, decode
from ntf_ray.images.transforms import to_tensor
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_DIRS = {"0_real": 0, "1_fake": 1}
#: GenImage: class folder -> label, split folder -> manifest split. GenImage has no test
#: split and papers report its ``val`` images as the test set, so ``val`` becomes ``test``.
GENIMAGE_LABEL_DIRS = {"nature": 0, "ai": 1}
GENIMAGE_SPLITS = {"train": "train", "val": "test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("generator", pa.string()),
        pa.field("split", pa.string()),
    ]
)
#: The optional column: kept (after the others) when a table or the records have it.
FAMILY_FIELD = pa.field("family", pa.string())

CNNDETECTION = "CNNDetection"
GENIMAGE = "GenImage"
_LAYOUT_HELP = (
    "the CNNDetection layout ROOT/[train|val|test/]<generator>/.../{0_real,1_fake}/<image> "
    "(e.g. ROOT/train/progan/airplane/1_fake/00001.png) or the GenImage layout "
    "ROOT/[<generator>/...]/{train,val}/{ai,nature}/<image> (e.g. ROOT/stable_diffusion_v_1_4/train/ai/00001.png)"
)
#: Keys per ListObjectsV2 page (the S3 maximum); tests lower it to exercise paging.

def _names_a_source(uri: str) -> bool:
    """Whether a manifest's uri names an object of a registered non-local source (``s3://...``);
    anything else is a path, relative to a local manifest's folder unless absolute."""
    try:
        return storage.source_for(uri).local_path(uri) is None
    except ValueError:
        return False


def manifest_schema(with_family: bool = False) -> pa.Schema:
    """``MANIFEST_SCHEMA``, plus ``family`` last when ``with_family``."""
    return MANIFEST_SCHEMA.append(FAMILY_FIELD) if with_family else MANIFEST_SCHEMA


def manifest_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Records with at least ``uri`` -> a table with the manifest schema (extra keys dropped).

    ``family`` is kept when any record has that key (null where others lack it).
    """
    rows = list(records)
    schema = manifest_schema(any(FAMILY_FIELD.name in r for r in rows))
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    try:
        # Types are inferred, then cast by validate_manifest, so a bad value gets its message.
        table = pa.table(cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"manifest records do not fit the manifest schema ({exc})") from None
    return validate_manifest(table)


def validate_manifest(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Check columns and values and cast to the manifest schema; a clear error otherwise.

    Missing ``label``/``generator``/``split`` columns become nulls; ``family`` is kept (as
    strings) only when present; any other column is dropped.
    """
    if "uri" not in table.column_names:
        raise ValueError(f"{source} has no 'uri' column (columns: {table.column_names})")
    schema = manifest_schema(FAMILY_FIELD.name in table.column_names)
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    table = table.select([f.name for f in schema])
    # Before the cast: casting nulls into the non-nullable uri field fails with a message
    # that does not say which rows are wrong.
    if table.column("uri").null_count:
        raise ValueError(f"{source}: {table.column('uri').null_count} rows have no uri")
    try:
        table = table.cast(schema)
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


#: The most read of a manifest file: a Parquet manifest of ten million rows is a few hundred MB
#: (a bigger listing belongs in an S3 Inventory report, which is streamed).
MANIFEST_MAX_BYTES = 2 * 2**30


def read_manifest(uri: str, options: StorageOptions | None = None, *, uris_only: bool = False) -> pa.Table:
    """Read a Parquet (``.parquet``/``.pq``) or CSV manifest, local or ``s3://``.

    Relative local ``uri`` entries are resolved against the manifest's folder. With
    ``uris_only`` (a scan needs nothing else) the other columns are neither read nor checked.
    """
    uri = storage.normalize(uri)
    data = storage.read_input(uri, options, what="manifest", max_bytes=MANIFEST_MAX_BYTES)
    if uri.lower().endswith(".csv"):
        # Empty CSV fields are nulls (write_manifest writes a null as an empty field), and the
        # string columns stay strings whatever they look like (a generator named "1" or "true").
        convert = pacsv.ConvertOptions(
            strings_can_be_null=True,
            column_types={f.name: f.type for f in manifest_schema(True) if pa.types.is_string(f.type)},
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
    if uris_only and "uri" in table.column_names:
        table = table.select(["uri"])
    table = validate_manifest(table, uri)
    local = storage.local_path(uri)
    if local is not None:  # relative paths in a local manifest are relative to its folder
        base = Path(local).parent
        uris = [u if _names_a_source(u) or Path(u).is_absolute() else str(base / u) for u in table.column("uri").to_pylist()]
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


def index_root(root: str | Path, *, default_split: str = "test", options: StorageOptions | None = None) -> pa.Table:
    """Manifest for a local folder or an ``s3://bucket/prefix``, laid out as CNNDetection or GenImage.

    The layout is recognised per file, from its path below ROOT:

    * **CNNDetection**: a ``0_real`` (label 0) or ``1_fake`` (label 1) folder anywhere in
      the path: ``ROOT/<split>/<generator>/.../<0_real|1_fake>/file`` or, without a split
      level, ``ROOT/<generator>/...`` (split = ``default_split``). The generator is the
      first folder below the split, or the root's name for a flat ``ROOT/{0_real,1_fake}``.
    * **GenImage**: the file's folder is ``ai`` (label 1) or ``nature`` (label 0) and the
      folder above it ``train`` or ``val``: ``ROOT/<generator>/[...]/<train|val>/<ai|nature>/file``
      (the release nests one more level: ``ROOT/ADM/imagenet_ai_0508_adm/train/ai/x.PNG``) or,
      for a root that is one generator's folder, ``ROOT/<train|val>/<ai|nature>/file``. The
      generator is the first folder below ROOT (``ADM`` above), or the root's name when
      ``train``/``val`` is directly below it. Splits: ``train`` -> ``train`` and ``val`` ->
      ``test``: GenImage has no test split and evaluations report its ``val`` images.
      ``default_split`` does not apply (every GenImage file has a split folder).

    A path with a ``0_real``/``1_fake`` folder is CNNDetection even if it also looks like
    GenImage. Files in neither layout (``README.png``, a ``preview.png`` above the label
    folders), files without an image extension and hidden files or folders (``.name``,
    e.g. macOS ``._x.png`` resource forks) are skipped. One root holds one layout: files
    of both under one root are a ValueError (index them as two roots), as is a root with
    no image in either layout.

    S3 prefixes are listed with paginated ListObjectsV2 (keys are taken verbatim, never
    as glob patterns), local folders with ``os.walk`` (symlinked folders are not entered).
    Rows are ordered by path below ROOT; ``uri`` is ``s3://bucket/key`` or an absolute path.
    No ``family`` column: the layouts do not name families.
    """
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}")
    root = storage.normalize(root)
    local = storage.local_path(root)
    if local is not None and not Path(local).is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    # Empty parts (a "//" in a key) are no folder level; the uri keeps the key verbatim.
    files = [(tuple(p for p in rel.split("/") if p), uri) for rel, uri, _ in storage.files(root, options, skip=(".",))]
    if not files and local is None:
        raise FileNotFoundError(f"not a folder: no objects under {root.rstrip('/')}/")
    root_name = root.rstrip("/").rsplit("/", 1)[-1]
    found: dict[str, list[dict[str, Any]]] = {CNNDETECTION: [], GENIMAGE: []}
    first: dict[str, str] = {}  # layout -> its first path below ROOT, for messages
    n_images, unmatched = 0, None
    for parts, uri in sorted(files):
        if any(p.startswith(".") for p in parts) or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            continue
        n_images += 1
        layout, record = _classify(parts, root_name, default_split)
        if layout is None:
            unmatched = unmatched or "/".join(parts)
            continue
        first.setdefault(layout, "/".join(parts))
        found[layout].append({"uri": uri, **record})
    cnn, gen = found[CNNDETECTION], found[GENIMAGE]
    if cnn and gen:
        raise ValueError(
            f"{root} mixes two layouts: CNNDetection (e.g. ROOT/{first[CNNDETECTION]}) and GenImage "
            f"(e.g. ROOT/{first[GENIMAGE]}); index each layout's folder as its own root")
    if not n_images:
        raise ValueError(f"no images under {root}: expected {_LAYOUT_HELP}")
    records = cnn or gen
    if not records:
        raise ValueError(f"{n_images} image{'s' * (n_images != 1)} under {root} but none in a known layout "
                         f"(e.g. ROOT/{unmatched}): expected {_LAYOUT_HELP}")
    if n_images > len(records):
        log.info("index %s: skipped %d images outside the %s layout (e.g. ROOT/%s)", root,
                 n_images - len(records), CNNDETECTION if cnn else GENIMAGE, unmatched)
    return manifest_table(records)


#: The name the CLI and older code use.
index_folder = index_root


def _classify(parts: tuple[str, ...], root_name: str, default_split: str) -> tuple[str | None, dict[str, Any]]:
    """(layout, label/generator/split) of one file's path parts below the root; (None, {}) if neither."""
    dirs = parts[:-1]
    label_dirs = [p for p in dirs if p in LABEL_DIRS]
    if label_dirs:
        split = dirs[0] if dirs[0] in SPLITS else default_split
        rest = dirs[1:] if dirs[0] in SPLITS else dirs
        # A flat ROOT/{0_real,1_fake} set has no generator folder: both classes take the
        # root's name, so they stay one group with defined per-generator AP.
        generator = rest[0] if rest and rest[0] not in LABEL_DIRS else root_name
        return CNNDETECTION, {"label": LABEL_DIRS[label_dirs[-1]], "generator": generator, "split": split}
    if len(dirs) >= 2 and dirs[-1] in GENIMAGE_LABEL_DIRS and dirs[-2] in GENIMAGE_SPLITS:
        generator = dirs[0] if len(dirs) > 2 else root_name
        return GENIMAGE, {"label": GENIMAGE_LABEL_DIRS[dirs[-1]], "generator": generator,
                          "split": GENIMAGE_SPLITS[dirs[-2]]}
    return None, {}


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
            log.warning("skipping %s: %s", uri, storage.read_error(exc))
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
