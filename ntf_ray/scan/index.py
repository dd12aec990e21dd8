"""What a model already scored under OUTPUT: the skip index of ``moderate``.

Errors a later ``moderate`` retries: ``read:`` (transient, missing or changed object),
``worker_lost:`` and ``decode: out of memory``. Every other error is final for that object
and model: ``decode:``, ``too_large:``, ``unsupported_format:``, ``unsupported_name:``,
``poison:`` (``ntf_ray.errors``). An object is its skip key (``KEY``): uri, etag and
last-modified time, so bytes replaced under the same etag (an MD5 collision) are scored again.
The index also keeps how often each object not yet final was lost alone, summed over runs,
which is what turns ``worker_lost`` into ``poison``, and the version of every run it read, so
a run replaced or removed since (a re-used run id, by any model) makes the next check read
every run again instead of trusting what the index says that run held.

The index is partitioned by a hash of the uri and grows by one *generation* per run (the
final keys of the runs it had not read yet), so a run writes what is new, not everything, and
what reads it can hold a few partitions each (``Shard``: the scan's index actors, one per few
million keys, so the index never passes through the driver). Layout, under
``OUTPUT/_index/model_id=M/``:

- ``index.json``: the layout, the hash key (``keyhash``), the partition count, the runs
  read (run id -> version), each generation's files and rows, and the losses file. Written last: a generation or losses
  file it does not name is not part of the index (a run that died while writing it).
- ``p=NN/GEN-S.parquet``: final keys (``KEY``) whose uri hashes to partition NN, each with its
  fingerprint (``FP``), sorted by it: an index actor reads them and merges the sorted runs
  (it fingerprints only the keys of runs the index has not read yet).
- ``losses-GEN.parquet``: ``KEY`` + losses of the objects not final that were lost alone.

Too many generations, or partitions too full, are compacted into one generation on the next
write.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ntf_ray import storage
from ntf_ray.errors import LOST_ALONE_PATTERN, RETRIED_ERRORS
from ntf_ray.scan.keyhash import check_value, fingerprint, new_key, partition_of
from ntf_ray.scan.table import INDEX, is_complete, read_runs, runs_by_id
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)


#: What a row says about the object it scored, and what the listing must match to skip it:
#: its uri, etag and last-modified time (µs since the epoch; -1 unknown). The etag alone is an
#: MD5 for most S3 objects, and two images with one MD5 are known; S3 sets last-modified on
#: every write, so bytes written again under the same etag are a new object. Local files'
#: etags already cover size, times and inode (``storage.local.local_etag``).
KEY = ["uri", "etag", "modified"]
KEY_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("modified", pa.int64())])
LOSSES_SCHEMA = KEY_SCHEMA.append(pa.field("losses", pa.int64()))
#: The column of an index file that holds each key's fingerprint.
FP = "fp"


def skip_key(rows: pa.Table | pa.RecordBatch) -> pa.Table:
    """``KEY`` of each row of a table with uri, etag and last_modified (a null etag reads as ''
    and an unknown time as -1, so that rows without them still match each other)."""
    modified = pc.cast(rows.column("last_modified").cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return pa.table({"uri": rows.column("uri"), "etag": pc.fill_null(rows.column("etag"), ""),
                     "modified": pc.fill_null(modified, -1)}, schema=KEY_SCHEMA)


def _distinct(keys: list[pa.Table]) -> pa.Table:
    keys = [k.select(KEY).cast(KEY_SCHEMA) for k in keys if k.num_rows]
    if not keys:
        return KEY_SCHEMA.empty_table()
    return pa.concat_tables(keys).group_by(KEY).aggregate([]).select(KEY)


def _final_pairs(table: pa.Table, model_id: str) -> pa.Table:
    """Distinct ``KEY`` of rows from ``model_id`` whose outcome is final."""
    keep = pc.equal(table["model_id"], model_id)
    retried = pc.match_substring_regex(table["error"], "^(?:" + "|".join(map(re.escape, RETRIED_ERRORS)) + ")")
    keep = pc.and_(keep, pc.invert(pc.fill_null(retried, False)))
    return _distinct([skip_key(table.filter(pc.fill_null(keep, False)))])


LAYOUT = 3
#: Keys per partition a compaction aims at, keys an index actor holds at most (``Shard``), and
#: the generations an index keeps before they are compacted into one.
PARTITION_ROWS = 1_000_000
SHARD_ROWS = 4_000_000
MAX_GENERATIONS = 8
MAX_PARTITIONS = 256


def index_root(output: str, model_id: str) -> str:
    return storage.join(storage.normalize(output), INDEX, f"model_id={model_id}")


def index_path(output: str, model_id: str) -> str:
    """The model's ``index.json`` (what makes the rest of its folder the index)."""
    return storage.join(index_root(output, model_id), "index.json")


@dataclass
class History:
    """What a model's completed runs under OUTPUT say about the objects it saw."""

    seen: pa.Table  # KEY of objects with a final row: never scored again
    losses: pa.Table  # KEY + losses: times each not-final object was lost alone, summed over runs
    runs: dict[str, str]  # run id -> version of the runs read (what the index records)


def _lost_alone(table: pa.Table, model_id: str) -> pa.Table:
    """``KEY`` + losses: how many times ``model_id``'s rows say each object was lost alone."""
    rows = table.filter(pc.fill_null(pc.equal(table["model_id"], model_id), False))
    found = pc.extract_regex(pc.fill_null(rows["error"], ""), LOST_ALONE_PATTERN)
    alone = pc.cast(pc.struct_field(found, "alone"), pa.int64())
    rows = skip_key(rows).append_column("losses", alone).filter(pc.is_valid(alone))
    return sum_losses([rows])


def sum_losses(parts: list[pa.Table]) -> pa.Table:
    parts = [t.select(LOSSES_SCHEMA.names).cast(LOSSES_SCHEMA) for t in parts if t is not None and t.num_rows]
    if not parts:
        return LOSSES_SCHEMA.empty_table()
    total = pa.concat_tables(parts).group_by(KEY).aggregate([("losses", "sum")])
    return total.rename_columns([*KEY, "losses"]).select(LOSSES_SCHEMA.names)


def _not_final(losses: pa.Table, seen: pa.Table) -> pa.Table:
    if not losses.num_rows or not seen.num_rows:
        return losses
    return seen.join(losses, keys=KEY, join_type="right anti").select(LOSSES_SCHEMA.names)



@dataclass
class Plan:
    """A model's index as ``index.json`` names it, and the completed runs it has not read."""

    root: str
    hash_key: str  # the key of the index's hashes (``keyhash``); a new index draws one
    partitions: int
    generations: list[dict]  # {"name", "files": [p=NN/...], "rows"}, oldest first
    losses_file: str | None  # relative to root
    indexed: dict[str, str]  # run id -> version, of the runs the generations hold
    runs: dict[str, str]  # run id -> version, of every completed run (``exclude_run`` left out)
    fresh: list[str] = field(default_factory=list)  # folders of the runs not indexed yet

    @property
    def rows(self) -> int:
        return sum(int(g["rows"]) for g in self.generations)

    def files_of(self, partitions: set[int]) -> list[str]:
        return [storage.join(self.root, f) for g in self.generations for f in g["files"]
                if _partition_of_file(f) in partitions]

    def shards(self, rows_per_shard: int | None = None) -> list[list[int]]:
        """The partitions each index actor holds: one actor per ``rows_per_shard`` keys."""
        n = max(1, min(self.partitions, math.ceil(self.rows / (rows_per_shard or SHARD_ROWS))))
        return [list(range(s, self.partitions, n)) for s in range(n)]


def _partition_of_file(name: str) -> int:
    return int(name.split("/", 1)[0].removeprefix("p="))


class IndexUnreadable(OSError):
    """A file ``index.json`` names is missing or does not read: the index is not trusted."""


def plan(output: str, model_id: str, options: StorageOptions, *, exclude_run: str | None = None,
         trust: bool = True) -> Plan:
    """What the model's index holds, and which completed runs under OUTPUT it has not read.

    The index is trusted only while every run it read is still there as it was read: one
    published again since (a re-used run id, by this model or another, with ``scan`` or
    ``moderate``), removed, or about to be replaced (``exclude_run``) makes every run fresh,
    as ``trust=False`` does (a file of the index that does not read, ``IndexUnreadable``).
    """
    runs = {rid: run for rid, run in runs_by_id(output, options).items() if is_complete(run.names) and rid != exclude_run}
    versions = {rid: run.version or "" for rid, run in runs.items()}
    root = index_root(output, model_id)
    found = _read_plan(output, model_id, options) if trust else None
    if found is not None:
        stale = sorted(r for r, v in found.indexed.items() if versions.get(r) != v)
        if stale:
            log.info("the index of model %s read %d run(s) that changed or went since (%s): reading every run again",
                     model_id, len(stale), ", ".join(stale[:5]))
            found = None
    if found is None:
        found = Plan(root=root, hash_key=new_key(), partitions=1, generations=[], losses_file=None, indexed={},
                     runs={})
    found.runs = versions
    found.fresh = [runs[r].folder for r in sorted(set(runs) - set(found.indexed))]
    return found


def _read_plan(output: str, model_id: str, options: StorageOptions) -> Plan | None:
    """``index.json``, or None when there is none or it is of an earlier layout (every run is
    then read once, and the index written anew)."""
    root = index_root(output, model_id)
    try:
        data = json.loads(storage.read_bytes(index_path(output, model_id), options))
    except FileNotFoundError:
        return None
    except ValueError:
        data = None
    key = data.get("hash_key") if isinstance(data, dict) else None
    try:
        same_hash = data.get("hash_check") == check_value(key)
    except (ValueError, AttributeError):
        same_hash = False
    if not isinstance(data, dict) or data.get("layout") != LAYOUT or not same_hash:
        log.info("the index of model %s is of an earlier layout: reading every run once", model_id)
        return None
    return Plan(root=root, hash_key=key, partitions=int(data["partitions"]), generations=list(data["generations"]),
                losses_file=data.get("losses"), indexed={str(k): str(v) for k, v in data["runs"].items()}, runs={})


class Shard:
    """The final keys of some of an index's partitions (from its generations, and from the
    runs it has not read yet), looked up by fingerprint. The driver's ``history`` holds every
    partition in one; the scan spreads them over index actors (``ray_edge.scan.skip``).
    """

    def __init__(self, found: Plan, partitions: list[int], model_id: str, options: StorageOptions):
        self.plan, self.partitions, self.model_id, self.options = found, sorted(partitions), model_id, options
        mine = set(self.partitions)
        try:
            indexed = _read_keys(found.files_of(mine), options)
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            raise IndexUnreadable(f"a file of the index of model {model_id} does not read "
                                  f"({type(exc).__name__})") from exc
        fresh = read_runs(found.fresh, ["uri", "etag", "last_modified", "model_id", "error"], options)
        fresh = fresh.filter(pa.array(np.isin(self._partition(fresh.column("uri"), found.partitions), self.partitions)))
        self.fresh = self._with_fp(_final_pairs(fresh, model_id))  # final keys the generations do not hold yet
        self.fresh_losses = _lost_alone(fresh, model_id)
        self._index(pa.concat_tables([indexed, self.fresh]))

    def _partition(self, uris: pa.ChunkedArray, partitions: int) -> np.ndarray:
        return partition_of(uris, partitions, self.plan.hash_key)

    def _with_fp(self, keys: pa.Table) -> pa.Table:
        """``keys`` (``KEY``) with their fingerprints (``FP``)."""
        keys = keys.select(KEY).cast(KEY_SCHEMA)
        return keys.append_column(FP, pa.array(fingerprint(keys, self.plan.hash_key), pa.uint64()))

    def _index(self, seen: pa.Table) -> None:
        """Hold ``seen`` (``KEY`` + ``FP``) as read, its fingerprints sorted with the row of
        each (the table itself is not reordered: millions of strings), each key once."""
        fps = seen.column(FP).to_numpy()
        order = np.argsort(fps, kind="stable")  # files are sorted already: merging runs is cheap
        fps = fps[order]
        again = np.nonzero(fps[1:] == fps[:-1])[0] + 1  # the same fingerprint as the row before
        if again.size:  # a key held twice (in two generations) is held once: the first read
            shared = np.zeros(len(fps), np.bool_)
            shared[again] = shared[again - 1] = True
            at = np.nonzero(shared)[0]  # the rows of fingerprints held more than once, a few
            first = (seen.select(KEY).take(pa.array(order[at])).append_column("_at", pa.array(at, pa.int64()))
                     .group_by(KEY, use_threads=False).aggregate([("_at", "min")]))
            keep = ~shared
            keep[first.column("_at_min").to_numpy()] = True
            fps, order = fps[keep], order[keep]
        self._table, self._fps, self._order = seen, fps, order
        self._shared = bool((fps[1:] == fps[:-1]).any())  # keys that share a fingerprint (a few, if any)
        # taken from batch by batch: Arrow's take from a table of many chunks joins them all
        # first, at every lookup (30x slower for a few million keys)
        self._batches = seen.select(KEY).to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    def _held(self, at: np.ndarray) -> pa.Table:
        """The keys (``KEY``) held at places ``at`` of the sorted fingerprints, in that order."""
        rows = self._order[at]
        batch = np.searchsorted(self._starts, rows, "right") - 1
        by = np.argsort(batch, kind="stable")
        rows, batch = rows[by], batch[by]
        cut = np.searchsorted(batch, np.arange(len(self._batches) + 1))
        parts = [self._batches[b].take(pa.array(rows[cut[b]:cut[b + 1]] - self._starts[b]))
                 for b in np.unique(batch)]
        held = pa.Table.from_batches(parts, KEY_SCHEMA).combine_chunks()  # len(at) rows, by batch
        return held.take(pa.array(np.argsort(by)))  # back in the order of ``at``

    def rows(self) -> pa.Table:
        """The final keys held (``KEY`` + ``FP``), each once, in the order they were read (runs, then rows)."""
        return self._table.take(pa.array(np.sort(self._order)))

    def keys(self) -> pa.Table:
        """The final keys held, in the order they were read."""
        return self.rows().select(KEY)

    def seen_mask(self, keys: pa.Table, fps: np.ndarray | None = None) -> np.ndarray:
        """Which rows of ``keys`` (``KEY``; a null uri or etag matches nothing) are final keys
        here; ``fps``: their fingerprints, when the caller has them."""
        out = np.zeros(keys.num_rows, np.bool_)
        if not keys.num_rows or not len(self._fps):
            return out
        usable = pc.and_(pc.is_valid(keys.column("uri")), pc.is_valid(keys.column("etag")))
        q = fingerprint(keys, self.plan.hash_key) if fps is None else fps
        # looked up in order: each search starts near the last one's place (7x faster than at random)
        order = np.argsort(q)
        left = np.empty(len(q), np.int64)
        left[order] = np.searchsorted(self._fps, q[order], "left")
        if self._shared:
            right = np.empty(len(q), np.int64)
            right[order] = np.searchsorted(self._fps, q[order], "right")
        else:  # each fingerprint held once: there, or not held
            right = left + (self._fps[np.minimum(left, len(self._fps) - 1)] == q)
        cand = np.nonzero((right > left) & usable.to_numpy(zero_copy_only=False))[0]
        if not cand.size:
            return out
        keys = keys.select(KEY).cast(KEY_SCHEMA)
        counts = right[cand] - left[cand]
        one = counts == 1  # the usual case: the key held under that fingerprint, compared field by field
        if one.any():
            asked, held = keys.take(pa.array(cand[one])), self._held(left[cand[one]])
            same = pc.and_(pc.and_(pc.equal(asked["uri"], held["uri"]), pc.equal(asked["etag"], held["etag"])),
                           pc.equal(asked["modified"], held["modified"]))
            out[cand[one][same.to_numpy(zero_copy_only=False)]] = True
        if (~one).any():  # several keys share the fingerprint: a join on those few
            cand, counts = cand[~one], counts[~one]
            starts = np.repeat(left[cand], counts)
            rows = starts + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
            asked = keys.take(pa.array(cand)).append_column("_row", pa.array(cand, pa.int64()))
            matched = asked.join(self._held(rows).select(KEY), keys=KEY, join_type="left semi")
            out[matched.column("_row").to_numpy(zero_copy_only=False)] = True
        return out

    def not_final(self, losses: pa.Table) -> pa.Table:
        """``losses`` without the objects that have a final key here."""
        if not losses.num_rows:
            return losses
        return losses.filter(pa.array(~self.seen_mask(losses.select(KEY))))

    def write_generation(self, name: str, runs: list[str], *, compact: bool, partitions: int,
                         shard: int) -> tuple[list[str], int, pa.Table]:
        """Write this shard's part of generation ``name``: the final keys of ``runs`` (just
        published) and of the fresh runs, or, to compact, every key it holds, into files of
        ``partitions`` partitions (this shard's keys may land in any of them then). Returns
        the files (relative to the index root), their rows, and the lost-alone rows of ``runs``.
        """
        new = read_runs(runs, ["uri", "etag", "last_modified", "model_id", "error"], self.options)
        new = new.filter(pa.array(np.isin(self._partition(new.column("uri"), self.plan.partitions), self.partitions)))
        added = self._with_fp(_final_pairs(new, self.model_id))
        self._index(pa.concat_tables([self.rows(), added]))
        # what the generations do not hold (the fresh runs' keys and this run's), or all, each once
        keys = self.rows() if compact else pa.concat_tables([self.fresh, added]).group_by([*KEY, FP]).aggregate([])
        place = self._partition(keys.column("uri"), partitions)
        files, rows = [], 0
        for p in np.unique(place):
            part = keys.filter(pa.array(place == p))
            rel = f"p={int(p):03d}/{name}-{shard}.parquet"
            _write_parquet(storage.join(self.plan.root, rel), _sorted(part), self.options)
            files.append(rel)
            rows += part.num_rows
        return files, rows, _lost_alone(new, self.model_id)


def _sorted(keys: pa.Table) -> pa.Table:
    """``keys`` (``KEY`` + ``FP``) by fingerprint, as index files hold them."""
    return keys.take(pa.array(np.argsort(keys.column(FP).to_numpy(), kind="stable")))


def _read_keys(files: list[str], options: StorageOptions) -> pa.Table:
    schema = KEY_SCHEMA.append(pa.field(FP, pa.uint64()))
    # ParquetFile reads a chunk per row group (read_table: one per 128K rows); a missing column is a KeyError
    parts = [pq.ParquetFile(pa.BufferReader(storage.read_bytes(f, options))).read(schema.names)
             .select(schema.names).cast(schema)
             for f in files]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _write_parquet(uri: str, table: pa.Table, options: StorageOptions) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), options)


def compaction(found: Plan, new_rows: int) -> int | None:
    """The partition count to compact into before the next generation, or None to add one."""
    rows = found.rows + new_rows
    want = max(1, min(MAX_PARTITIONS, math.ceil(rows / PARTITION_ROWS)))
    too_full = found.partitions < want and rows > 2 * found.partitions * PARTITION_ROWS
    if len(found.generations) + 1 > MAX_GENERATIONS or too_full or (found.generations == [] and found.partitions != want):
        return want
    return None


def commit(found: Plan, generation: dict, losses: pa.Table, runs: dict[str, str], options: StorageOptions,
           *, partitions: int, replaces: bool) -> None:
    """Make ``generation`` (and ``losses``) part of the index: ``index.json`` written last.
    ``replaces``: the generation holds every key (a compaction); the earlier ones go."""
    losses_file = None
    if losses.num_rows:
        losses_file = f"losses-{generation['name']}.parquet"
        _write_parquet(storage.join(found.root, losses_file), losses.select(LOSSES_SCHEMA.names), options)
    if replaces:
        generations = [generation]
    else:  # a run that added no final key adds no generation (its version is still recorded)
        generations = [*found.generations, *([generation] if generation["files"] else [])]
    state = {"layout": LAYOUT, "hash_key": found.hash_key, "hash_check": check_value(found.hash_key),
             "partitions": partitions, "runs": dict(sorted(runs.items())),
             "generations": generations, "losses": losses_file}
    storage.write_bytes(storage.join(found.root, "index.json"), json.dumps(state, indent=1).encode(), options)
    keep = {f for g in generations for f in g["files"]} | ({losses_file} if losses_file else set())
    _remove_unnamed(found.root, keep, options)


def _remove_unnamed(root: str, keep: set[str], options: StorageOptions) -> None:
    """Files of the index folder that ``index.json`` does not name: generations compacted away,
    parts of a write that died, the earlier layout's file."""
    for rel in storage.list_names(root, options):
        if rel != "index.json" and rel not in keep:
            storage.remove(storage.join(root, rel), options)


def read_losses(found: Plan, options: StorageOptions) -> pa.Table:
    if not found.losses_file:
        return LOSSES_SCHEMA.empty_table()
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(found.root, found.losses_file), options)))
        return table.select(LOSSES_SCHEMA.names).cast(LOSSES_SCHEMA)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise IndexUnreadable(f"the losses file of an index does not read ({type(exc).__name__})") from exc


def new_generation_name(run_id: str | None) -> str:
    return f"{run_id or 'index'}-{uuid.uuid4().hex[:8]}"


def history(output: str, model_id: str, options: StorageOptions, *, exclude_run: str | None = None) -> History:
    """The objects (``KEY``) ``model_id`` has a final row for in a completed run under OUTPUT,
    the times each other object was lost alone (for ``poison``), and the runs read: every
    partition of the index in this process (the scan spreads them over index actors).

    ``exclude_run``'s own rows never count (re-running a run replaces it). What runs already
    folded into the model's index (``OUTPUT/_index/``) hold comes from there, so the check
    reads only the runs since the last ``moderate`` (see ``plan`` for when it reads them all).
    """
    found = plan(output, model_id, options, exclude_run=exclude_run)
    try:
        shard = Shard(found, list(range(found.partitions)), model_id, options)
        indexed_losses = read_losses(found, options)
    except IndexUnreadable as exc:
        log.warning("%s: reading every run again", exc)
        found = plan(output, model_id, options, exclude_run=exclude_run, trust=False)
        shard, indexed_losses = Shard(found, list(range(found.partitions)), model_id, options), read_losses(found, options)
    lost = sum_losses([indexed_losses, shard.fresh_losses])
    return History(seen=shard.keys(), losses=shard.not_final(lost), runs=found.runs)


def already_scored(output: str, model_id: str, options: StorageOptions, *,
                   exclude_run: str | None = None) -> tuple[pa.Table, list[str]]:
    """``KEY`` of the objects ``model_id`` has a final row for in a completed run under OUTPUT,
    and the run ids they were read from (``history`` without the losses)."""
    found = history(output, model_id, options, exclude_run=exclude_run)
    return found.seen, sorted(found.runs)


def write_index(output: str, model_id: str, pairs: pa.Table, runs: dict[str, str], options: StorageOptions,
                losses: pa.Table | None = None) -> None:
    """Replace the model's index with ``pairs`` (``KEY``, final) and ``losses`` (not final, lost
    alone so many times) read from ``runs`` (run id -> version): one generation, in this process."""
    final = _distinct([pairs])
    partitions = max(1, min(MAX_PARTITIONS, math.ceil(final.num_rows / PARTITION_ROWS)))
    found = Plan(root=index_root(output, model_id), hash_key=new_key(), partitions=partitions, generations=[],
                 losses_file=None, indexed={}, runs=runs)
    final = final.append_column(FP, pa.array(fingerprint(final, found.hash_key), pa.uint64()))
    name = new_generation_name(None)
    place = partition_of(final.column("uri"), partitions, found.hash_key)
    files = []
    for p in np.unique(place):
        rel = f"p={int(p):03d}/{name}-0.parquet"
        _write_parquet(storage.join(found.root, rel), _sorted(final.filter(pa.array(place == p))), options)
        files.append(rel)
    kept = LOSSES_SCHEMA.empty_table()
    if losses is not None and losses.num_rows:
        kept = _not_final(sum_losses([losses]), final.select(KEY))
    commit(found, {"name": name, "files": files, "rows": final.num_rows}, kept, runs, options,
           partitions=partitions, replaces=True)
