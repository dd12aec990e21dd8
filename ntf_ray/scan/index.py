"""What a model already scored under OUTPUT: the skip index of ``moderate``.

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

import json
import logging
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ntf_ray import storage
from ntf_ray.errors import LOST_ALONE_PATTERN, RETRIED_ERRORS
from ntf_ray.scan.table import INDEX, is_complete, read_runs, runs_by_id
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)


#: What a row says about the object it scored, and what the listing must match to skip it:
#: its uri, etag and last-modified time (µs since the epoch; -1 unknown). The etag alone is an
#: MD5 for most S3 objects, and two images with one MD5 are known; S3 sets last-modified on
#: every write, so bytes written again under the same etag are a new object. Local files'
#: etags already cover size, times and inode (``storage.local.local_etag``).
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


def index_path(output: str, model_id: str) -> str:
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
    return sum_losses([rows])


def sum_losses(parts: list[pa.Table]) -> pa.Table:
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
    runs = {rid: run for rid, run in runs_by_id(output, options).items() if is_complete(run.names) and rid != exclude_run}
    versions = {rid: run.version or "" for rid, run in runs.items()}
    seen, losses, indexed = _read_index(output, model_id, options)
    stale = sorted(r for r, v in indexed.items() if versions.get(r) != v)
    if stale:
        log.info("the index of model %s read %d run(s) that changed or went since (%s): reading every run again",
                 model_id, len(stale), ", ".join(stale[:5]))
        seen, losses, indexed = None, None, {}
    fresh = read_runs([runs[r].folder for r in sorted(set(runs) - set(indexed))],
                       ["uri", "etag", "last_modified", "model_id", "error"], options)
    pairs = _distinct([t for t in (seen, _final_pairs(fresh, model_id)) if t is not None])
    lost = sum_losses([losses, _lost_alone(fresh, model_id)])
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
    path = index_path(output, model_id)
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
        parts.append(_not_final(sum_losses([losses]), final.select(KEY)))
    table = pa.concat_tables(parts).replace_schema_metadata({"runs": json.dumps(dict(sorted(runs.items())))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(index_path(output, model_id), sink.getvalue().to_pybytes(), options)
