"""Scan object storage with Ray Data: list, read, decode and score in detector actors, write a score table.

The listing is the head of the scan: it runs in a thread while what it has listed is scored,
in windows that start small and grow (``feed``), so the first rows come within seconds
whatever the bucket holds. One row per listed object, always: objects that cannot be read or decoded get an error
row with a short reason, and the run goes on; objects lost with a worker that died are
scored again in smaller groups until only the one at fault is left (``isolation``). The
table follows the contract in docs/contracts.md (columns, types, ``OUTPUT/dt=YYYY-MM-DD/run_id=ID/``). A run's rows are
staged and published in one piece once every listed object has its row (see ``table``), so
readers never see a crashed or running run, and re-running a run id replaces it only when
the new attempt succeeds.

Incremental mode (``ntf-ray moderate``) scores only objects whose (uri, etag, last-modified) has no final
row from the same model_id in another completed run under OUTPUT (errors such as ``read:``
are retried), and holds OUTPUT's lease (``lock``) so that two such runs never overlap. The
model's index is held by index actors, not the driver (``skip``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import ray

from ntf_ray import storage
from ntf_ray.errors import lost_error
from ntf_ray.images.provenance import C2paTrust
from ntf_ray.ray_edge.runtime import cluster_cores
from ntf_ray.ray_edge.scan import feed
from ntf_ray.ray_edge.scan.actor import ACTORS_PER_GPU, GPU_STREAMS, DetectorActor, check_gpus, scored_stream
from ntf_ray.ray_edge.scan.feed import ListingFeed, LiveWindow, block_bounds, read_listing  # noqa: F401 - block_bounds: part of this package's face
from ntf_ray.ray_edge.scan.isolation import LostAlone, score_isolating
from ntf_ray.ray_edge.scan.skip import SkipIndex
from ntf_ray.ray_edge.scan.telemetry import count_listed
from ntf_ray.scan.lock import LeaseLost, Watch, attempt, lease, watched
from ntf_ray.scan.publish import Tally, publish, run_summary
from ntf_ray.scan.spec import ScanResult, ScanSpec, check_run_id, new_run_id
from ntf_ray.scan.table import SUCCESS, SUMMARY, run_dirs, run_version
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)


def scan(spec: ScanSpec) -> ScanResult:
    """Run one scan; returns where its table is and its summary (also in _summary.json)."""
    from ntf_ray.detector.artifact import load_artifact

    options = StorageOptions.resolve(spec.endpoint)
    output = storage.normalize(spec.output)
    run_id = check_run_id(spec.run_id or new_run_id())
    if spec.max_bytes is not None and spec.max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {spec.max_bytes}")
    for name in ("read_block_bytes", "streams", "read_ahead_bytes", "max_pixels"):  # the pool's: ActorPool checks
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    art = load_artifact(spec.model, options=options)  # fail early on a bad artifact, before listing
    trust = C2paTrust.from_files(spec.c2pa_trust).anchors if spec.provenance else ""  # and on a bad trust list
    if spec.gpus_per_actor and ray.is_initialized():  # before the lease: what no node can place is refused now
        check_gpus(spec.gpus_per_actor)
    threshold = art.threshold if spec.threshold is None else float(spec.threshold)
    start = time.perf_counter()

    progress = _Progress()
    watch = Watch(progress.state, spec.stall_s)
    guard = lease(output, run_id, options, watch=watch) if spec.incremental else watched(watch)
    # the attempt inside the lease: its staging is gone before the next run may start
    with guard as held, attempt(output, run_id, options) as staged:
        found = SkipIndex(output, art.model_id, options, exclude_run=run_id) if spec.incremental else None
        try:
            result = _scan_listed(spec, options, art.model_id, threshold, run_id, output, staged, found, progress,
                                  start, held, trust)
        finally:
            if found is not None:
                found.close()
    return result


def _scan_listed(spec: ScanSpec, options: StorageOptions, model_id: str, threshold: float, run_id: str, output: str,
                 staged: str, found: SkipIndex | None, progress: _Progress, start: float, held,
                 trust: str) -> ScanResult:
    """List, score and publish, inside the scan's lease and attempt."""
    listing = ListingFeed(spec, options, found, staged, on_chunk=progress.tick, map_files=ray_map,
                          live=feed.LIVE_BLOCKS).start()
    try:
        return _score_and_publish(spec, options, model_id, threshold, run_id, output, staged, found, progress, start,
                                  held, listing, trust)
    finally:
        listing.close()


def _score_and_publish(spec: ScanSpec, options: StorageOptions, model_id: str, threshold: float, run_id: str,
                       output: str, staged: str, found: SkipIndex | None, progress: _Progress, start: float, held,
                       listing: ListingFeed, trust: str) -> ScanResult:
    # Re-running a run_id replaces it in place (on whatever day it first ran), once it succeeds.
    earlier = dict(run_dirs(output, options)).get(run_id)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    run_dir = earlier or storage.join(output, f"dt={day}", f"run_id={run_id}")
    progress.scoring(staged, options)
    lost = LostAlone()
    try:
        return _isolate_and_publish(spec, options, model_id, threshold, run_id, staged, found, progress, start, held,
                                    listing, trust, run_dir, lost)
    except BaseException:
        if found is not None and lost.counts.any():  # what killed workers is kept though nothing is published
            _keep_losses(found, lost, listing, held)
        raise


def _keep_losses(found: SkipIndex, lost: LostAlone, listing: ListingFeed, held) -> None:
    """Record in the model's index what a run that did not publish lost alone, while the run
    still holds OUTPUT's lease (a run that stalled gave it back: another may hold it now)."""
    try:
        held.check()
        kept = lost.keys(listing.tables())
    except LeaseLost:
        log.warning("this run no longer holds the output's lease: the objects it lost alone are not recorded")
        return
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("could not read back which objects this run lost alone; the next run does not know them")
        return
    found.record_losses(kept)


def _isolate_and_publish(spec: ScanSpec, options: StorageOptions, model_id: str, threshold: float, run_id: str,
                         staged: str, found: SkipIndex | None, progress: _Progress, start: float, held,
                         listing: ListingFeed, trust: str, run_dir: str, lost: LostAlone) -> ScanResult:
    alone = score_isolating(listing, staged, options,
                            lambda blocks, group: _write_rows(blocks, spec, threshold, staged, options, trust,
                                                              group=group),
                            group=spec.read_block_rows, lost=lost,
                            control=lambda: _control_scores(spec, threshold, staged, options, trust))
    todo, listed, prior = listing.rows, listing.listed, listing.prior_losses()
    count_listed(todo, model_id)
    log.info("scan %s: %d objects listed, %d to score, %d already scored by model %s (%.1f s)", run_id, listed,
             todo, listed - todo, model_id, time.perf_counter() - start)
    progress.publishing()
    if spec.incremental:
        held.check()

    # in a task: the rows never pass through the driver, which gets the totals
    publishing = _publish.options(num_cpus=PUBLISH_CPUS).remote(
        staged, run_dir, listing.files, todo, alone, prior, storage.sources(),
        run_id=run_id, model_id=model_id, threshold=threshold, options=options)
    try:
        tally = ray.get(publishing)
    except ray.exceptions.RayTaskError as exc:  # the task's own error, as publishing in the driver raised it
        raise exc.cause from None
    except BaseException:  # the driver stops (a signal, an error): the task must not publish after it
        ray.cancel(publishing, force=True)
        raise
    if tally.rows != todo:  # publish writes one row per listed object by construction
        raise RuntimeError(f"scan {run_id}: published {tally.rows} rows for {todo} objects")
    summary = run_summary(tally, listed=listed, skipped=listed - todo, seconds=time.perf_counter() - start,
                       model_id=model_id, spec=spec, run_id=run_id, threshold=threshold)
    summary["table"] = run_dir
    storage.write_bytes(storage.join(run_dir, SUMMARY), json.dumps(summary, indent=2, allow_nan=False).encode(),
                        options)
    storage.write_bytes(storage.join(run_dir, SUCCESS), b"", options)
    lost.counts[:] = 0  # published: its rows say what was lost, and the index reads them from there
    if found is not None:
        # Any model's index that read this run before it was replaced sees the new version
        # and reads every run again (``index.plan``): nothing here has to remove it.
        found.commit(run_id, run_dir, run_version(run_dir, options), tally.rows)
    return ScanResult(run_id=run_id, run_dir=run_dir, summary=summary)


class _Progress:
    """What a scan's watchdog reads (``lock.Watch``): objects listed, then rows staged (the
    staged files, counted at each heartbeat); publishing is not watched."""

    def __init__(self) -> None:
        self.listed = 0
        self._staged: tuple[str, StorageOptions] | None = None
        self._watched = True

    def tick(self, rows: int) -> None:
        self.listed += rows

    def scoring(self, staged: str, options: StorageOptions) -> None:
        self._staged = (staged, options)

    def publishing(self) -> None:
        self._watched = False

    def state(self) -> tuple[int, int] | None:
        if not self._watched:
            return None
        staged = len(storage.list_names(*self._staged)) if self._staged else 0
        return self.listed, staged


#: Inventory data files read at once, each in a Ray task of its own (``ray_map``), at most:
#: never more than the cluster's cores (each task's worker is a process that imports the
#: listing's libraries; on a small machine more of them only share the same cores, and the
#: first file, the one the listing waits for, comes later).
LISTING_TASKS = 8


def ray_map(fn: Callable, items, *, in_flight: int | None = None, num_cpus: float = 0.25):
    """``map(fn, items)`` with each call a Ray task, at most ``in_flight`` of them running or
    waiting to be taken (default: ``LISTING_TASKS``, or the cluster's cores if fewer): results
    in order, the next task started as the oldest result is taken, so what waits in the
    object store is bounded. Tasks hold a quarter of a CPU: the listing runs beside the
    detector actors and read tasks it feeds."""
    if in_flight is None:
        in_flight = min(LISTING_TASKS, cluster_cores())
    task = _apply.options(num_cpus=num_cpus)
    items = iter(items)
    pending = []
    try:
        for item in items:
            pending.append(task.remote(fn, item))
            if len(pending) >= in_flight:
                break
        while pending:
            try:
                result = ray.get(pending.pop(0))
            except ray.exceptions.RayTaskError as exc:  # the task's own error, as a local call would raise it
                raise exc.cause from None
            for item in items:
                pending.append(task.remote(fn, item))
                break
            yield result
    finally:  # failed, or closed before the end (a listing stopped or started again)
        # The tasks still out finish their item, and their results are let go with ``pending``.
        # Not ray.cancel: in Ray 2.60 a cancel that meets the task's reply on the way aborts
        # the driver ("Tried to complete task that was not pending", ray-project/ray#54846).
        pending.clear()


@ray.remote(max_retries=3)
def _apply(fn: Callable, item):
    return fn(item)


#: The share of a CPU the publishing task holds (the detectors and the listing's tasks are done by then).
PUBLISH_CPUS = 0.25


@ray.remote(max_retries=1)  # on a worker lost mid-way, written again whole: the file is moved into place in one step
def _publish(staged: str, run_dir: str, listed: list[str], total: int, alone: np.ndarray, prior: np.ndarray,
             sources: list, **kw) -> Tally:
    """``publish`` the run from its staging folder: the staged rows, deduplicated by ``seq``,
    and an error row for each listed object (``listed``: the listing's staged chunks) without
    one, ``lost_error`` of the times it was lost alone (``alone``, and ``prior`` in earlier runs)."""
    for source in sources:  # sources registered in the driver (tests, plug-ins)
        storage.register(source)

    def lost(seq: np.ndarray) -> list[str]:
        return [lost_error(int(alone[s]), int(prior[s] + alone[s])) for s in seq]

    return publish(staged, run_dir, lambda: read_listing(listed, kw["options"]), total, lost, **kw)


def _write_rows(blocks: list[ray.ObjectRef] | LiveWindow, spec: ScanSpec, threshold: float, staged: str,
                options: StorageOptions, trust: str = "", group: int | None = None) -> None:
    """Score the listing's blocks into Parquet files under ``staged`` (the endpoint as the driver resolved it).

    ``group``: blocks of that many rows re-run after a loss (``isolation``), scored that many
    at a time, one batch per actor at a time, and never retried by Ray (the next, smaller
    round is their retry)."""
    ds = _stream(blocks, spec, threshold, options, trust, group)
    fs, path = storage.arrow_filesystem(staged, options)
    if storage.local_path(staged) is not None:
        # Ray Data deletes a folder it created itself for a write that wrote no row (every block
        # lost), and the listing stages its chunks in this one (``feed``), perhaps only once the
        # stream has started: the folder is made here, and Ray Data is told to make none (on S3
        # its "folder" is the prefix, and deleting it would take the listing's chunks along).
        fs.create_dir(path, recursive=True)
    ds.write_parquet(path, filesystem=fs, try_create_dir=False)


def _stream(blocks: list[ray.ObjectRef] | LiveWindow, spec: ScanSpec, threshold: float, options: StorageOptions,
            trust: str, group: int | None) -> ray.data.Dataset:
    endpoint = options.endpoint_url
    pool = spec if group is None else dataclasses.replace(spec, batch_size=group, read_block_rows=group)
    return scored_stream(
        blocks, DetectorActor,
        {"model": spec.model, "endpoint": endpoint, "threshold": threshold, "batch_size": pool.batch_size,
         "decoder": spec.decoder, "max_pixels": spec.max_pixels, "provenance": spec.provenance, "c2pa_trust": trust},
        pool=pool, endpoint=endpoint, max_bytes=spec.max_bytes, isolated=group is not None, actor_retries=0,
        streams=spec.streams or GPU_STREAMS, actors_per_gpu=ACTORS_PER_GPU, read_ahead_bytes=spec.read_ahead_bytes,
    )


def _control_scores(spec: ScanSpec, threshold: float, staged: str, options: StorageOptions, trust: str) -> bool:
    """Whether a known-good image (a small PNG made here), scored alone as any object is (read
    task, detector actor), comes back with a row: False when its worker dies too."""
    import io

    from PIL import Image

    ramp = np.add.outer(np.arange(64, dtype=np.uint16), np.arange(64, dtype=np.uint16))
    pixels = np.stack([ramp * 2, ramp, 255 - ramp], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    uri = storage.join(staged, "_control", "known-good.png")
    storage.write_bytes(uri, buf.getvalue(), options)
    block = pa.table({"uri": pa.array([uri], pa.string()), "etag": pa.array([None], pa.string()),
                      "size_bytes": pa.array([buf.tell()], pa.int64()),
                      "last_modified": pa.array([None], pa.timestamp("us", tz="UTC"))})  # a listing row
    rows = _stream([ray.put(block)], spec, threshold, options, trust, 1).take_all()
    return len(rows) > 0


