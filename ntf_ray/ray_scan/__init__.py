"""Scan object storage with Ray Data: list, read, decode and score in detector actors, write a score table.

One row per listed object, always: objects that cannot be read or decoded get an error
row with a short reason, and the run goes on. The table follows the contract in the
architecture notes (columns, types, ``OUTPUT/dt=YYYY-MM-DD/run_id=ID/``), and a run is
complete only once ``_summary.json`` and ``_SUCCESS`` are written after its rows were
counted back. Re-running a run_id first removes that run's files, so a run that failed
midway and is resubmitted ends with one row per object and no duplicates.

Incremental mode (``ntf-ray moderate``) scores only objects whose (uri, etag) has no row
from the same model_id in a completed earlier run under OUTPUT.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray import storage

# "X as X": not used here, re-exported as part of the module's interface before the split
from ntf_ray.ray_scan.actor import ActorPlan as ActorPlan
from ntf_ray.ray_scan.actor import DetectorActor, scored_stream
from ntf_ray.ray_scan.actor import plan_actors as plan_actors
from ntf_ray.ray_scan.listing import list_objects
from ntf_ray.ray_scan.reading import READ_ATTEMPTS as READ_ATTEMPTS
from ntf_ray.ray_scan.reading import _read_with_retries as _read_with_retries
from ntf_ray.ray_scan.reading import read_objects as read_objects
from ntf_ray.ray_scan.table import FILE_SCHEMA as FILE_SCHEMA
from ntf_ray.ray_scan.table import LISTING_SCHEMA as LISTING_SCHEMA
from ntf_ray.ray_scan.table import SCORE_SCHEMA as SCORE_SCHEMA
from ntf_ray.ray_scan.table import SUCCESS, SUMMARY, _read_runs, _remove, _run_dirs, _summary, already_scored
from ntf_ray.ray_scan.table import completed_runs as completed_runs
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)


@dataclass
class ScanSpec:
    """What to scan, with which model, and where the table goes."""

    model: str
    output: str
    input: str | None = None  # s3:// prefix or local folder
    manifest: str | None = None  # or a manifest's uris
    run_id: str | None = None
    incremental: bool = False
    threshold: float | None = None  # default: the artifact's
    pattern: str | None = None  # glob on the object's name, e.g. "*.jpg"
    limit: int | None = None
    batch_size: int = 64
    min_actors: int | None = None  # default: max_actors (a fixed pool, all started at once)
    max_actors: int | None = None  # default: GPUs, or 2 on CPU
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    decoder: str = "auto"  # auto: nvJPEG for plain JPEGs on GPU actors, the core decoder otherwise
    read_block_rows: int = 128
    endpoint: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The spec as it goes into _summary.json (no endpoint: it may name internal hosts)."""
        return {k: v for k, v in asdict(self).items() if k != "endpoint"}


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict[str, Any]


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def scan(spec: ScanSpec) -> ScanResult:
    """Run one scan; returns where its table is and its summary (also in _summary.json)."""
    from ntf_ray.artifact import load_artifact

    options = StorageOptions(endpoint_url=spec.endpoint)
    output = storage.normalize(spec.output)
    run_id = spec.run_id or new_run_id()
    art = load_artifact(spec.model, options=options)  # fail early on a bad artifact, before listing
    threshold = art.threshold if spec.threshold is None else float(spec.threshold)
    start = time.perf_counter()

    listing = list_objects(spec, options)
    listed = listing.num_rows
    skipped = 0
    if spec.incremental:
        seen = already_scored(output, art.model_id, options)
        todo = listing.join(seen, keys=["uri", "etag"], join_type="left anti") if seen.num_rows else listing
        skipped = listed - todo.num_rows
        listing = todo
    log.info("scan %s: %d objects listed, %d to score, %d already scored by model %s", run_id, listed,
             listing.num_rows, skipped, art.model_id)

    # Re-running a run_id replaces it (on whatever day it first ran): no duplicate rows.
    for rid, d in _run_dirs(output, options):
        if rid == run_id:
            log.info("removing the earlier files of run %s at %s", run_id, d)
            _remove(d, options)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    run_dir = storage.join(output, f"dt={day}", f"run_id={run_id}")

    if listing.num_rows:
        _write_rows(listing, spec, threshold, run_dir, options)
    table = _read_runs([run_dir], ["uri", "score", "is_fake", "error"], options)
    if table.num_rows != listing.num_rows or pc.count_distinct(table["uri"]).as_py() != listing.num_rows:
        raise RuntimeError(f"scan {run_id}: wrote {table.num_rows} rows for {listing.num_rows} objects; "
                           "the run is not marked complete")
    summary = _summary(table, listed=listed, skipped=skipped, seconds=time.perf_counter() - start,
                       model_id=art.model_id, spec=spec, run_id=run_id, threshold=threshold)
    summary["table"] = run_dir
    storage.write_bytes(storage.join(run_dir, SUMMARY), json.dumps(summary, indent=2).encode(), options)
    storage.write_bytes(storage.join(run_dir, SUCCESS), b"", options)
    return ScanResult(run_id=run_id, run_dir=run_dir, summary=summary)


def _write_rows(listing: pa.Table, spec: ScanSpec, threshold: float, run_dir: str,
                options: StorageOptions) -> None:
    ds = scored_stream(
        listing, DetectorActor,
        {"model": spec.model, "endpoint": spec.endpoint, "threshold": threshold, "batch_size": spec.batch_size,
         "decoder": spec.decoder},
        endpoint=spec.endpoint, batch_size=spec.batch_size, read_block_rows=spec.read_block_rows,
        gpus_per_actor=spec.gpus_per_actor, min_actors=spec.min_actors, max_actors=spec.max_actors,
        cpus_per_actor=spec.cpus_per_actor,
    )
    if storage.is_s3(run_dir):
        fs, path = storage.arrow_filesystem(run_dir, options)
        ds.write_parquet(path, filesystem=fs)
    else:
        ds.write_parquet(run_dir)


def format_summary(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary["errors_by_kind"].items())) or "none"
    return (f"run {summary['run_id']} (model {summary['model_id']}): {summary['listed']} listed, "
            f"{summary['skipped']} skipped as already scored, {summary['scored']} scored, "
            f"{summary['flagged']} flagged as fake (score >= {summary['threshold']:g}), "
            f"{summary['errors']} errors ({errors}); {summary['images_per_s']:.1f} images/s over "
            f"{summary['seconds']:.1f} s\ntable: {summary['table']}")
