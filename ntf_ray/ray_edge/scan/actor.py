"""The detector actors: ``DetectorActor`` scores blocks of encoded images in Ray Data, and
``plan_actors`` sizes their pool for the cluster."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray

from ntf_ray import storage
from ntf_ray.errors import DECODE, DETECTOR, DetectorFault
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS
from ntf_ray.images.provenance import PROVENANCE_COLUMNS, C2paTrust, provenance_of
from ntf_ray.scan.publish import SEQ
from ntf_ray.scan.spec import ActorPool
from ntf_ray.scan.table import FILE_SCHEMA
from ntf_ray.storage import DEFAULT_READ_AHEAD_BYTES, StorageOptions
from ntf_ray.storage import binary_views as binary_views

if TYPE_CHECKING:
    from ntf_ray.ray_edge.scan.feed import LiveWindow

log = logging.getLogger(__package__)


class DetectorActor:
    """Ray Data actor: loads the detector once, scores blocks of encoded images.

    On a GPU, each thread that calls it (Ray Data runs ``streams`` calls at once per actor)
    scores on its own CUDA stream, so one batch's decoding overlaps another's inference.
    ``startup`` holds the seconds each step of getting ready took.
    """

    def __init__(self, model: str, *, endpoint: str | None, threshold: float | None, batch_size: int,
                 device: str = "auto", decoder: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 provenance: bool = True, c2pa_trust: str = ""):
        began = time.perf_counter()
        import torch

        from ntf_ray.detector.scorer import Scorer

        imported = time.perf_counter()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        else:
            torch.cuda.init()
        ready = time.perf_counter()
        self.scorer = Scorer.from_artifact(model, device=device, threshold=threshold,
                                           options=StorageOptions(endpoint_url=endpoint), batch_size=batch_size,
                                           decoder=decoder, max_pixels=max_pixels)
        loaded = time.perf_counter()
        if device != "cpu":
            self.scorer.warm_up()
        warm = time.perf_counter()
        self.startup = {"imports": imported - began, "device": ready - imported, "model": loaded - ready,
                        "warm_up": warm - loaded}
        log.info("detector actor ready on %s in %.1f s (%s)", device, warm - began,
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.startup.items()))
        from ntf_ray.images.jpeg_window import describe

        log.info("%s", describe())
        self._torch = torch
        self._local = threading.local()
        self._provenance = C2paTrust(c2pa_trust) if provenance else None
        from ntf_ray.ray_edge.scan.telemetry import ActorMetrics

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        self.metrics = ActorMetrics(self.scorer.model_id, (actor or f"pid{os.getpid()}")[:12])

    def _stream(self):
        """This thread's CUDA stream (None on the CPU)."""
        if self.scorer.device.type != "cuda":
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._torch.cuda.Stream(self.scorer.device)
        return stream

    def startup_seconds(self) -> dict[str, float]:
        return dict(self.startup)

    def _score(self, data: list[memoryview | None]):
        stream = self._stream()
        if stream is None:
            return self.scorer.score_bytes(data)
        with self._torch.cuda.stream(stream):
            return self.scorer.score_bytes(data)

    def __call__(self, batch: pa.Table) -> pa.Table:
        began = time.perf_counter()
        out = self._isolated(batch)
        if SEQ in batch.column_names:  # the object's place in the scan's listing, for publishing
            out = out.append_column(SEQ, batch.column(SEQ))
        read = pc.sum(pc.binary_length(batch.column("data"))).as_py() or 0
        self.metrics.record(out, read, time.perf_counter() - began)
        return out

    def _isolated(self, batch: pa.Table) -> pa.Table:
        """``_rows`` of the batch; a batch that raises is split in halves, down to the object
        that raised, which alone gets an error row (an exception costs one object its score)."""
        try:
            return self._rows(batch)
        except DetectorFault as exc:  # the network, not an object: the driver stops the run on this row
            return self._error_rows(batch, f"{DETECTOR}: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever one object does costs that object's row alone
            if batch.num_rows > 1:
                half = batch.num_rows // 2
                return pa.concat_tables([self._isolated(batch.slice(0, half)), self._isolated(batch.slice(half))])
            log.warning("scoring one object raised %s; it gets an error row", type(exc).__name__)
            return self._error_rows(batch, failure_reason(exc))

    def _rows(self, batch: pa.Table) -> pa.Table:
        data = binary_views(batch.column("data"))
        read_errors = batch.column("read_error").to_pylist()
        ok = [i for i, e in enumerate(read_errors) if e is None]
        results = dict(zip(ok, self._score([data[i] for i in ok]), strict=True))
        n = batch.num_rows
        cols: dict[str, list] = {k: [None] * n for k in ("score", "is_fake", "width", "height", "format", "error",
                                                         "decoder", *PROVENANCE_COLUMNS)}
        if self._provenance is not None:
            for i in ok:  # what the bytes say of themselves, beside (never instead of) the score
                claims = provenance_of(data[i], self._provenance, max_pixels=self.scorer.max_pixels)
                for name, value in claims.columns().items():
                    cols[name][i] = value
        for i in range(n):
            r = results.get(i)
            if r is None:
                cols["error"][i] = read_errors[i]
                continue
            # each value checked on its own: one out of range (a header's 2**32 - 127 width) costs its cell,
            # not the batch's table
            cols["score"][i], cols["is_fake"][i] = r.score, r.is_fake
            cols["width"][i], cols["height"][i] = _int32(r.width), _int32(r.height)
            cols["format"][i], cols["error"][i], cols["decoder"][i] = _text(r.format), _text(r.error), _text(r.decoder)
        return self._table(batch, cols)

    def _error_rows(self, batch: pa.Table, error: str) -> pa.Table:
        n = batch.num_rows
        cols: dict[str, list] = {k: [None] * n for k in ("score", "is_fake", "width", "height", "format", "decoder",
                                                         *PROVENANCE_COLUMNS)}
        reads = batch.column("read_error").to_pylist() if "read_error" in batch.column_names else [None] * n
        cols["error"] = [e if e is not None else error for e in reads]
        return self._table(batch, cols)

    def _table(self, batch: pa.Table, cols: dict[str, list]) -> pa.Table:
        n = batch.num_rows
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
            **{name: pa.array(cols[name], pa.string()) for name in PROVENANCE_COLUMNS},
        }, schema=FILE_SCHEMA)


_INT32 = 2**31 - 1
_MAX_TEXT = 300


def _int32(value: object) -> int | None:
    """A size for the int32 columns: a header may declare anything; what does not fit is null."""
    return value if type(value) is int and 0 <= value <= _INT32 else None


def _text(value: object) -> str | None:
    return value[:_MAX_TEXT] if isinstance(value, str) else None


def failure_reason(exc: BaseException) -> str:
    """The row of an object whose scoring raised: out of memory is retried, anything else is final."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return f"{DECODE}: out of memory"
    message = " ".join(str(exc).split())[:120]
    return f"{DECODE}: failed while scoring ({type(exc).__name__}{': ' + message if message else ''})"


def _gpus_in_cluster() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def _most_gpus_on_a_node() -> float:
    return max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def check_gpus(gpus_per_actor: float) -> None:
    """Refuse at once what no node of the cluster can place: Ray would wait for such an actor
    for ever, printing only the autoscaler's "No available node types" lines."""
    if gpus_per_actor > 1 and gpus_per_actor != int(gpus_per_actor):
        raise ValueError(f"--gpus-per-actor {gpus_per_actor:g}: an actor holds a fraction of one GPU or whole GPUs")
    most = _most_gpus_on_a_node()
    if gpus_per_actor > most:
        raise ValueError(
            f"--gpus-per-actor {gpus_per_actor:g}: no node of this Ray cluster has {gpus_per_actor:g} GPU(s) for a "
            f"detector actor (the most on one node: {most:g}, {_gpus_in_cluster():g} in all). Leave --gpus-per-actor "
            "out to score on the CPUs, or start a GPU node first (a cluster that adds GPU nodes on demand needs one "
            "running when the run starts)")


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


def plan_actors(pool: ActorPool, *, blocks: int, actors_per_gpu: int = 1) -> ActorPlan:
    """The detector actor pool for ``blocks`` read blocks on this cluster.

    Default: ``actors_per_gpu`` actors per GPU (or 2 on CPU), never more than blocks, and never
    so many CPU-holding actors that Ray Data's read tasks find no CPU (the job would hang silently).
    """
    gpus_per_actor, cpus_per_actor = pool.gpus_per_actor, pool.cpus_per_actor
    gpus = gpus_per_actor if gpus_per_actor is not None else (1 / actors_per_gpu if _gpus_in_cluster() >= 1 else 0.0)
    if gpus < 0 or cpus_per_actor < 0:
        raise ValueError("--gpus-per-actor and --cpus-per-actor cannot be negative")
    if gpus:
        check_gpus(gpus)
    most = pool.max_actors or (max(1, int(_gpus_in_cluster() / gpus)) if gpus else 2)
    most = min(most, blocks)  # an actor without a block to score would only cost its start-up
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus_per_actor > 0 and cpus and most * cpus_per_actor > cpus - 1:
        fit = max(1, int((cpus - 1) // cpus_per_actor))
        if fit < most:
            log.warning("the cluster has %g CPUs: running %d detector actor(s) of %g CPU, not %d, so that "
                        "Ray Data's other tasks can run", cpus, fit, cpus_per_actor, most)
            most = fit
    least = most if pool.min_actors is None else min(pool.min_actors, most)
    return ActorPlan(min_actors=least, max_actors=most, gpus=gpus, cpus=cpus_per_actor)


#: Retries of a read task, and of a detector actor's batch when its actor died, for streams
#: that have no rounds of their own (the evaluation). The scan never has Ray retry a batch
#: (``actor_retries=0``): Ray would wait for that actor to start again, and an actor whose
#: node went away may find no room anywhere (the nodes left are full), so the batch, and the
#: run, would wait for ever. The batch's objects come back without rows instead, and are
#: scored again in smaller groups by the actors that are alive once the stream ends
#: (``ray_scan.isolation``), which also keeps one file that kills its decoder from being
#: retried for ever.
READ_TASK_RETRIES = 2
ACTOR_TASK_RETRIES = 2
#: A scan's detector actors per GPU, and batches each scores at once (threads, each with its own
#: CUDA stream). Measured on an H200 (bench/README.md): decoding and the network share the GPU, and
#: 4 actors x 2 streams kept it busiest (4,140 images/s against 3,320 for 1 x 2 and 3,510 for 1 x 3).
#: The evaluation keeps one actor per GPU: its decoding and perturbations run on the CPU.
ACTORS_PER_GPU = 4
GPU_STREAMS = 2
#: Images per detector call on GPU actors (256 was faster than 512 on the H200; 64 was not
#: measured there) and on CPU actors.
GPU_BATCH, CPU_BATCH = 256, 64


def scored_stream(rows: pa.Table | list[ray.ObjectRef] | LiveWindow, actor: type, constructor_kwargs: dict, *, pool: ActorPool,
                  endpoint: str | None, max_bytes: int | None = None, streams: int = 1, actors_per_gpu: int = 1,
                  read_ahead_bytes: int | None = DEFAULT_READ_AHEAD_BYTES, name: str = "scan",
                  isolated: bool = False, actor_retries: int = ACTOR_TASK_RETRIES) -> ray.data.Dataset:
    """``rows`` (with ``uri``) -> read tasks adding ``data``/``read_error`` -> a pool of ``actor``.

    ``rows`` is a table (cut into blocks of ``pool.read_block_rows``), the refs of tables
    already in the object store, one read block each, or a source of such blocks still to come
    (``dataset()`` and ``blocks``, the most it gives: ``feed.LiveWindow``). ``pool``: the
    actors' size, resources and batch size.

    The scan and the evaluation share this shape; ``actor`` is built once per pool member
    with ``constructor_kwargs`` plus ``device`` (``cuda`` on GPU actors, else ``cpu``). A
    block whose tasks fail for good is dropped, not fatal (``max_errored_blocks``): its
    objects come back without rows, and the caller accounts for them.

    ``pool.batch_size`` None: ``GPU_BATCH`` on GPU actors, ``CPU_BATCH`` on CPU ones (also given to
    the actor when its ``constructor_kwargs`` hold ``batch_size=None``).
    ``streams``: batches each GPU actor scores at once, each in its own thread and CUDA
    stream (1 on CPU actors). ``read_ahead_bytes`` caps what the whole stream holds in
    Ray's object store, so that reads run only as far ahead of the detectors as that.
    ``name``: what Ray Data's progress bar and logs call the stream. ``isolated``: each actor
    holds one batch at a time, none queued or beside it, and a batch whose actor died is not
    retried (a round of ``ray_scan.isolation``: a loss then belongs to that batch alone).
    ``actor_retries``: how often Ray runs a batch again on its actor once that actor has
    started again after dying (see ``ACTOR_TASK_RETRIES``; 0 in the scan).
    """
    from ntf_ray.scan.reading import DEFAULT_MAX_BYTES, read_objects

    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    if isolated:
        streams = 1

    if isinstance(rows, pa.Table):
        blocks = max(1, -(-rows.num_rows // pool.read_block_rows))
        ds = ray.data.from_arrow(rows).repartition(blocks)
    elif hasattr(rows, "dataset"):
        blocks = rows.blocks
        ds = rows.dataset()
    else:
        blocks = len(rows)
        ds = ray.data.from_arrow_refs(rows)
    plan = plan_actors(pool, blocks=blocks, actors_per_gpu=actors_per_gpu)
    batch_size = pool.batch_size
    if batch_size is None:
        batch_size = GPU_BATCH if plan.gpus else CPU_BATCH
    if constructor_kwargs.get("batch_size", 0) is None:
        constructor_kwargs = {**constructor_kwargs, "batch_size": batch_size}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameters for task retries and actor restarts; the
        # ray_remote_args it deprecates still apply them (revisit before Ray 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = ds.map_batches(read_objects, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"endpoint": endpoint, "max_bytes": max_bytes, "sources": storage.sources()}, max_retries=READ_TASK_RETRIES)
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={**constructor_kwargs, "device": plan.device},
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors,
                                               max_concurrent_calls_per_actor=streams if plan.gpus else 1,
                                               enable_true_multi_threading=bool(plan.gpus) and streams > 1,
                                               # Actors queue batches: a batch queued behind one that kills
                                               # its actor dies with it, and what is lost is re-run in
                                               # smaller groups once the stream ends (ray_scan.isolation),
                                               # whose rounds queue nothing
                                               max_tasks_in_flight_per_actor=1 if isolated else None),
            num_gpus=plan.gpus,
            num_cpus=plan.cpus,
            max_restarts=-1,  # an actor that died is started again where there is room ...
            max_task_retries=0 if isolated else actor_retries,  # ... its batches wait for it, or not (the scan)
        )
    ds.set_name(name)
    ds.context.max_errored_blocks = -1
    if read_ahead_bytes:  # ds.context is this dataset's own copy of the session's context
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(
            object_store_memory=min(read_ahead_bytes, limits.object_store_memory))
    return ds
