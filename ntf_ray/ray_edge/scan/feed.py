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
"""

from __future__ import annotations

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
LISTING = "_listing"
_END = object()
POLL_S = 0.5


class _Stopped(Exception):
    """The run stopped the listing."""


class ListingFeed:
    """The run's objects to score, listed in a thread while windows of them are scored (see module)."""

    def __init__(self, spec: ScanSpec, options: StorageOptions, found, staged: str,
                 on_chunk: Callable[[int], None] | None = None, *, map_files: Callable | None = None,
                 first: int = FIRST_WINDOW, most: int = MAX_WINDOW):
        self.spec, self.options, self.found, self.staged = spec, options, found, staged
        self.on_chunk, self.map_files = on_chunk, map_files
        self.first, self.most = first, most
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

    # -- the driver's side ---------------------------------------------------------------------

    def start(self) -> ListingFeed:
        self._thread.start()
        return self

    def windows(self) -> Iterator[list[ray.ObjectRef]]:
        """The queued blocks in windows: the first holds what is queued ``START_WAIT_S`` after
        the first block (or when the listing ended), each next one waits for ``GROWTH`` times
        ``first``, then times more (up to ``most``), or the listing's end; each takes whatever
        is queued then, up to ``most``."""
        size, wait = self.first, START_WAIT_S
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

    def join(self) -> None:
        """Wait for the listing thread; raise what stopped it."""
        while self._thread.is_alive():  # short waits, as in ``_next``
            self._thread.join(timeout=POLL_S)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop listing (the run is over, or failed): the thread ends at its next block."""
        self._stop.set()
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
        """Queue ``item``, waiting while ``most`` blocks wait; False once the run stopped."""
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
