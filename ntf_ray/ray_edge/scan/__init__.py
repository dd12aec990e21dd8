"""Scan object storage with Ray Data: list, read, decode and score in detector actors, write a score table.

One row per listed object, always: objects that cannot be read or decoded get an error
row with a short reason, and the run goes on; objects lost with a worker that died are
scored again in smaller groups until only the one at fault is left (``isolation``). The
table follows the contract in docs/contracts.md (columns, types, ``OUTPUT/dt=YYYY-MM-DD/run_id=ID/``). A run's rows are
staged and published in one piece once every listed object has its row (see ``table``), so
readers never see a crashed or running run, and re-running a run id replaces it only when
the new attempt succeeds.

Incremental mode (``ntf-ray moderate``) scores only objects whose (uri, etag, last-modified) has no final
row from the same model_id in another completed run under OUTPUT (errors such as ``read:``
are retried), and holds OUTPUT's lease (``lock``) so that two such runs never overlap.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ntf_ray import storage
from ntf_ray.errors import lost_error
from ntf_ray.ray_edge.scan.actor import ACTORS_PER_GPU, GPU_STREAMS, DetectorActor, check_gpus, scored_stream
from ntf_ray.ray_edge.scan.isolation import Staged, score_isolating
from ntf_ray.ray_edge.scan.telemetry import count_listed
from ntf_ray.scan.index import KEY, History, history, skip_key, sum_losses, write_index
from ntf_ray.scan.listing import iter_listing
from ntf_ray.scan.lock import Watch, attempt, lease, watched
from ntf_ray.scan.publish import SEQ, publish, run_summary
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
    for name in ("read_block_rows", "read_block_bytes", "batch_size", "streams", "read_ahead_bytes", "max_pixels"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    art = load_artifact(spec.model, options=options)  # fail early on a bad artifact, before listing
    if spec.gpus_per_actor and ray.is_initialized():  # before the lease: what no node can place is refused now
        check_gpus(spec.gpus_per_actor)
    threshold = art.threshold if spec.threshold is None else float(spec.threshold)
    start = time.perf_counter()

    progress = _Progress()
    watch = Watch(progress.state, spec.stall_s)
    guard = lease(output, run_id, options, watch=watch) if spec.incremental else watched(watch)
    # the attempt inside the lease: its staging is gone before the next run may start
    with guard as held, attempt(output, run_id, options) as staged:
        found = history(output, art.model_id, options, exclude_run=run_id) if spec.incremental else None
        listing = _listing_blocks(spec, options, found, on_chunk=progress.tick)
        todo, listed = listing.rows, listing.listed
        count_listed(todo, art.model_id)
        log.info("scan %s: %d objects listed in %.1f s, %d to score, %d already scored by model %s", run_id, listed,
                 time.perf_counter() - start, todo, listed - todo, art.model_id)

        # Re-running a run_id replaces it in place (on whatever day it first ran), once it succeeds.
        earlier = dict(run_dirs(output, options)).get(run_id)
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        run_dir = earlier or storage.join(output, f"dt={day}", f"run_id={run_id}")
        prior = listing.prior_losses()
        alone = np.zeros(todo, np.int16)
        if todo:
            progress.scoring(staged, options)
            alone = score_isolating(
                listing.blocks, listing.suspects, Staged(staged, todo, options),
                lambda refs, group: _write_rows(refs, spec, threshold, staged, options, group=group),
                group=spec.read_block_rows, prior=prior)
        progress.publishing()
        if spec.incremental:
            held.check()

        def lost(seq: np.ndarray) -> list[str]:
            return [lost_error(int(alone[s]), int(prior[s] + alone[s])) for s in seq]

        tally = publish(staged, run_dir, lambda: (ray.get(ref) for ref, _ in listing.blocks + listing.suspects), todo,
                        lost, run_id=run_id, model_id=art.model_id, threshold=threshold, options=options,
                        keep_final=spec.incremental)
        if tally.rows != todo:  # publish writes one row per listed object by construction
            raise RuntimeError(f"scan {run_id}: published {tally.rows} rows for {todo} objects")
        summary = run_summary(tally, listed=listed, skipped=listed - todo, seconds=time.perf_counter() - start,
                           model_id=art.model_id, spec=spec, run_id=run_id, threshold=threshold)
        summary["table"] = run_dir
        storage.write_bytes(storage.join(run_dir, SUMMARY), json.dumps(summary, indent=2, allow_nan=False).encode(),
                            options)
        storage.write_bytes(storage.join(run_dir, SUCCESS), b"", options)
        if spec.incremental:
            # Any model's index that read this run before it was replaced sees the new version
            # and reads every run again (``index.history``): nothing here has to remove it.
            write_index(output, art.model_id, pa.concat_tables([found.seen, *tally.final]),
                        {**found.runs, run_id: run_version(run_dir, options)},
                        options, losses=sum_losses([found.losses, *tally.losses]))
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


@dataclass
class Listing:
    """The objects a run scores, as read blocks in Ray's object store, numbered 0..rows-1 (``seq``)."""

    blocks: list[tuple[ray.ObjectRef, int]]  # (block, its rows)
    suspects: list[tuple[ray.ObjectRef, int]]  # objects lost alone in earlier runs: one block each
    listed: int  # objects listed, the skipped included
    rows: int  # objects to score
    prior: dict[int, int] = field(default_factory=dict)  # seq -> times lost alone in earlier runs (suspects only)

    def prior_losses(self) -> np.ndarray:
        out = np.zeros(self.rows, np.int16)
        for seq, n in self.prior.items():
            out[seq] = n
        return out


def _listing_blocks(spec: ScanSpec, options: StorageOptions, found: History | None,
                    on_chunk: Callable[[int], None] | None = None) -> Listing:
    """The objects to score as read blocks in Ray's object store, and how many were listed.

    The listing pages in chunk by chunk; each chunk loses what ``found.seen`` holds, is
    numbered (``seq``) and goes to the object store in blocks of at most ``read_block_rows``
    objects and ``read_block_bytes`` listed bytes, so the driver holds one chunk at a time,
    whatever the bucket holds, and a read task's output is about the same size for 20 KB
    thumbnails and 5 MB photos. Objects ``found.losses`` names (lost alone before) get a
    block of their own each.
    """
    out = Listing(blocks=[], suspects=[], listed=0, rows=0)
    seen = found.seen if found is not None and found.seen.num_rows else None
    losses = found.losses if found is not None and found.losses.num_rows else None
    for chunk in iter_listing(spec, options, map_files=ray_map):
        out.listed += chunk.num_rows
        if on_chunk is not None:
            on_chunk(chunk.num_rows)
        if seen is not None or losses is not None:
            columns = chunk.column_names
            chunk = chunk.append_column("modified", skip_key(chunk).column("modified"))
        if seen is not None:
            # "right anti" hashes the chunk, not everything scored so far (1.4 s -> 0.02 s per chunk at 2M);
            # KEY's etag is never null there, and a chunk's null etag matches no key
            chunk = seen.join(chunk, keys=KEY, join_type="right anti").select(chunk.column_names)
        if losses is not None:
            marked = losses.join(chunk, keys=KEY, join_type="right outer")
            hit = pc.is_valid(marked["losses"])
            for row in marked.filter(hit).to_pylist():
                block = pa.Table.from_pylist([{k: row[k] for k in columns}], schema=chunk.select(columns).schema)
                out.prior[out.rows] = int(row["losses"])
                out.suspects.append((ray.put(block.append_column(SEQ, pa.array([out.rows], pa.int64()))), 1))
                out.rows += 1
            chunk = marked.filter(pc.invert(hit)).select(chunk.column_names)
        if seen is not None or losses is not None:
            chunk = chunk.select(columns)
        sizes = chunk.column("size_bytes").fill_null(0).to_numpy() if "size_bytes" in chunk.column_names else None
        if sizes is not None and spec.max_bytes is not None:
            sizes = np.where(sizes > spec.max_bytes, 0, sizes)  # refused from the listing, never read
        for start, stop in block_bounds(sizes, chunk.num_rows, spec.read_block_rows, spec.read_block_bytes):
            block = chunk.slice(start, stop - start)
            block = block.append_column(SEQ, pa.array(np.arange(out.rows, out.rows + block.num_rows), pa.int64()))
            out.rows += block.num_rows
            out.blocks.append((ray.put(block), block.num_rows))
    return out


#: Inventory data files read at once, each in a Ray task of its own (``ray_map``).
LISTING_TASKS = 8


def ray_map(fn: Callable, items, *, in_flight: int = LISTING_TASKS, num_cpus: float = 0.25):
    """``map(fn, items)`` with each call a Ray task, at most ``in_flight`` of them running or
    waiting to be taken: results in order, the next task started as the oldest result is
    taken, so what waits in the object store is bounded. Tasks hold a quarter of a CPU: the
    listing runs beside the detector actors and read tasks it feeds."""
    task = _apply.options(num_cpus=num_cpus)
    items = iter(items)
    pending = []
    for item in items:
        pending.append(task.remote(fn, item))
        if len(pending) >= in_flight:
            break
    while pending:
        try:
            result = ray.get(pending.pop(0))
        except ray.exceptions.RayTaskError as exc:  # the task's own error, as a local call would raise it
            for ref in pending:
                ray.cancel(ref)
            raise exc.cause from None
        for item in items:
            pending.append(task.remote(fn, item))
            break
        yield result


@ray.remote(max_retries=3)
def _apply(fn: Callable, item):
    return fn(item)


def block_bounds(sizes: np.ndarray | None, rows: int, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive blocks of at most ``max_rows`` rows and ``max_bytes``
    bytes (``sizes`` per row; a row larger than ``max_bytes`` makes a block of its own)."""
    bounds, start = [], 0
    while start < rows:
        stop = min(rows, start + max_rows)
        if sizes is not None:
            # rows whose running total stays within max_bytes, and always at least one
            total = np.cumsum(sizes[start:stop], dtype=np.int64)
            stop = start + max(1, int(np.searchsorted(total, max_bytes, side="right")))
        bounds.append((start, stop))
        start = stop
    return bounds


def _write_rows(blocks: list[ray.ObjectRef], spec: ScanSpec, threshold: float, staged: str,
                options: StorageOptions, group: int | None = None) -> None:
    """Score the listing's blocks into Parquet files under ``staged`` (the endpoint as the driver resolved it).

    ``group``: blocks of that many rows re-run after a loss (``isolation``), scored that many
    at a time, one batch per actor at a time, and never retried by Ray (the next, smaller
    round is their retry)."""
    endpoint = options.endpoint_url
    pool = spec if group is None else dataclasses.replace(spec, batch_size=group, read_block_rows=group)
    ds = scored_stream(
        blocks, DetectorActor,
        {"model": spec.model, "endpoint": endpoint, "threshold": threshold, "batch_size": pool.batch_size,
         "decoder": spec.decoder, "max_pixels": spec.max_pixels},
        pool=pool, endpoint=endpoint, max_bytes=spec.max_bytes, isolated=group is not None,
        streams=spec.streams or GPU_STREAMS, actors_per_gpu=ACTORS_PER_GPU, read_ahead_bytes=spec.read_ahead_bytes,
    )
    fs, path = storage.arrow_filesystem(staged, options)
    ds.write_parquet(path, filesystem=fs)


