"""Publishing a run: its attempts' staging folders, the one Parquet file it becomes once every
listed object has its row (``Tally`` counts what was written), and its summary."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ntf_ray import storage
from ntf_ray.errors import kind as error_kind
from ntf_ray.scan.table import FILE_SCHEMA, ROWS, STAGING, parquet_dataset, parquet_files
from ntf_ray.storage import StorageOptions

if TYPE_CHECKING:
    from ntf_ray.scan.spec import ScanSpec

log = logging.getLogger(__package__)


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
    declared_sources: dict[str, int] = field(default_factory=dict)  # images by the source type they declare
    c2pa_states: dict[str, int] = field(default_factory=dict)
    provenance_problems: dict[str, int] = field(default_factory=dict)  # parts not read, by reason

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        scores = batch.column("score").drop_null().to_numpy(zero_copy_only=False)
        self.scored += len(scores)
        self.histogram += np.histogram(scores, bins=10, range=(0.0, 1.0))[0]
        self.flagged += int(pc.sum(pc.fill_null(batch.column("is_fake"), False)).as_py() or 0)
        for e in batch.column("error").drop_null().to_pylist():
            kind = error_kind(e)
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        for column, counts in (("declared_source", self.declared_sources), ("c2pa_state", self.c2pa_states)):
            for value in batch.column(column).drop_null().to_pylist():
                counts[value] = counts.get(value, 0) + 1
        for problem in batch.column("provenance_problem").drop_null().to_pylist():
            for reason in problem.split("; "):
                self.provenance_problems[reason] = self.provenance_problems.get(reason, 0) + 1


def publish(staged: str, run_dir: str, listing: Callable[[], Iterable[pa.Table]], total: int,
            lost_error: str | Callable[[np.ndarray], list[str]], *,
            run_id: str, model_id: str, threshold: float, options: StorageOptions) -> Tally:
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
        for f in parquet_files(staged, options):
            try:
                yield from parquet_dataset([f], options, STAGED_SCHEMA).to_batches()
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
                tally.add(part)
                yield part
        for chunk in listing():
            lost = chunk.filter(pa.array(~got[chunk.column(SEQ).to_numpy(zero_copy_only=False)]))
            if lost.num_rows:
                error = (lost_error if isinstance(lost_error, str)
                         else lost_error(lost.column(SEQ).to_numpy(zero_copy_only=False)))
                for part in lost_rows(lost, error, run_id=run_id, model_id=model_id, threshold=threshold).to_batches():
                    tally.add(part)
                    yield part

    target = storage.join(run_dir, ROWS)
    write_whole(target, batches(), options, scratch=staged)
    for old in parquet_files(run_dir, options):  # files of an earlier layout of this run
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


def write_whole(uri: str, batches: Iterator[pa.RecordBatch], options: StorageOptions, *, scratch: str) -> None:
    """Stream ``batches`` into one Parquet file that readers see whole or not at all.

    The file is written under ``scratch`` (a folder readers skip), then moved into place in
    one step: a local rename, or an S3 copy (one object appears whole). Written in place, an
    error midway would still complete the upload: pyarrow closes the stream, footer and all.
    """
    tmp = storage.join(scratch, f"_publish-{uuid.uuid4().hex[:12]}.parquet")
    try:
        local = storage.local_path(tmp)
        if local is not None:  # a folder to write into (an object store needs none, and pyarrow would add markers)
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        fs, path = storage.arrow_filesystem(tmp, options)
        with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, FILE_SCHEMA) as writer:
            for b in batches:
                writer.write_batch(b)
        storage.move(tmp, uri, options)  # the scratch copy goes with the move
    except BaseException:
        storage.remove(tmp, options)
        raise


def run_summary(tally: Tally, *, listed: int, skipped: int, seconds: float, model_id: str, spec: ScanSpec,
             run_id: str, threshold: float) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, 11)
    # as the detectors' rows say: their environment is the one that counts, not the driver's
    c2pa = ("off (--no-provenance)" if not spec.provenance
            else "not read: c2pa-python is not installed where the detectors ran (pip install 'ntf-ray[c2pa]')"
            if tally.provenance_problems.get("c2pa: not installed") else "read")
    return {
        "run_id": run_id, "model_id": model_id, "threshold": threshold,
        "listed": listed, "skipped": skipped, "rows": tally.rows, "scored": tally.scored,
        "errors": sum(tally.errors_by_kind.values()), "errors_by_kind": tally.errors_by_kind,
        "flagged": tally.flagged,
        "score_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": tally.histogram.tolist()},
        "provenance": {"c2pa": c2pa, "declared_sources": tally.declared_sources, "c2pa_states": tally.c2pa_states,
                       "problems": tally.provenance_problems},
        "seconds": round(seconds, 3), "images_per_s": round(tally.rows / max(seconds, 1e-9), 2),
        "config": spec.public(),
    }
