"""Training input on Ray Data: manifest rows -> encoded bytes -> decoded, augmented tensors.

Kept apart from ``ray_train`` so that Ray Data's tasks import only what they run: a read
task needs storage and pyarrow, not torch or Ray Train (seconds of start-up per worker
process), and a decode task imports the transforms when it first runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ntf_ray import storage
from ntf_ray.images.decode import decode
from ntf_ray.storage import StorageOptions
from ntf_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

READ_BLOCK_ROWS = 256  # rows per read task: enough to keep s3fs's concurrent reads busy
DECODE_BLOCK_ROWS = 64  # at least this many rows per decode task


# Restarted wherever its node is lost, calls retried meanwhile: a count is not worth a failed
# training run.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DropCounter:
    """Counts rows that Ray Data's decode tasks dropped, for the per-epoch metrics.

    Best-effort: a restart loses the rows counted since the last ``take``, and a retried
    call may count a block twice; training itself never depends on the count.
    """

    def __init__(self) -> None:
        self.dropped = 0

    def add(self, n: int) -> None:
        self.dropped += n

    def take(self) -> int:
        """The rows dropped since the last ``take`` (the count starts again at 0)."""
        n, self.dropped = self.dropped, 0
        return n


def read_batch(batch: pa.Table, *, endpoint: str | None, sources: list[storage.Source] | None = None) -> pa.Table:
    """Ray Data task: fetch the encoded bytes of a block of manifest rows (``None`` on failure);
    ``sources``: the driver's registered storage sources, registered here too."""
    for source in sources or ():
        storage.register(source)
    uris = batch.column("uri").to_pylist()
    blobs = []
    for uri, data in zip(uris, storage.read_many(uris, StorageOptions.resolve(endpoint))):
        if isinstance(data, Exception):
            log.warning("dropping %s: %s", uri, storage.read_error(data))
            data = None
        blobs.append(data)
    return pa.table({"label": batch.column("label"), "data": pa.array(blobs, pa.binary())})


def prepare_batch(batch: pa.Table, *, stage: int, cfg: dict, counter) -> dict[str, np.ndarray]:
    """Ray Data task: decode and augment a block of encoded images (CPU).

    Unreadable, undecodable and too-thin images (see ``transforms.check_fit``) are dropped,
    logged with their reason and counted on ``counter``.
    """
    import torch

    from ntf_ray.images.transforms import TooLargeToFit, to_tensor
    from ntf_ray.training.stages import stage_of

    torch.set_num_threads(1)  # many small tensors: threads only add overhead here
    c = TrainConfig.from_dict(cfg)
    step = stage_of(stage)
    transform, keys = step.transform(c), step.keys
    out: dict[str, list] = {k: [] for k in (*keys, "label")}
    dropped = 0
    for label, data in zip(batch.column("label").to_pylist(), batch.column("data").to_pylist()):
        decoded = decode(data, max_pixels=c.max_pixels) if data is not None else None
        if decoded is None or not decoded.ok:
            if decoded is not None:
                log.warning("dropping an image: %s", decoded.error)
            dropped += 1
            continue
        try:
            a, b = transform(to_tensor(decoded.image))
        except TooLargeToFit as exc:  # a sliver that upscaling to the crop would blow up
            log.warning("dropping an image: %s", exc)
            dropped += 1
            continue
        out[keys[0]].append(a.numpy())
        out[keys[1]].append(b.numpy())
        out["label"].append(int(label))
    if dropped and counter is not None:
        counter.add.remote(dropped)
    if not out["label"]:
        return step.empty_batch(c)
    return {k: np.stack(v) if k != "label" else np.asarray(v, np.int64) for k, v in out.items()}


def _blocks(rows: int, per_block: int) -> int:
    return max(1, -(-rows // per_block))


def build_dataset(rows: pa.Table, *, stage: int, cfg: TrainConfig, endpoint: str | None, counter,
                  augment_in_tasks: bool = True) -> ray.data.Dataset:
    """Manifest rows -> a streamed dataset of augmented uint8 tensors for one stage, or with
    ``augment_in_tasks=False`` of the encoded bytes and labels, which the train workers decode
    and augment themselves (:class:`ntf_ray.training.device_augment.DeviceBatches`, on their GPUs).

    Bytes are read once per epoch, or once per run with ``cfg.cache_bytes`` (kept in Ray's
    object store: for data sets that fit in the cluster's memory). Decoding and
    augmentation run every epoch, so every epoch sees new augmentations.

    Shuffling: manifests are usually sorted (by generator, by class), so the rows are
    permuted once here; every epoch then visits the small blocks in a new random order,
    and the workers' local shuffle buffers mix rows across blocks. Without this a batch
    can hold a single class, and stage 2's contrastive and BCE terms learn little from it.
    """
    rows = rows.take(np.random.default_rng(cfg.seed).permutation(rows.num_rows))
    ds = ray.data.from_arrow(rows).repartition(_blocks(rows.num_rows, READ_BLOCK_ROWS))
    ds = ds.map_batches(read_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"endpoint": endpoint, "sources": storage.sources()})
    if cfg.cache_bytes:
        ds.set_name(f"stage{stage}-images")  # what its progress bar says
        ds = ds.materialize()
    # Blocks of about a batch to decode: smaller ones spread the work no better and cost a
    # task each (measured: 16-row blocks took twice as long per epoch as 64-row ones).
    ds = ds.repartition(_blocks(rows.num_rows, max(DECODE_BLOCK_ROWS, cfg.batch_size))).randomize_block_order()
    # Its bars would draw in Ray Train's split coordinator, an actor whose output goes to the
    # log file: the driver's epoch bar (ray_train_progress.StageWatch) shows the stage instead.
    ds.context.enable_progress_bars = False
    if not augment_in_tasks:
        return ds
    return ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"stage": stage, "cfg": cfg.to_dict(), "counter": counter},
    )


def agreed_batches(batches: Any, key: str, least: int, device: Any,
                   reduce_min: Callable[[int], int] | None = None) -> Any:
    """The batches every rank steps on together. With the workers decoding, a rank drops its bad
    rows after Ray Train split the stream, so one rank's batch can come up empty (or, in stage 2,
    below the 2 images a step needs) while the others' do not; the engine would skip it on that
    rank alone and the ranks' collectives would pair with the wrong steps, or hang. So the
    ranks agree: a batch is skipped on every rank when any rank's holds fewer than ``least``."""
    from ntf_ray.nn import dist

    reduce_min = reduce_min or (lambda n: dist.all_reduce_min(n, device))
    for batch in batches:
        fewest = reduce_min(int(batch[key].shape[0]))
        if fewest < least:
            log.warning("a batch skipped on every worker: one worker had %d usable images of it (its other rows "
                        "could not be read or decoded), fewer than the %d a step needs", fewest, least)
            continue
        yield batch


class InputWaits:
    """Iterates an epoch's batches and times the waits for them: ``first_batch_s`` (from the
    epoch's start to its first batch: in the first epoch, the input pipeline's start-up) and
    ``input_wait_s`` (all the time the training loop spent waiting for its next batch, which
    the device spends idle unless it still has queued work)."""

    def __init__(self, batches: Any, on_batch: Callable[[Any], None] | None = None) -> None:
        self.batches = iter(batches)
        self.on_batch = on_batch
        self.start = time.perf_counter()
        self.first: float | None = None
        self.wait = 0.0

    def __iter__(self) -> "InputWaits":
        return self

    def __next__(self) -> Any:
        asked = time.perf_counter()
        try:
            batch = next(self.batches)
        finally:
            now = time.perf_counter()
            self.wait += now - asked
            if self.first is None:
                self.first = now - self.start
        if self.on_batch is not None:
            self.on_batch(batch)
        return batch

    def metrics(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        return {"first_batch_s": self.first or 0.0, "input_wait_s": self.wait,
                "input_wait_share": self.wait / seconds if seconds > 0 else 0.0}


AUGMENT_PLACES = ("auto", "tasks", "worker")


def augment_place(spec: Any) -> str:
    """``tasks`` or ``worker``: where ``spec`` (a ``ray_train.RunSpec``) has its training images
    decoded and augmented.

    On GPU workers the worker does it on its GPU (Ray Data's CPU tasks managed about 90 views/s
    per core, far below what one GPU trains on); on CPU workers the tasks spread it over the
    cluster's cores, which the workers' own steps would otherwise wait for.
    """
    if spec.augment not in AUGMENT_PLACES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_PLACES)}, got {spec.augment!r}")
    if spec.augment == "auto":
        return "worker" if spec.use_gpu else "tasks"
    return spec.augment
