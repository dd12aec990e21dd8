"""The score table: its schemas and file names, the run folders under OUTPUT and which runs
completed (``index`` keeps what a model already scored; ``publish`` writes a run).

A run writes its rows under ``OUTPUT/_staging/run_id=ID/`` (readers skip names that start
with ``_``) and is published, once every listed object has its row, as one Parquet file
``OUTPUT/dt=DAY/run_id=ID/scores.parquet`` written in one piece (a local rename, one S3
object), then ``_summary.json`` and ``_SUCCESS``. So a reader of ``OUTPUT`` sees a run's rows
all at once or not at all, whatever crashes, and re-running a run replaces its file in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads

from ntf_ray import storage
from ntf_ray.images.provenance import PROVENANCE_COLUMNS
from ntf_ray.storage import StorageOptions

#: The score table, exactly as docs/contracts.md defines it.
SCORE_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("etag", pa.string()),
    ("size_bytes", pa.int64()),
    ("last_modified", pa.timestamp("us", tz="UTC")),
    ("score", pa.float32()),
    ("is_fake", pa.bool_()),
    ("threshold", pa.float32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("error", pa.string()),
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("scanned_at", pa.timestamp("us", tz="UTC")),
    # Added after the contract's first columns: which decoder made the pixels ("pil", "nvjpeg"
    # or "nvimgcodec"; null when the object could not be read). nvjpeg's scores differ slightly.
    ("decoder", pa.string()),
    # What the image says of its own origin (``images.provenance``), null when it says
    # nothing or was not read: which source said so, the digital source type it declares,
    # who (the claim generator or software), the C2PA manifest's state, and why a part
    # could not be read.
    ("provenance", pa.string()),
    ("declared_source", pa.string()),
    ("declared_by", pa.string()),
    ("c2pa_state", pa.string()),
    ("provenance_problem", pa.string()),
])
assert tuple(SCORE_SCHEMA.names[-len(PROVENANCE_COLUMNS):]) == PROVENANCE_COLUMNS
#: What each Parquet file holds: the table less ``run_id``, which, as in any hive layout, lives
#: in the folder name (``run_id=ID``) and reaches readers as a partition column. Stored in the
#: files too, it would clash with the partition's type in readers that infer dictionaries
#: for partitions (pandas).
FILE_SCHEMA = pa.schema([f for f in SCORE_SCHEMA if f.name != "run_id"])
#: What the listing carries for each object; ``listing_error`` when the listing itself already
#: knows the object cannot be read (a file name that is not UTF-8, a link out of the folder).
LISTING_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("etag", pa.string()),
    ("size_bytes", pa.int64()),
    ("last_modified", pa.timestamp("us", tz="UTC")),
    ("listing_error", pa.string()),
])

SUCCESS = "_SUCCESS"
# Not "summary.json": readers of the table (pyarrow, pandas, Spark, Athena) skip names starting
# with "_" or ".", and would otherwise try to read the summary as a Parquet file.
SUMMARY = "_summary.json"
#: The one file a published run holds.
ROWS = "scores.parquet"
#: Where runs write before they are complete, and the index of what each model scored.
STAGING, INDEX = "_staging", "_index"
_RUN_FILE = re.compile(r"(?:^|/)dt=([^/]+)/run_id=([^/]+)/([^/]+)$")


@dataclass
class _Run:
    folder: str
    names: set[str] = field(default_factory=set)
    version: str | None = None  # of its scores.parquet: changes whenever the run is published again


def runs_by_id(output: str, options: StorageOptions) -> dict[str, _Run]:
    """run_id -> its folder, the names of its files and its version, for every published or
    legacy run under OUTPUT."""
    output = storage.normalize(output)
    found: dict[str, _Run] = {}
    for rel, _, version in storage.files(output, options, skip=(".", "_")):
        m = _RUN_FILE.match(rel)
        if m and not rel.startswith(("_", ".")):
            day, run_id, name = m.groups()
            run = found.setdefault(run_id, _Run(storage.join(output, f"dt={day}", f"run_id={run_id}")))
            run.names.add(name)
            if name == ROWS:
                run.version = version
    return found


def run_version(run_dir: str, options: StorageOptions) -> str:
    """The version of a published run's rows (as ``runs_by_id`` reads it)."""
    return storage.version(storage.join(run_dir, ROWS), options)


def run_dirs(output: str, options: StorageOptions) -> list[tuple[str, str]]:
    """(run_id, run folder) of every run under OUTPUT, complete or not."""
    return sorted((rid, run.folder) for rid, run in runs_by_id(output, options).items())


def is_complete(names: set[str]) -> bool:
    # scores.parquet is written whole, and only once the run's rows were all counted: it alone
    # says the run is complete, even if the driver died before writing _SUCCESS after it.
    return SUCCESS in names or ROWS in names


def completed_runs(output: str, options: StorageOptions) -> list[str]:
    """Folders of the runs under OUTPUT that finished."""
    return sorted(run.folder for run in runs_by_id(output, options).values() if is_complete(run.names))


def parquet_files(run_dir: str, options: StorageOptions) -> list[str]:
    """The Parquet files directly in a run folder (names starting with ``_`` or ``.`` are not rows)."""
    return sorted(uri for rel, uri, _ in storage.files(run_dir, options)
                  if "/" not in rel and rel.endswith(".parquet") and not rel.startswith(("_", ".")))


def parquet_dataset(files: list[str], options: StorageOptions, schema: pa.Schema = FILE_SCHEMA) -> pads.Dataset | None:
    if not files:
        return None
    fs, paths = storage.arrow_paths(files, options)
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema)


def read_runs(dirs: list[str], columns: list[str], options: StorageOptions) -> pa.Table:
    """The given columns of every Parquet file in the given run folders."""
    ds = parquet_dataset([f for d in dirs for f in parquet_files(d, options)], options)
    if ds is None:
        return pa.table({c: pa.array([], FILE_SCHEMA.field(c).type) for c in columns})
    return ds.to_table(columns=columns)
