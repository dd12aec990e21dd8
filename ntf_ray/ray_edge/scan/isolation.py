"""One object that kills its worker costs that object's row alone.

Ray Data drops a block whose task fails for good (the worker died on it, or it kept failing):
its objects come back without rows, and with them every object batched beside the one at
fault. So once the scan's stream has ended, the driver finds the objects that have no staged
row (by their ``seq``; the listing is read back from staging, ``feed``) and scores them again in groups ``SPLIT`` times smaller, round after
round, down to one object per task. Every object that was only unlucky gets its row in the
same run; one lost again when scored alone is tried alone at most ``SOLO_ATTEMPTS`` times per
run, and after ``POISON_AFTER`` such losses, counted across runs, it gets a final ``poison:``
row (``ntf_ray.errors``). Objects already lost alone in earlier runs (suspects) are never
batched with others: they go straight to the rounds of one.

Python exceptions never get this far: the detector actor splits a batch that raises down to
the object that raised (``DetectorActor``). The driver holds one bit and one small counter
per object, and one listing chunk at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ntf_ray.errors import DETECTOR, POISON_AFTER, SOLO_ATTEMPTS, DetectorFault
from ntf_ray.ray_edge.scan.feed import ListingFeed, LiveWindow
from ntf_ray.scan.publish import SEQ, STAGED_SCHEMA
from ntf_ray.scan.table import parquet_dataset, parquet_files
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)

#: Each round re-runs what was lost in groups this many times smaller (128 -> 16 -> 2 -> 1).
SPLIT = 8

#: ``write(block refs, group)``: one Ray Data stream of those blocks (or of a live window's,
#: ``feed.LiveWindow``) into the run's staging folder; ``group`` is None for a window of the
#: listing, else the rows per block and per task.
Write = Callable[["list[ray.ObjectRef] | LiveWindow", "int | None"], None]


class Staged:
    """Which of the run's objects have a staged row, read from the staging folder as it grows."""

    def __init__(self, staged: str, total: int, options: StorageOptions):
        self.staged, self.options = staged, options
        self.got = np.zeros(total, np.bool_)
        self._read: set[str] = set()

    def refresh(self) -> int:
        """Read the files staged since the last call; returns how many rows they hold.

        Raises ``DetectorFault`` when a row says the detector scored NaN or infinity: nothing
        of such a run may be published.
        """
        rows = 0
        for f in parquet_files(self.staged, self.options):
            if f in self._read:
                continue
            self._read.add(f)
            try:
                table = parquet_dataset([f], self.options, STAGED_SCHEMA).to_table(columns=[SEQ, "error"])
            except (OSError, pa.ArrowInvalid):  # a file its killed writer left truncated: its objects are lost
                continue
            fault = pc.starts_with(pc.fill_null(table["error"], ""), f"{DETECTOR}:")
            if pc.any(fault).as_py():
                raise DetectorFault(table.filter(fault)["error"][0].as_py()[len(DETECTOR) + 2:])
            self.got[table[SEQ].to_numpy(zero_copy_only=False)] = True
            rows += table.num_rows
        return rows


def regroup(tables: Iterable[pa.Table], keep: np.ndarray, group: int) -> list[ray.ObjectRef]:
    """The rows of the listing (``tables``) whose ``seq`` is in ``keep``, as new blocks of ``group`` rows."""
    out = []
    for table in tables:
        table = table.filter(pa.array(keep[table.column(SEQ).to_numpy(zero_copy_only=False)]))
        for start in range(0, table.num_rows, group):
            out.append(ray.put(table.slice(start, group)))
    return out


def score_isolating(listing: ListingFeed, staged: str, options: StorageOptions, write: Write, *,
                    group: int) -> np.ndarray:
    """Score the listing as it comes (a stream per window), then what has no row yet
    (suspects, objects lost alone in earlier runs, only alone), until every object has a row
    or has been lost alone as often as a run allows; returns how many times each ``seq`` was
    lost alone.
    """
    streamed = False
    for window in listing.windows():
        write(window, None)
        streamed = streamed or len(window) > 0  # a live window the listing gave nothing scored nothing
    listing.join()
    total = listing.rows
    prior = listing.prior_losses()
    got = Staged(staged, total, options)
    alone = np.zeros(total, np.int16)
    suspect = np.zeros(total, np.bool_)
    suspect[listing.suspect_seqs()] = True
    if streamed and not got.refresh():
        raise RuntimeError("the detectors returned no row at all (see Ray's errors above: a systematic failure, "
                           "not lost workers); nothing is published")
    while True:
        eligible = ~got.got & (alone < SOLO_ATTEMPTS) & (prior + alone < POISON_AFTER)
        if group > 1 and (eligible & ~suspect).any():
            group = max(1, group // SPLIT)
        else:
            group = 1
        if group > 1:
            eligible &= ~suspect  # suspects are only ever scored alone
        n = int(eligible.sum())
        if not n:
            return alone
        log.warning("%d object(s) have no row yet (a worker died or a task failed on their group): scoring them "
                    "again in groups of %d", n, group)
        write(regroup(listing.tables(), eligible, group), group)
        got.refresh()
        if group == 1:
            alone[eligible & ~got.got] += 1
