"""The score table: its schemas and file names, the run folders under OUTPUT, which runs
completed, what a model already scored there, and a run's summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ntf_ray import storage
from ntf_ray.storage import StorageOptions

if TYPE_CHECKING:
    from ntf_ray.ray_scan import ScanSpec

#: The score table, exactly as the architecture notes define it.
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
    # Added after the architecture's columns: which decoder made the pixels ("pil" or
    # "nvjpeg"; null when the object could not be read). Scores from the two differ slightly.
    ("decoder", pa.string()),
])
#: What each Parquet file holds: the table less ``run_id``, which, as in any hive layout, lives
#: in the folder name (``run_id=ID``) and reaches readers as a partition column. Stored in the
#: files too, it would clash with the partition's type in readers that infer dictionaries
#: for partitions (pandas).
FILE_SCHEMA = pa.schema([f for f in SCORE_SCHEMA if f.name != "run_id"])
#: What the listing carries for each object.
LISTING_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("etag", pa.string()),
    ("size_bytes", pa.int64()),
    ("last_modified", pa.timestamp("us", tz="UTC")),
])
SUCCESS = "_SUCCESS"
# Not "summary.json": readers of the table (pyarrow, pandas, Spark, Athena) skip names starting
# with "_" or ".", and would otherwise try to read the summary as a Parquet file.
SUMMARY = "_summary.json"


def _run_dirs(output: str, options: StorageOptions) -> list[tuple[str, str]]:
    """(run_id, run folder) of every run under OUTPUT, complete or not."""
    output = storage.normalize(output)
    found = []
    if storage.is_s3(output):
        fs = storage.fsspec_filesystem(options)
        for d in fs.glob(output[len("s3://"):] + "/dt=*/run_id=*"):
            found.append((d.rsplit("run_id=", 1)[1], "s3://" + d))
    elif Path(output).is_dir():
        for d in sorted(Path(output).glob("dt=*/run_id=*")):
            found.append((d.name.split("=", 1)[1], str(d)))
    return found


def _remove(uri: str, options: StorageOptions) -> None:
    if storage.is_s3(uri):
        fs = storage.fsspec_filesystem(options)
        if fs.exists(uri):
            fs.rm(uri, recursive=True)
    else:
        import shutil

        shutil.rmtree(uri, ignore_errors=True)


def completed_runs(output: str, options: StorageOptions) -> list[str]:
    """Folders of the runs under OUTPUT that finished (``_SUCCESS`` present)."""
    return [d for _, d in _run_dirs(output, options) if storage.exists(storage.join(d, SUCCESS), options)]


def _read_runs(dirs: list[str], columns: list[str], options: StorageOptions) -> pa.Table:
    """The given columns of every Parquet file in the given run folders."""
    files = [f for d in dirs for f in _parquet_files(d, options)]
    if not files:
        return pa.table({c: pa.array([], FILE_SCHEMA.field(c).type) for c in columns})
    fs = None
    if storage.is_s3(files[0]):
        fs, _ = storage.arrow_filesystem(files[0], options)
        files = [f[len("s3://"):] for f in files]
    return pads.dataset(files, format="parquet", filesystem=fs, schema=FILE_SCHEMA).to_table(columns=columns)


def _parquet_files(run_dir: str, options: StorageOptions) -> list[str]:
    if storage.is_s3(run_dir):
        fs = storage.fsspec_filesystem(options)
        return ["s3://" + p for p in fs.glob(run_dir[len("s3://"):] + "/*.parquet")]
    return [str(p) for p in sorted(Path(run_dir).glob("*.parquet"))]


def already_scored(output: str, model_id: str, options: StorageOptions) -> pa.Table:
    """(uri, etag) pairs with a row from ``model_id`` in a completed run under OUTPUT."""
    seen = _read_runs(completed_runs(output, options), ["uri", "etag", "model_id"], options)
    seen = seen.filter(pc.equal(seen["model_id"], model_id)).select(["uri", "etag"])
    return seen.group_by(["uri", "etag"]).aggregate([])


def _summary(table: pa.Table, *, listed: int, skipped: int, seconds: float, model_id: str, spec: ScanSpec,
             run_id: str, threshold: float) -> dict[str, Any]:
    scores = table.column("score").drop_null().to_numpy(zero_copy_only=False)
    errors = table.column("error").drop_null().to_pylist()
    reasons: dict[str, int] = {}
    for e in errors:
        kind = e.split(":", 1)[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    hist, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    return {
        "run_id": run_id, "model_id": model_id, "threshold": threshold,
        "listed": listed, "skipped": skipped, "rows": table.num_rows, "scored": int(len(scores)),
        "errors": len(errors), "errors_by_kind": reasons,
        "flagged": int(pc.sum(pc.fill_null(table.column("is_fake"), False)).as_py() or 0),
        "score_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": hist.tolist()},
        "seconds": round(seconds, 3), "images_per_s": round(table.num_rows / max(seconds, 1e-9), 2),
        "config": spec.public(),
    }
