"""The score table: its schemas and file names, the run folders under OUTPUT, which runs
completed, what a model already scored there, publishing a run, and a run's summary.

A run writes its rows under ``OUTPUT/_staging/run_id=ID/`` (readers skip names that start
with ``_``) and is published, once every listed object has its row, as one Parquet file
``OUTPUT/dt=DAY/run_id=ID/scores.parquet`` written in one piece (a local rename, one S3
object), then ``_summary.json`` and ``_SUCCESS``. So a reader of ``OUTPUT`` sees a run's rows
all at once or not at all, whatever crashes, and re-running a run replaces its file in place.

Errors a later ``moderate`` retries: ``read:`` (transient, missing or changed object),
``worker_lost:`` and ``decode: out of memory``. Every other error is final for that object
and model: ``decode:``, ``too_large:``, ``unsupported_format:``, ``unsupported_name:``,
``poison:`` (``ntf_ray.errors``). An object is its skip key (``KEY``): uri, etag and
last-modified time, so bytes replaced under the same etag (an MD5 collision) are scored again.
The index also keeps how often each object not yet final was lost alone, summed over runs,
which is what turns ``worker_lost`` into ``poison``, and the version of every run it read, so
a run replaced or removed since (a re-used run id, by any model) makes the next check read
every run again instead of trusting what the index says that run held.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ntf_ray import storage
from ntf_ray.errors import LOST_ALONE_PATTERN, RETRIED_ERRORS, is_retried, lost_alone
from ntf_ray.storage import StorageOptions

if TYPE_CHECKING:
    from ntf_ray.scan.spec import ScanSpec

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
    # Added after the architecture's columns: which decoder made the pixels ("pil", "nvjpeg"
    # or "nvimgcodec"; null when the object could not be read). nvjpeg's scores differ slightly.
    ("decoder", pa.string()),
])
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
log = logging.getLogger(__package__)

SUCCESS = "_SUCCESS"
# Not "summary.json": readers of the table (pyarrow, pandas, Spark, Athena) skip names starting
# with "_" or ".", and would otherwise try to read the summary as a Parquet file.
SUMMARY = "_summary.json"
#: The one file a published run holds.
ROWS = "scores.parquet"
#: Where runs write before they are complete, and the index of what each model scored.
STAGING, INDEX = "_staging", "_index"
_RUN_FILE = re.compile(r"(?:^|/)dt=([^/]+)/run_id=([^/]+)/([^/]+)$")


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _files_under(output: str, options: StorageOptions) -> Iterator[tuple[str, str]]:
    """Every file under OUTPUT as (path relative to it, its version: the S3 ETag, or size,
    mtime and inode), from a listing, never a pattern."""
    if storage.is_s3(output):
        fs = storage.fsspec_filesystem(options)
        base = output[len("s3://"):].rstrip("/")
        for path, info in fs.find(base, detail=True).items():
            yield path[len(base) + 1:], str(info.get("ETag", "")).strip('"')
    elif Path(output).is_dir():
        for folder, dirs, files in os.walk(output):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            rel = os.path.relpath(folder, output)
            for name in files:
                try:
                    version = _local_version(os.stat(os.path.join(folder, name)))
                except OSError:  # removed while listed
                    continue
                yield (name if rel == "." else f"{rel}/{name}"), version


@dataclass
class _Run:
    folder: str
    names: set[str] = field(default_factory=set)
    version: str | None = None  # of its scores.parquet: changes whenever the run is published again


def _runs(output: str, options: StorageOptions) -> dict[str, _Run]:
    """run_id -> its folder, the names of its files and its version, for every published or
    legacy run under OUTPUT."""
    output = storage.normalize(output)
    found: dict[str, _Run] = {}
    for rel, version in _files_under(output, options):
        m = _RUN_FILE.match(rel)
        if m and not rel.startswith(("_", ".")):
            day, run_id, name = m.groups()
            run = found.setdefault(run_id, _Run(storage.join(output, f"dt={day}", f"run_id={run_id}")))
            run.names.add(name)
            if name == ROWS:
                run.version = version
    return found


def run_version(run_dir: str, options: StorageOptions) -> str:
    """The version of a published run's rows (as ``_runs`` reads it)."""
    rows = storage.join(run_dir, ROWS)
    if storage.is_s3(rows):
        return str(storage.fsspec_filesystem(options).info(rows).get("ETag", "")).strip('"')
    return _local_version(os.stat(rows))


def _run_dirs(output: str, options: StorageOptions) -> list[tuple[str, str]]:
    """(run_id, run folder) of every run under OUTPUT, complete or not."""
    return sorted((rid, run.folder) for rid, run in _runs(output, options).items())


def _is_complete(names: set[str]) -> bool:
    # scores.parquet is written whole, and only once the run's rows were all counted: it alone
    # says the run is complete, even if the driver died before writing _SUCCESS after it.
    return SUCCESS in names or ROWS in names


def completed_runs(output: str, options: StorageOptions) -> list[str]:
    """Folders of the runs under OUTPUT that finished."""
    return sorted(run.folder for run in _runs(output, options).values() if _is_complete(run.names))


def _parquet_files(run_dir: str, options: StorageOptions) -> list[str]:
    if storage.is_s3(run_dir):
        fs = storage.fsspec_filesystem(options)
        base = run_dir[len("s3://"):].rstrip("/")
        return sorted("s3://" + p for p in fs.find(base, maxdepth=1) if p.endswith(".parquet")
                      and not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not Path(run_dir).is_dir():
        return []
    return sorted(str(p) for p in Path(run_dir).iterdir() if p.suffix == ".parquet" and not p.name.startswith(("_", ".")))


def _dataset(files: list[str], options: StorageOptions, schema: pa.Schema = FILE_SCHEMA) -> pads.Dataset | None:
    if not files:
        return None
    fs = None
    if storage.is_s3(files[0]):
        fs, _ = storage.arrow_filesystem(files[0], options)
        files = [f[len("s3://"):] for f in files]
    return pads.dataset(files, format="parquet", filesystem=fs, schema=schema)


def _read_runs(dirs: list[str], columns: list[str], options: StorageOptions) -> pa.Table:
    """The given columns of every Parquet file in the given run folders."""
    ds = _dataset([f for d in dirs for f in _parquet_files(d, options)], options)
    if ds is None:
        return pa.table({c: pa.array([], FILE_SCHEMA.field(c).type) for c in columns})
    return ds.to_table(columns=columns)


#: What a row says about the object it scored, and what the listing must match to skip it:
#: its uri, etag and last-modified time (µs since the epoch; -1 unknown). The etag alone is an
#: MD5 for most S3 objects, and two images with one MD5 are known; S3 sets last-modified on
#: every write, so bytes written again under the same etag are a new object. Local files'
#: etags already cover size, times and inode (``storage.local_etag``).
KEY = ["uri", "etag", "modified"]
KEY_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("modified", pa.int64())])
LOSSES_SCHEMA = KEY_SCHEMA.append(pa.field("losses", pa.int64()))


def skip_key(rows: pa.Table | pa.RecordBatch) -> pa.Table:
    """``KEY`` of each row of a table with uri, etag and last_modified (a null etag reads as ''
    and an unknown time as -1, so that rows without them still match each other)."""
    modified = pc.cast(rows.column("last_modified").cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return pa.table({"uri": rows.column("uri"), "etag": pc.fill_null(rows.column("etag"), ""),
                     "modified": pc.fill_null(modified, -1)}, schema=KEY_SCHEMA)


def _distinct(keys: list[pa.Table]) -> pa.Table:
    keys = [k.select(KEY).cast(KEY_SCHEMA) for k in keys if k.num_rows]
    if not keys:
        return KEY_SCHEMA.empty_table()
    return pa.concat_tables(keys).group_by(KEY).aggregate([]).select(KEY)


def _final_pairs(table: pa.Table, model_id: str) -> pa.Table:
    """Distinct ``KEY`` of rows from ``model_id`` whose outcome is final."""
    keep = pc.equal(table["model_id"], model_id)
    retried = pc.match_substring_regex(table["error"], "^(?:" + "|".join(map(re.escape, RETRIED_ERRORS)) + ")")
    keep = pc.and_(keep, pc.invert(pc.fill_null(retried, False)))
    return _distinct([skip_key(table.filter(pc.fill_null(keep, False)))])


def _index_path(output: str, model_id: str) -> str:
    return storage.join(storage.normalize(output), INDEX, f"model_id={model_id}", "scored.parquet")


@dataclass
class History:
    """What a model's completed runs under OUTPUT say about the objects it saw."""

    seen: pa.Table  # KEY of objects with a final row: never scored again
    losses: pa.Table  # KEY + losses: times each not-final object was lost alone, summed over runs
    runs: dict[str, str]  # run id -> version of the runs read (what the index records)


def _lost_alone(table: pa.Table, model_id: str) -> pa.Table:
    """``KEY`` + losses: how many times ``model_id``'s rows say each object was lost alone."""
    rows = table.filter(pc.fill_null(pc.equal(table["model_id"], model_id), False))
    found = pc.extract_regex(pc.fill_null(rows["error"], ""), LOST_ALONE_PATTERN)
    alone = pc.cast(pc.struct_field(found, "alone"), pa.int64())
    rows = skip_key(rows).append_column("losses", alone).filter(pc.is_valid(alone))
    return _sum_losses([rows])


def _sum_losses(parts: list[pa.Table]) -> pa.Table:
    parts = [t.select(LOSSES_SCHEMA.names).cast(LOSSES_SCHEMA) for t in parts if t is not None and t.num_rows]
    if not parts:
        return LOSSES_SCHEMA.empty_table()
    total = pa.concat_tables(parts).group_by(KEY).aggregate([("losses", "sum")])
    return total.rename_columns([*KEY, "losses"]).select(LOSSES_SCHEMA.names)


def _not_final(losses: pa.Table, seen: pa.Table) -> pa.Table:
    if not losses.num_rows or not seen.num_rows:
        return losses
    return seen.join(losses, keys=KEY, join_type="right anti").select(LOSSES_SCHEMA.names)


def history(output: str, model_id: str, options: StorageOptions, *, exclude_run: str | None = None) -> History:
    """The objects (``KEY``) ``model_id`` has a final row for in a completed run under OUTPUT,
    the times each other object was lost alone (for ``poison``), and the runs read.

    ``exclude_run``'s own rows never count (re-running a run replaces it). What runs already
    folded into the model's index (``OUTPUT/_index/``) hold comes from that one file, so the
    check reads only the runs since the last ``moderate``, not all history; but only while
    every run the index read is still there as it was read: one published again since (a
    re-used run id, by this model or another, with ``scan`` or ``moderate``), removed, or
    about to be replaced (``exclude_run``) makes it read every run again.
    """
    runs = {rid: run for rid, run in _runs(output, options).items() if _is_complete(run.names) and rid != exclude_run}
    versions = {rid: run.version or "" for rid, run in runs.items()}
    seen, losses, indexed = _read_index(output, model_id, options)
    stale = sorted(r for r, v in indexed.items() if versions.get(r) != v)
    if stale:
        log.info("the index of model %s read %d run(s) that changed or went since (%s): reading every run again",
                 model_id, len(stale), ", ".join(stale[:5]))
        seen, losses, indexed = None, None, {}
    fresh = _read_runs([runs[r].folder for r in sorted(set(runs) - set(indexed))],
                       ["uri", "etag", "last_modified", "model_id", "error"], options)
    pairs = _distinct([t for t in (seen, _final_pairs(fresh, model_id)) if t is not None])
    lost = _sum_losses([losses, _lost_alone(fresh, model_id)])
    return History(seen=pairs, losses=_not_final(lost, pairs), runs=versions)


def already_scored(output: str, model_id: str, options: StorageOptions, *,
                   exclude_run: str | None = None) -> tuple[pa.Table, list[str]]:
    """``KEY`` of the objects ``model_id`` has a final row for in a completed run under OUTPUT,
    and the run ids they were read from (``history`` without the losses)."""
    found = history(output, model_id, options, exclude_run=exclude_run)
    return found.seen, sorted(found.runs)


def _read_index(output: str, model_id: str,
                options: StorageOptions) -> tuple[pa.Table | None, pa.Table | None, dict[str, str]]:
    """(final keys, losses, run id -> version of the runs folded in) of the model's index. An
    index from before runs had versions and keys a last-modified time reads as empty: the check
    then reads every run once, and the index is written anew."""
    path = _index_path(output, model_id)
    try:
        data = storage.read_bytes(path, options)
    except FileNotFoundError:
        return None, None, {}
    table = pq.read_table(pa.BufferReader(data))
    runs = json.loads((table.schema.metadata or {}).get(b"runs", b"[]"))
    if not isinstance(runs, dict) or not set(LOSSES_SCHEMA.names) <= set(table.column_names):
        log.info("the index of model %s is of an earlier layout: reading every run once", model_id)
        return None, None, {}
    table = table.select(LOSSES_SCHEMA.names).cast(LOSSES_SCHEMA)
    final = pc.is_null(table["losses"])
    return (table.filter(final).select(KEY), table.filter(pc.invert(final)), {str(k): str(v) for k, v in runs.items()})


def write_index(output: str, model_id: str, pairs: pa.Table, runs: dict[str, str], options: StorageOptions,
                losses: pa.Table | None = None) -> None:
    """Replace the model's index with ``pairs`` (``KEY``, final) and ``losses`` (not final, lost
    alone so many times) read from ``runs`` (run id -> version; one whole-file write)."""
    final = _distinct([pairs])
    final = final.append_column("losses", pa.nulls(final.num_rows, pa.int64()))
    parts = [final.cast(LOSSES_SCHEMA)]
    if losses is not None and losses.num_rows:
        parts.append(_not_final(_sum_losses([losses]), final.select(KEY)))
    table = pa.concat_tables(parts).replace_schema_metadata({"runs": json.dumps(dict(sorted(runs.items())))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(_index_path(output, model_id), sink.getvalue().to_pybytes(), options)


def staging_dir(output: str, run_id: str, attempt: str | None = None) -> str:
    """Where a run's attempt stages its rows (each attempt its own folder: two drivers of one
    run id, a scheduler's retry beside a run still going, never mix their files)."""
    run = storage.join(storage.normalize(output), STAGING, f"run_id={run_id}")
    return run if attempt is None else storage.join(run, f"attempt={attempt}")


#: The column a scan's staged rows carry beside the table's: the object's place in the run's
#: listing, so publishing can find duplicates and missing rows with one bit per object.
SEQ = "seq"
STAGED_SCHEMA = FILE_SCHEMA.append(pa.field(SEQ, pa.int64()))


@dataclass
class Tally:
    """What a published run holds, counted as its rows stream past (the summary's figures)."""

    rows: int = 0
    scored: int = 0
    flagged: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(10, np.int64))
    final: list[pa.Table] = field(default_factory=list)  # KEY of final outcomes, when kept
    losses: list[pa.Table] = field(default_factory=list)  # KEY + losses of objects lost alone, when kept

    def add(self, batch: pa.RecordBatch, keep_final: bool) -> None:
        self.rows += batch.num_rows
        scores = batch.column("score").drop_null().to_numpy(zero_copy_only=False)
        self.scored += len(scores)
        self.histogram += np.histogram(scores, bins=10, range=(0.0, 1.0))[0]
        self.flagged += int(pc.sum(pc.fill_null(batch.column("is_fake"), False)).as_py() or 0)
        errors = batch.column("error").to_pylist()
        for e in errors:
            if e is not None:
                kind = e.split(":", 1)[0]
                self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        if keep_final:
            final = pa.array([not is_retried(e) for e in errors], pa.bool_())
            self.final.append(skip_key(batch.filter(final)))
            alone = [lost_alone(e) for e in errors]
            if any(alone):
                lost = skip_key(batch).append_column("losses", pa.array(alone, pa.int64()))
                self.losses.append(lost.filter(pc.greater(lost["losses"], 0)))


def publish(staged: str, run_dir: str, listing: Callable[[], Iterable[pa.Table]], total: int,
            lost_error: str | Callable[[np.ndarray], list[str]], *,
            run_id: str, model_id: str, threshold: float, options: StorageOptions, keep_final: bool = False) -> Tally:
    """Write the run's rows as ``run_dir/scores.parquet`` in one piece, and count them.

    ``listing()`` gives the run's listing again, in chunks, each row with its ``seq``
    (0..total-1), which the staged rows carry too. One row per listed object: a ``seq``
    staged twice (a retried task) keeps its first row, and one never staged (its worker was
    lost for good) gets a row with ``lost_error`` (or ``lost_error(seqs)``, one error per
    object). Memory: one bit per object and a batch.
    """
    got = np.zeros(total, np.bool_)
    tally = Tally()

    def staged_batches() -> Iterator[pa.RecordBatch]:
        for f in _parquet_files(staged, options):
            try:
                yield from _dataset([f], options, STAGED_SCHEMA).to_batches()
            except (OSError, pa.ArrowInvalid) as exc:  # a file its killed writer left truncated
                log.warning("skipping a staged file that does not read (%s); its objects get rows as lost",
                            type(exc).__name__)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in staged_batches():
            seq = batch.column(SEQ).to_numpy(zero_copy_only=False)
            keep = np.zeros(len(seq), np.bool_)
            keep[np.unique(seq, return_index=True)[1]] = True
            keep &= ~got[seq]
            got[seq[keep]] = True
            if keep.any():
                part = batch.filter(pa.array(keep)).select(FILE_SCHEMA.names)
                tally.add(part, keep_final)
                yield part
        for chunk in listing():
            lost = chunk.filter(pa.array(~got[chunk.column(SEQ).to_numpy(zero_copy_only=False)]))
            if lost.num_rows:
                error = (lost_error if isinstance(lost_error, str)
                         else lost_error(lost.column(SEQ).to_numpy(zero_copy_only=False)))
                for part in lost_rows(lost, error, run_id=run_id, model_id=model_id, threshold=threshold).to_batches():
                    tally.add(part, keep_final)
                    yield part

    target = storage.join(run_dir, ROWS)
    _write_whole(target, batches(), options, scratch=staged)
    for old in _parquet_files(run_dir, options):  # files of an earlier layout of this run
        if old != target:
            storage.remove(old, options)
    return tally


def lost_rows(listing: pa.Table, error: str | list[str], *, run_id: str, model_id: str,
              threshold: float) -> pa.Table:
    """Error rows for listed objects that have no row of their own (one error for all, or one each)."""
    n = listing.num_rows
    columns = {f.name: pa.nulls(n, f.type) for f in FILE_SCHEMA}
    for name in ("uri", "etag", "size_bytes", "last_modified"):
        columns[name] = listing.column(name)
    columns["error"] = pa.array([error] * n if isinstance(error, str) else error, pa.string())
    columns["threshold"] = pa.array([threshold] * n, pa.float32())
    columns["model_id"] = pa.array([model_id] * n, pa.string())
    columns["scanned_at"] = pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
    return pa.table(columns, schema=FILE_SCHEMA)


def _write_whole(uri: str, batches: Iterator[pa.RecordBatch], options: StorageOptions, *, scratch: str) -> None:
    """Stream ``batches`` into one Parquet file that readers see whole or not at all.

    The file is written under ``scratch`` (a folder readers skip), then moved into place in
    one step: a local rename, or an S3 copy (one object appears whole). Written in place, an
    error midway would still complete the upload: pyarrow closes the stream, footer and all.
    """
    tmp = storage.join(scratch, f"_publish-{uuid.uuid4().hex[:12]}.parquet")
    try:
        if storage.is_s3(uri):
            fs, path = storage.arrow_filesystem(tmp, options)
            with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, FILE_SCHEMA) as writer:
                for b in batches:
                    writer.write_batch(b)
            storage.fsspec_filesystem(options).cp_file(tmp, uri)  # one file, never a pattern
        else:
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            with pq.ParquetWriter(tmp, FILE_SCHEMA) as writer:
                for b in batches:
                    writer.write_batch(b)
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, uri)
    finally:
        storage.remove(tmp, options)


def _summary(tally: Tally, *, listed: int, skipped: int, seconds: float, model_id: str, spec: ScanSpec,
             run_id: str, threshold: float) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, 11)
    return {
        "run_id": run_id, "model_id": model_id, "threshold": threshold,
        "listed": listed, "skipped": skipped, "rows": tally.rows, "scored": tally.scored,
        "errors": sum(tally.errors_by_kind.values()), "errors_by_kind": tally.errors_by_kind,
        "flagged": tally.flagged,
        "score_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": tally.histogram.tolist()},
        "seconds": round(seconds, 3), "images_per_s": round(tally.rows / max(seconds, 1e-9), 2),
        "config": spec.public(),
    }
