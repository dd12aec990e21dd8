"""``moderate``'s already-scored check, with the model's index held by index actors, not the driver.

The index (``ntf_ray.scan.index``) is partitioned by a hash of the uri; each index actor
holds a few partitions (``Plan.shards``: one actor per few million keys), read from storage
in the actor, together with the runs the index has not read yet. The driver sends each
listing chunk's keys to the actors that hold their partitions and keeps the rows none of
them has seen; once the run is published, each actor writes its part of the index's next
generation (the run's final keys and the fresh runs'), and the driver writes ``index.json``
from their file names and counts. What the driver holds: one listing chunk, and the losses
(objects lost alone in earlier runs, a handful).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pyarrow as pa
import ray

from ntf_ray import storage
from ntf_ray.scan.index import (
    KEY,
    LOSSES_SCHEMA,
    IndexUnreadable,
    Plan,
    Shard,
    commit,
    compaction,
    new_generation_name,
    plan,
    read_losses,
    skip_key,
    sum_losses,
)
from ntf_ray.scan.keyhash import fingerprint, partition_of_hash, string_hash
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)


class _IndexShard:
    """One index actor: ``Shard`` of some partitions (see ``SkipIndex``)."""

    def __init__(self, found: Plan, partitions: list[int], model_id: str, options: StorageOptions, sources: list):
        for source in sources:  # sources registered in the driver (tests, plug-ins)
            storage.register(source)
        try:
            self.shard, self.unreadable = Shard(found, partitions, model_id, options), None
        except IndexUnreadable as exc:  # told to the driver, which reads every run instead
            self.shard, self.unreadable = None, str(exc)

    def fresh(self) -> tuple[pa.Table, int, str | None]:
        if self.shard is None:
            return LOSSES_SCHEMA.empty_table(), 0, self.unreadable
        return self.shard.fresh_losses, self.shard.fresh.num_rows, None

    def seen_mask(self, keys: pa.Table, fps: np.ndarray) -> np.ndarray:
        if self.shard is None:  # the index did not read: the driver starts others (``SkipIndex.settle``)
            return np.zeros(keys.num_rows, np.bool_)
        return self.shard.seen_mask(keys, fps)

    def not_final(self, losses: pa.Table) -> pa.Table:
        return self.shard.not_final(losses)

    def write_generation(self, name: str, runs: list[str], compact: bool, partitions: int,
                         shard: int) -> tuple[list[str], int, pa.Table]:
        return self.shard.write_generation(name, runs, compact=compact, partitions=partitions, shard=shard)


class Unseen:
    """``keep(rows)``: the listing rows whose key no index actor holds (a null etag is never
    held). Holds the actors' handles and the index's hash key only, so that a Ray task reading
    an inventory file can keep its rows before they travel; the task hashes each key once (its
    partition, hence its actor, and its fingerprint), the actors only look them up."""

    #: Keys asked of an actor in one call.
    ASK_ROWS = 100_000

    def __init__(self, actors: list, partitions: int, hash_key: str, *, empty: bool = False):
        if not actors and not empty:
            raise RuntimeError("no index actor to ask (the run's index was closed)")
        self.actors, self.partitions, self.hash_key, self.empty = actors, partitions, hash_key, empty

    def __call__(self, rows: pa.Table) -> pa.Table:
        if self.empty or not rows.num_rows:
            return rows
        keys = pa.table({"uri": rows["uri"], "etag": rows["etag"], "modified": skip_key(rows)["modified"]})
        return rows.filter(pa.array(~self.seen_mask(keys)))

    def seen_mask(self, keys: pa.Table) -> np.ndarray:
        out = np.zeros(keys.num_rows, np.bool_)
        if self.empty or not keys.num_rows:
            return out
        keys = keys.select(KEY).combine_chunks()  # one chunk: each actor's take below gathers only its rows
        n = len(self.actors)
        uri_hash = string_hash(keys.column("uri"), self.hash_key)
        fps = fingerprint(keys, self.hash_key, uri_hash=uri_hash)
        owner = partition_of_hash(uri_hash, self.partitions) % n
        asked = []
        for s in range(n):
            rows = np.nonzero(owner == s)[0]
            for start in range(0, rows.size, self.ASK_ROWS):
                part = rows[start:start + self.ASK_ROWS]
                asked.append((part, self.actors[s].seen_mask.remote(keys.take(pa.array(part)), fps[part])))
        for part, ref in asked:
            out[part] = ray.get(ref)
        return out


class SkipIndex:
    """A model's index under OUTPUT, spread over index actors for one ``moderate`` run.

    The actors load while the listing starts (its first tasks read and hash their data files
    meanwhile; their lookups wait for the actors): ``settle`` waits for them, once the first
    chunk of the listing is in. An index file that does not read makes ``settle`` start new
    actors that read every run instead, and say so: what was listed with the first ones is
    listed again.
    """

    def __init__(self, output: str, model_id: str, options: StorageOptions, *, exclude_run: str | None = None):
        self.options, self.actors, self.model_id = options, [], model_id
        self._where = (output, exclude_run)
        self._settled = self._closed = False
        self._lock = threading.Lock()  # ``settle`` runs in the listing's thread, ``close`` in the driver's
        self._start(trust=True)

    def _start(self, *, trust: bool) -> None:
        """Start the index actors (they read their partitions in the background)."""
        output, exclude_run = self._where
        try:
            self.found = plan(output, self.model_id, self.options, exclude_run=exclude_run, trust=trust)
            self.shards = self.found.shards()
            actor = ray.remote(_IndexShard).options(num_cpus=0, max_restarts=3, max_task_retries=3)
            with self._lock:
                if self._closed:
                    raise RuntimeError("the run ended while its index actors were starting")
                self.actors = [actor.remote(self.found, parts, self.model_id, self.options, storage.sources())
                               for parts in self.shards]
        except BaseException:
            self.close()  # no index actor outlives a run that could not start
            raise

    def settle(self) -> bool:
        """Wait for the index actors; True when they had to be started again (an index file
        did not read: every run is read instead, and what the first ones answered is void)."""
        if self._settled:
            return False
        restarted = False
        try:
            unreadable = self._loaded()
            if unreadable:
                log.warning("%s: reading every run again", unreadable)
                self._kill()
                self._start(trust=False)
                restarted = True
                self._loaded()
        except BaseException:
            self.close()
            raise
        self._settled = True
        log.info("index of model %s: %d keys in %d partition(s) over %d index actor(s), %d run(s) not read before",
                 self.model_id, self.found.rows, self.found.partitions, len(self.actors), len(self.found.fresh))
        return restarted

    def _loaded(self) -> str | None:
        """Wait for the actors to read the index; what stops them (None: nothing)."""
        fresh = ray.get([a.fresh.remote() for a in self.actors])
        unreadable = next((u for _, _, u in fresh if u), None)
        if unreadable:
            return unreadable
        self.fresh_rows = sum(n for _, n, _ in fresh)
        try:
            indexed = read_losses(self.found, self.options)
        except IndexUnreadable as exc:
            return str(exc)
        losses = sum_losses([indexed, *(t for t, _, _ in fresh)])
        for a in self.actors:
            losses = ray.get(a.not_final.remote(losses))
        self.losses = losses
        return None

    def seen_mask(self, keys: pa.Table) -> np.ndarray:
        """Which rows of ``keys`` (``KEY``) the model has a final row for."""
        self.settle()
        return self.unseen.seen_mask(keys)

    @property
    def unseen(self) -> Unseen:
        """What keeps the listing rows not scored yet: it can be sent to Ray tasks (``listing.Keep``)."""
        return Unseen(self.actors, self.found.partitions, self.found.hash_key,
                      empty=not (self.found.rows or self.found.fresh))

    def commit(self, run_id: str, run_dir: str, version: str, new_rows: int) -> None:
        """Fold the published run (and the runs the index had not read) into the index."""
        self.settle()
        partitions = compaction(self.found, self.fresh_rows + new_rows)
        compact = partitions is not None
        partitions = partitions or self.found.partitions
        name = new_generation_name(run_id)
        written = ray.get([a.write_generation.remote(name, [run_dir], compact, partitions, s)
                           for s, a in enumerate(self.actors)])
        files = sorted(f for fs, _, _ in written for f in fs)
        rows = sum(n for _, n, _ in written)
        losses = sum_losses([self.losses, *(lost for _, _, lost in written)])
        for a in self.actors:  # what became final in this run is no longer a loss
            losses = ray.get(a.not_final.remote(losses))
        commit(self.found, {"name": name, "files": files, "rows": rows}, losses,
               {**self.found.runs, run_id: version}, self.options, partitions=partitions, replaces=compact)
        if compact:
            log.info("index compacted: %d keys in %d partition(s)", rows, partitions)

    def record_losses(self, lost: pa.Table) -> None:
        """Keep ``lost`` (``KEY`` + times lost alone) in the index although this run publishes
        nothing: the next run scores those objects alone at once, and counts them towards
        ``poison``. Only the index's own losses are added to (the runs it has not read yet
        are read again next time); never raises: the run is already failing for its own reason."""
        if not lost.num_rows:
            return
        try:
            indexed = read_losses(self.found, self.options)
            commit(self.found, {"name": new_generation_name(None), "files": [], "rows": 0},
                   sum_losses([indexed, lost]), dict(self.found.indexed), self.options,
                   partitions=self.found.partitions, replaces=False)
            log.warning("%d object(s) lost their worker while scored alone; kept in the index of model %s for the "
                        "next run", lost.num_rows, self.model_id)
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not keep this run's lost objects in the index (%s)", type(exc).__name__)

    def _kill(self) -> None:
        with self._lock:
            actors, self.actors = self.actors, []
        for a in actors:
            ray.kill(a)

    def close(self) -> None:
        """Kill the index actors; none start after this."""
        with self._lock:
            self._closed = True
        self._kill()
