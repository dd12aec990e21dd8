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

A first pass that returns no row at all is not yet a broken detector: every block may hold
an object that kills its worker (one block is the whole of a small ``moderate``). A few
objects drawn at random are scored alone first (``PROBE``). When none of them comes back
either (and no object of the run has a row), a known-good image is scored alone: if its
worker dies too, the detector is at fault, the run stops (``DetectorFault``) and no object
is counted as lost; if it scores, the objects are, and isolation goes on. A run that stops,
or fails to publish, still hands back what it lost alone (``LostAlone``), which the caller
keeps in the model's index, so the next run scores those objects alone at once and counts
them towards ``poison``.

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
from ntf_ray.scan.index import skip_key, sum_losses
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


#: Objects scored alone, drawn at random, when a first pass returned no row at all: if every one
#: of them kills its worker too, the detector is at fault and the run stops.
PROBE = 8


class LostAlone:
    """How many times each of the run's objects (by ``seq``) was lost while scored alone in
    this run, filled in as the rounds go: what a run that does not publish still hands on."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, np.int16)

    def keys(self, tables: Iterable[pa.Table]) -> pa.Table:
        """``KEY`` + losses of the objects lost alone, from the listing's ``tables``."""
        parts = []
        for table in tables:
            seq = table.column(SEQ).to_numpy(zero_copy_only=False)
            hit = seq[seq < self.counts.size]
            hit = hit[self.counts[hit] > 0]
            if hit.size:
                rows = table.filter(pc.is_in(table[SEQ], pa.array(hit, pa.int64())))
                losses = self.counts[rows.column(SEQ).to_numpy(zero_copy_only=False)].astype(np.int64)
                parts.append(skip_key(rows).append_column("losses", pa.array(losses)))
        return sum_losses(parts)


def score_isolating(listing: ListingFeed, staged: str, options: StorageOptions, write: Write, *,
                    group: int, control: Callable[[], bool], lost: LostAlone | None = None) -> np.ndarray:
    """Score the listing as it comes (a stream per window), then what has no row yet
    (suspects, objects lost alone in earlier runs, only alone), until every object has a row
    or has been lost alone as often as a run allows; returns how many times each ``seq`` was
    lost alone (also kept in ``lost`` as the rounds go, for a run that ends otherwise).

    ``control()``: whether a known-good image scored alone comes back (a worker that dies on it
    is the detector's fault). Asked once, when a round of objects scored alone returns no row
    and no object of the run has one yet (the probe after an empty first pass, or a run of
    suspects only): if it dies too, ``DetectorFault``, and no object is counted as lost.
    """
    streamed = False
    for window in listing.windows():
        write(window, None)
        streamed = streamed or len(window) > 0  # a live window the listing gave nothing scored nothing
    listing.join()
    total = listing.rows
    prior = listing.prior_losses()
    got = Staged(staged, total, options)
    lost = lost or LostAlone()
    alone = lost.counts = np.zeros(total, np.int16)
    suspect = np.zeros(total, np.bool_)
    suspect[listing.suspect_seqs()] = True
    probing = streamed and not got.refresh()  # no row at all: lost workers, or a detector that scores nothing
    controlled = False
    while True:
        eligible = ~got.got & (alone < SOLO_ATTEMPTS) & (prior + alone < POISON_AFTER)
        suspect |= alone > 0  # lost alone in this run (a probe): never batched with others again
        size = group
        probing = probing and bool((eligible & ~suspect).any())
        if probing:
            size, eligible = 1, _draw(eligible & ~suspect, PROBE)
        elif group > 1 and (eligible & ~suspect).any():
            size = group = max(1, group // SPLIT)
        else:
            size = group = 1
        if size > 1:
            eligible &= ~suspect  # suspects are only ever scored alone
        n = int(eligible.sum())
        if not n:
            return alone
        if probing:
            log.warning("the first pass returned no row: scoring %d object(s) alone to tell lost workers from a "
                        "detector that cannot score", n)
        else:
            log.warning("%d object(s) have no row yet (a worker died or a task failed on their group): scoring them "
                        "again in groups of %d", n, size)
        write(regroup(listing.tables(), eligible, size), size)
        got.refresh()
        if size == 1 and not got.got.any() and not controlled:
            controlled = True
            log.warning("none of %d object(s) scored alone came back, and no object of this run has a row: scoring "
                        "a known-good image alone", n)
            if not control():
                raise DetectorFault(f"none of {n} object(s) scored alone came back, and neither did a known-good "
                                    "image: the detector's worker dies on every image, not on some (see Ray's "
                                    "errors in its log); nothing is published and no object is counted as lost")
        if size == 1:
            alone[eligible & ~got.got] += 1
        probing = False


def _draw(mask: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of ``mask``'s set entries, drawn at random (an uploader cannot choose which
    by naming files to sort first)."""
    where = np.flatnonzero(mask)
    out = np.zeros_like(mask)
    out[np.random.default_rng().choice(where, size=min(k, where.size), replace=False)] = True
    return out
