"""The listing as the head of the scan: objects are scored while the listing goes on.

A thread of the driver pages the listing in chunk by chunk (``scan.listing``; an inventory's
data files, and a manifest's HEADs, in Ray tasks), drops what the model's index holds (its
index actors, ``skip``; an inventory's rows already in the task that read them, so that they
never reach the driver), numbers the rest (``seq``), writes each chunk to the attempt's staging folder
(``_listing/``: what publishing and the rounds of ``isolation`` read back) and queues its read
blocks. The scan scores them in *windows*, one Ray Data stream each: the first as soon as a
few blocks are listed (so the first rows are scored within seconds, whatever the bucket
holds), each next one four times larger, up to ``MAX_WINDOW`` blocks. Ray Data's streams take
their blocks up front (its read operators merge what a source yields into blocks of up to
128 MiB, which would undo the read blocks' bounds), so a window is the unit; a new stream
costs the detector actors' start-up, paid a handful of times however large the bucket. At
most ``MAX_WINDOW`` blocks wait in the queue: Ray's object store holds a bounded window of the
listing. Objects lost alone in earlier runs (suspects) are never queued: ``isolation`` scores
them alone once the windows are done.

A listing still going ``START_WAIT_S`` after it began (a large bucket, or an inventory whose
new objects all come at its end) gets a *live* first window: its stream starts then, before
the blocks it will score are listed, so that its detector actors start while the listing
runs, not after it. The stream is ``LIVE_BLOCKS`` tokens, each taking the next listed block
from a small actor (``_Handoff``) once there is one, or nothing once the listing is done
with the window. Its actors wait, idle, for its blocks: as many as for ``LIVE_BLOCKS``,
whatever the listing brings.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ntf_ray import storage
from ntf_ray.scan.index import KEY, skip_key
from ntf_ray.scan.listing import iter_kept
from ntf_ray.scan.publish import SEQ
from ntf_ray.scan.spec import ScanSpec
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)

#: Read blocks in the first window, the most in one window (and queued ahead of the
#: detectors), and how much larger each window is than the one before.
FIRST_WINDOW = 8
MAX_WINDOW = 16384
GROWTH = 4
#: How long the first window takes blocks once it has one (less when the listing ends first):
#: a small listing is scored in one stream, sized for what it holds.
START_WAIT_S = 2.0
#: Blocks a live first window takes (see module), and tasks taking them at once. A token its
#: listing never filled costs one short task (about 10 ms on a laptop) before the stream ends.
LIVE_BLOCKS = 128
LIVE_TAKERS = 2
#: The CPU a taking task holds: none (it waits for the listing most of its life, and the
#: detectors and the read tasks must find theirs); ``LIVE_TAKERS`` bounds how many run.
TAKE_CPUS = 0
LISTING = "_listing"
_END = object()
POLL_S = 0.5


class _Stopped(Exception):
    """The run stopped the listing."""


class ListingFeed:
    """The run's objects to score, listed in a thread while windows of them are scored (see module)."""

    def __init__(self, spec: ScanSpec, options: StorageOptions, found, staged: str,
                 on_chunk: Callable[[int], None] | None = None, *, map_files: Callable | None = None,
                 first: int = FIRST_WINDOW, most: int = MAX_WINDOW, live: int = 0):
        self.spec, self.options, self.found, self.staged = spec, options, found, staged
        self.on_chunk, self.map_files = on_chunk, map_files
        self.first, self.most, self.live = first, most, live
        self.listed = 0  # objects listed, the skipped included
        self.rows = 0  # objects to score
        self.queued = 0  # blocks queued to be scored
        self.prior: dict[int, int] = {}  # seq -> times lost alone in earlier runs (suspects only)
        self.files: list[str] = []
        self.error: BaseException | None = None
        self._ended = threading.Event()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=most)
        self._thread = threading.Thread(target=self._run, name="scan-listing", daemon=True)
        self._lock = threading.Lock()  # where the next block goes: the live window, or the queue
        self._handoff: ray.actor.ActorHandle | None = None
        self._given = 0  # blocks handed to the live window
        self._live_open = False
        self._listing_done = False  # the listing has put its end (under ``_lock``)
        self._started = 0.0

    # -- the driver's side ---------------------------------------------------------------------

    def start(self) -> ListingFeed:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def windows(self) -> Iterator[list[ray.ObjectRef] | LiveWindow]:
        """The queued blocks in windows: the first holds what is queued ``START_WAIT_S`` after
        the first block (or when the listing ended), each next one waits for ``GROWTH`` times
        ``first``, then times more (up to ``most``), or the listing's end; each takes whatever
        is queued then, up to ``most``.

        With ``live`` blocks, a listing still going ``START_WAIT_S`` after it began gets a
        ``LiveWindow`` of that many blocks first (see module); the windows after it start at
        ``GROWTH`` times its size."""
        size, wait = self.first, START_WAIT_S
        if self.live and not self._ends_by(self._started + START_WAIT_S):
            window = self._open_live()
            try:
                yield window
            finally:  # its stream has ended (or the run stopped): what comes next goes to the queue
                with self._lock:
                    if self._live_open:  # its tokens ended without it: a taking task failed for good
                        self._close_live()
                ray.kill(window.handoff)
            size, wait = min(self.most, self.live * GROWTH), None
        while True:
            head = self._next(None)
            if head is None:
                return
            window = [head]
            while len(window) < self.most:  # whatever is queued already goes in: fewer streams
                item = self._next(0.0)
                if item is None:
                    break
                window.append(item)
            deadline = None if wait is None else time.monotonic() + wait
            # the first window takes what comes in its first seconds (all of a small listing);
            # each next one waits for its size
            while len(window) < (self.most if deadline is not None else size):
                item = self._next(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if item is None:  # the listing ended, or the first window waited long enough
                    break
                window.append(item)
            yield window
            size, wait = min(self.most, size * GROWTH), None

    def _next(self, timeout: float | None) -> ray.ObjectRef | None:
        """The next queued block, waiting ``timeout`` seconds for it (None: until the listing
        ends); None when none came in time or the listing has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short waits: the run's watchdog can stop a driver only between them
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                break
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        if item is _END:
            self._queue.put(_END)  # for the next taker
            return None
        return item

    def _ends_by(self, deadline: float) -> bool:
        """Whether the listing ends by ``deadline`` (``time.monotonic``; in short waits, as in ``_next``)."""
        while not self._ended.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ended.wait(min(POLL_S, left))
        return True

    def _open_live(self) -> LiveWindow:
        """Start handing blocks to a live window: what is queued now, then what comes next,
        until it holds ``live`` blocks or the listing ends."""
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        handoff = _Handoff.options(num_cpus=0, scheduling_strategy=here).remote()
        with self._lock:
            self._handoff, self._live_open = handoff, True
            while self._live_open:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _END:  # the listing ended just now
                    self._queue.put(_END)  # for the windows after this one (the listing puts nothing more)
                    break
                self._give(item)
            if self._live_open and self._listing_done:  # its end is queued, or on its way to the queue
                self._close_live()
        return LiveWindow(handoff, self.live, self)

    def _give(self, block: ray.ObjectRef) -> None:
        """Hand ``block`` to the live window (with ``_lock`` held)."""
        self._handoff.put.remote([block])  # in a list: handed on as a reference, not fetched
        self._given += 1
        if self._given >= self.live:
            self._close_live()

    def _close_live(self) -> None:
        """No more blocks for the live window: its tokens get nothing once the blocks handed
        over are taken (with ``_lock`` held)."""
        self._handoff.end.remote(self._given)
        self._live_open = False

    def join(self) -> None:
        """Wait for the listing thread; raise what stopped it."""
        while self._thread.is_alive():  # short waits, as in ``_next``
            self._thread.join(timeout=POLL_S)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop listing (the run is over, or failed): the thread ends at its next block."""
        self._stop.set()
        with self._lock:
            if self._live_open:
                self._close_live()
        while True:  # what waits in the queue is let go
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)

    def suspect_seqs(self) -> np.ndarray:
        return np.fromiter(self.prior, np.int64, len(self.prior))

    def prior_losses(self) -> np.ndarray:
        out = np.zeros(self.rows, np.int16)
        for seq, n in self.prior.items():
            out[seq] = n
        return out

    def tables(self) -> Iterator[pa.Table]:
        """The listed objects to score, read back from staging, each row with its ``seq``."""
        return read_listing(self.files, self.options)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._list()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the driver by ``join``
            self.error = exc
        finally:
            self._ended.set()
            self._put(_END)

    def _put(self, item) -> bool:
        """Hand ``item`` to the live window while it takes blocks, else queue it, waiting while
        ``most`` blocks wait; False once the run stopped."""
        with self._lock:
            if item is _END:
                self._listing_done = True
            if self._live_open:
                if item is not _END:
                    self._give(item)
                    return True
                self._close_live()  # and the windows after it end too
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _list(self) -> None:
        spec, found = self.spec, self.found
        chunks = self._chunks()
        if found is not None:
            first = next(chunks, None)  # its tasks read and hash while the index actors load
            restarted = found.settle()
            if self._stop.is_set():
                return
            if restarted:  # an index file did not read: listed again, against every run
                chunks.close()
                chunks = self._chunks()
            elif first is not None:
                chunks = itertools.chain([first], chunks)
        losses = found.losses if found is not None and found.losses.num_rows else None
        for listed, chunk in chunks:
            if self._stop.is_set():
                return
            self.listed += listed
            if self.on_chunk is not None:
                self.on_chunk(listed)
            columns = chunk.column_names
            suspects = None
            if losses is not None:
                keyed = chunk.append_column("modified", skip_key(chunk).column("modified"))
                marked = losses.join(keyed, keys=KEY, join_type="right outer")
                hit = pc.is_valid(marked["losses"])
                suspects = marked.filter(hit)
                chunk = marked.filter(pc.invert(hit)).select(columns)
            if suspects is not None and suspects.num_rows:
                for n in suspects.column("losses").to_pylist():
                    self.prior[self.rows] = int(n)
                    self.rows += 1
                seq = pa.array(np.arange(self.rows - suspects.num_rows, self.rows), pa.int64())
                self._write(suspects.select(columns).append_column(SEQ, seq))
            first = self.rows
            chunk = chunk.append_column(SEQ, pa.array(np.arange(first, first + chunk.num_rows), pa.int64()))
            self.rows += chunk.num_rows
            if not chunk.num_rows:
                continue
            self._write(chunk)
            sizes = chunk.column("size_bytes").fill_null(0).to_numpy() if "size_bytes" in columns else None
            if sizes is not None and spec.max_bytes is not None:
                sizes = np.where(sizes > spec.max_bytes, 0, sizes)  # refused from the listing, never read
            for start, stop in block_bounds(sizes, chunk.num_rows, spec.read_block_rows, spec.read_block_bytes):
                if not self._put(ray.put(chunk.slice(start, stop - start))):
                    return
                self.queued += 1

    def _chunks(self) -> Iterator[tuple[int, pa.Table]]:
        keep = self.found.unseen if self.found is not None else None  # in the inventory's tasks, or here
        return iter_kept(self.spec, self.options, keep=keep, map_files=self.map_files)

    def _write(self, table: pa.Table) -> None:
        if self._stop.is_set():  # the run is over: its staging may be gone
            raise _Stopped
        path = storage.join(self.staged, LISTING, f"{len(self.files):06d}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(path, sink.getvalue().to_pybytes(), self.options)
        self.files.append(path)


class LiveWindow:
    """A first window whose stream starts before its blocks are listed (see module): ``blocks``
    tokens, each a task (``_take``) that waits for the next block handed to ``handoff``."""

    def __init__(self, handoff: ray.actor.ActorHandle, blocks: int, feed: ListingFeed):
        self.handoff, self.blocks, self._feed = handoff, blocks, feed

    def __len__(self) -> int:
        """Blocks handed to it so far: all it scored once its stream has ended."""
        return self._feed._given

    def dataset(self) -> ray.data.Dataset:
        """The blocks as a stream: one token per block, taken by ``LIVE_TAKERS`` tasks at a time."""
        tokens = ray.data.from_arrow([pa.table({"token": [i]}) for i in range(self.blocks)])
        # It waits for the listing as long as the listing has nothing to score (the scan's
        # watchdog watches the listing): not Ray Data's 30 minutes without progress.
        tokens.context.execution_no_progress_timeout_s = -1
        return tokens.map_batches(_take, batch_format="pyarrow", batch_size=None, fn_kwargs={"handoff": self.handoff},
                                  num_cpus=TAKE_CPUS, compute=ray.data.TaskPoolStrategy(size=LIVE_TAKERS))


def _take(token: pa.Table, handoff: ray.actor.ActorHandle) -> Iterator[pa.Table]:
    """A token's block: the next one handed over, or none once the listing is done with the window."""
    item = ray.get(handoff.take.remote())
    if item is not None:
        yield ray.get(item[0])


@ray.remote
class _Handoff:
    """Blocks on their way from the listing (the driver) to a live window's tokens.

    An async actor runs its calls in any order: ``end`` may come before the last ``put``s, so
    it says how many blocks were put in all, and ``take`` answers None only once that many
    were taken."""

    def __init__(self):
        self._blocks: collections.deque = collections.deque()
        self._taken = 0
        self._total: int | None = None
        self._changed = asyncio.Event()

    async def put(self, block: list[ray.ObjectRef]) -> None:
        self._blocks.append(block)
        self._changed.set()

    async def end(self, total: int) -> None:
        self._total = total
        self._changed.set()

    async def take(self) -> list[ray.ObjectRef] | None:
        """A block (in a list, as it was put), waiting for one; None once every block is taken."""
        while not self._blocks:
            if self._total is not None and self._taken >= self._total:
                return None
            self._changed.clear()
            await self._changed.wait()
        self._taken += 1
        return self._blocks.popleft()


def read_listing(files: list[str], options: StorageOptions) -> Iterator[pa.Table]:
    """The chunks a listing wrote to staging (``ListingFeed.files``), in order."""
    for f in files:
        yield pq.read_table(pa.BufferReader(storage.read_bytes(f, options)))


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
