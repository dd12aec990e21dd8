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

import asyncio
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from ntf_ray import storage
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)

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
READ_ATTEMPTS = 3  # transient read errors are retried; a missing object is not


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


# ---------------------------------------------------------------- listing


def _local_etag(size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{size}:{mtime_ns}".encode()).hexdigest()[:32]


def _local_row(uri: str, st: os.stat_result) -> dict:
    """A listing row for a local file; its etag is a digest of size and mtime."""
    return {"uri": uri, "etag": _local_etag(st.st_size, st.st_mtime_ns), "size_bytes": st.st_size,
            "last_modified": dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.timezone.utc)}


def _matches(name: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatch(name.lower(), pattern.lower())


def _iter_local(root: str, pattern: str | None) -> Iterator[dict]:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file() and not e.name.startswith(".") and _matches(e.name, pattern):
                    yield _local_row(os.path.abspath(e.path), e.stat())


def _iter_s3(prefix: str, pattern: str | None, options: StorageOptions) -> Iterator[dict]:
    """Paginated ListObjectsV2: one page (up to 1,000 keys) in memory at a time."""
    from fsspec.asyn import sync

    fs = storage.fsspec_filesystem(options)
    bucket, key = storage.split_s3(prefix)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if obj["Key"].endswith("/") or not _matches(name, pattern):
                continue
            yield {"uri": f"s3://{bucket}/{obj['Key']}", "etag": obj.get("ETag", "").strip('"'),
                   "size_bytes": int(obj.get("Size", 0)), "last_modified": obj.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _stat_many(uris: list[str], options: StorageOptions) -> Iterator[dict]:
    """Listing rows for the uris of a manifest; a missing object still gets a row (its read fails)."""
    remote = [u for u in uris if storage.is_s3(u)]
    infos: dict[str, Any] = {}
    if remote:
        from fsspec.asyn import sync

        fs = storage.fsspec_filesystem(options)

        async def info(u: str):
            try:
                return await fs._info(u)
            except (OSError, ValueError) as exc:
                return exc

        for start in range(0, len(remote), 1000):
            chunk = remote[start : start + 1000]
            results = sync(fs.loop, asyncio.gather, *[info(u) for u in chunk])
            infos.update(zip(chunk, results))
    for u in uris:
        if storage.is_s3(u):
            i = infos[u]
            if isinstance(i, Exception):
                yield {"uri": u, "etag": None, "size_bytes": None, "last_modified": None}
            else:
                yield {"uri": u, "etag": str(i.get("ETag", "")).strip('"'), "size_bytes": int(i.get("size", 0)),
                       "last_modified": i.get("LastModified")}
        else:
            try:
                yield _local_row(u, os.stat(u))
            except OSError:
                yield {"uri": u, "etag": None, "size_bytes": None, "last_modified": None}


def _to_table(rows: Iterator[dict], limit: int | None, chunk: int = 10_000) -> pa.Table:
    batches, buf, n = [], [], 0
    for row in rows:
        buf.append(row)
        n += 1
        if len(buf) >= chunk:
            batches.append(pa.RecordBatch.from_pylist(buf, schema=LISTING_SCHEMA))
            buf = []
        if limit is not None and n >= limit:
            break
    if buf:
        batches.append(pa.RecordBatch.from_pylist(buf, schema=LISTING_SCHEMA))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)


def list_objects(spec: ScanSpec, options: StorageOptions) -> pa.Table:
    """The objects to scan as an Arrow table (uri, etag, size_bytes, last_modified)."""
    if (spec.input is None) == (spec.manifest is None):
        raise ValueError("give exactly one of an input prefix/folder or a manifest")
    if spec.manifest is not None:
        from ntf_ray.datasets import read_manifest

        uris = [storage.normalize(u) for u in read_manifest(spec.manifest, options).column("uri").to_pylist()]
        uris = [u for u in uris if _matches(u.rsplit("/", 1)[-1], spec.pattern)]
        if spec.limit is not None:
            uris = uris[: spec.limit]
        return _to_table(_stat_many(uris, options), None)
    root = storage.normalize(spec.input)
    if storage.is_s3(root):
        bucket, key = storage.split_s3(root)
        prefix = f"s3://{bucket}/{key.rstrip('/') + '/' if key else ''}"
        return _to_table(_iter_s3(prefix, spec.pattern, options), spec.limit)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    return _to_table(_iter_local(root, spec.pattern), spec.limit)


# ---------------------------------------------------------------- the output table


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


# ---------------------------------------------------------------- Ray Data stages


def _read_with_retries(uris: list[str], options: StorageOptions) -> list[bytes | Exception]:
    out = storage.read_many(uris, options)
    for attempt in range(1, READ_ATTEMPTS):
        retry = [i for i, v in enumerate(out)
                 if isinstance(v, Exception) and not isinstance(v, (FileNotFoundError, PermissionError, IsADirectoryError))]
        if not retry:
            break
        time.sleep(0.2 * 2**attempt)
        for i, v in zip(retry, storage.read_many([uris[i] for i in retry], options)):
            out[i] = v
    return out


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "read: not found (deleted after listing?)"
    return f"read: {type(exc).__name__}: {storage.redact(str(exc))[:160]}"


def read_objects(batch: pa.Table, *, endpoint: str | None) -> pa.Table:
    """Ray Data task: the listing rows plus ``data`` (bytes) and ``read_error``."""
    values = _read_with_retries(batch.column("uri").to_pylist(), StorageOptions(endpoint_url=endpoint))
    data = [None if isinstance(v, Exception) else v for v in values]
    errors = [_read_error(v) if isinstance(v, Exception) else None for v in values]
    return batch.append_column("data", pa.array(data, pa.binary())).append_column("read_error", pa.array(errors, pa.string()))


class DetectorActor:
    """Ray Data actor: loads the detector once, scores blocks of encoded images."""

    def __init__(self, model: str, *, endpoint: str | None, threshold: float | None, batch_size: int,
                 device: str = "auto", decoder: str = "auto"):
        import torch

        from ntf_ray.scoring import Scorer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.scorer = Scorer.from_artifact(model, device=device, threshold=threshold,
                                           options=StorageOptions(endpoint_url=endpoint), batch_size=batch_size,
                                           decoder=decoder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        data = batch.column("data").to_pylist()
        read_errors = batch.column("read_error").to_pylist()
        ok = [i for i, e in enumerate(read_errors) if e is None]
        results = dict(zip(ok, self.scorer.score_bytes([data[i] for i in ok])))
        n = batch.num_rows
        cols: dict[str, list] = {k: [None] * n for k in ("score", "is_fake", "width", "height", "format", "error",
                                                         "decoder")}
        for i in range(n):
            r = results.get(i)
            if r is None:
                cols["error"][i] = read_errors[i]
                continue
            cols["score"][i], cols["is_fake"][i], cols["error"][i] = r.score, r.is_fake, r.error
            cols["width"][i], cols["height"][i], cols["format"][i] = r.width, r.height, r.format
            cols["decoder"][i] = r.decoder
        now = dt.datetime.now(dt.timezone.utc)
        return pa.table({
            "uri": batch.column("uri"),
            "etag": batch.column("etag"),
            "size_bytes": batch.column("size_bytes"),
            "last_modified": batch.column("last_modified"),
            "score": pa.array(cols["score"], pa.float32()),
            "is_fake": pa.array(cols["is_fake"], pa.bool_()),
            "threshold": pa.array([self.scorer.threshold] * n, pa.float32()),
            "width": pa.array(cols["width"], pa.int32()),
            "height": pa.array(cols["height"], pa.int32()),
            "format": pa.array(cols["format"], pa.string()),
            "error": pa.array(cols["error"], pa.string()),
            "model_id": pa.array([self.scorer.model_id] * n, pa.string()),
            "scanned_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "decoder": pa.array(cols["decoder"], pa.string()),
        }, schema=FILE_SCHEMA)


# ---------------------------------------------------------------- the run


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict[str, Any]


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _gpus_in_cluster() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


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


@dataclass(frozen=True)
class ActorPlan:
    """How many detector actors, and what each holds."""

    min_actors: int
    max_actors: int
    gpus: float
    cpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"


def plan_actors(*, blocks: int, gpus_per_actor: float | None, min_actors: int | None, max_actors: int | None,
                cpus_per_actor: float) -> ActorPlan:
    """The detector actor pool for ``blocks`` read blocks on this cluster.

    Default: one actor per GPU (or 2 on CPU), never more than blocks, and never so many
    CPU-holding actors that Ray Data's read tasks find no CPU (the job would hang silently).
    """
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if _gpus_in_cluster() >= 1 else 0.0)
    most = max_actors or (max(1, int(_gpus_in_cluster() / gpus)) if gpus else 2)
    most = min(most, blocks)  # an actor without a block to score would only cost its start-up
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus_per_actor > 0 and cpus and most * cpus_per_actor > cpus - 1:
        fit = max(1, int((cpus - 1) // cpus_per_actor))
        if fit < most:
            log.warning("the cluster has %g CPUs: running %d detector actor(s) of %g CPU, not %d, so that "
                        "Ray Data's other tasks can run", cpus, fit, cpus_per_actor, most)
            most = fit
    least = most if min_actors is None else min(min_actors, most)
    return ActorPlan(min_actors=least, max_actors=most, gpus=gpus, cpus=cpus_per_actor)


def _write_rows(listing: pa.Table, spec: ScanSpec, threshold: float, run_dir: str,
                options: StorageOptions) -> None:
    blocks = max(1, -(-listing.num_rows // spec.read_block_rows))
    plan = plan_actors(blocks=blocks, gpus_per_actor=spec.gpus_per_actor, min_actors=spec.min_actors,
                       max_actors=spec.max_actors, cpus_per_actor=spec.cpus_per_actor)
    ds = ray.data.from_arrow(listing).repartition(blocks)
    ds = ds.map_batches(read_objects, batch_format="pyarrow", batch_size=None, fn_kwargs={"endpoint": spec.endpoint})
    ds = ds.map_batches(
        DetectorActor,
        fn_constructor_kwargs={"model": spec.model, "endpoint": spec.endpoint, "threshold": threshold,
                               "batch_size": spec.batch_size, "device": plan.device, "decoder": spec.decoder},
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_gpus=plan.gpus,
        num_cpus=plan.cpus,
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
