"""The listing as the head of the scan (``ray_edge.scan.feed``): windows that start small and
grow, a bounded queue, every listed object once in the staged listing, suspects kept out of
the windows, a listing that fails raising in the driver, and a live first window whose stream
starts before its blocks are listed."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import ray

from ntf_ray import storage
from ntf_ray.ray_edge.scan import feed as feed_module
from ntf_ray.ray_edge.scan.feed import ListingFeed, LiveWindow
from ntf_ray.scan.index import LOSSES_SCHEMA
from ntf_ray.scan.publish import SEQ
from ntf_ray.scan.spec import ScanSpec

pytestmark = pytest.mark.timeout(120)
OPTS = storage.StorageOptions()


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _folder(tmp_path, n: int) -> str:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        (src / f"{i:04d}.png").write_bytes(b"x" * (i % 7 + 1))
    return str(src)


def _rows(refs) -> list[int]:
    return [s for ref in refs for s in ray.get(ref).column(SEQ).to_pylist()]


def test_windows_start_small_grow_and_cover_every_object_once(ray_session, tmp_path):
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 300), read_block_rows=4)
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged")).start()
    windows = list(listing.windows())
    listing.join()
    sizes, want, left = [len(w) for w in windows], feed_module.FIRST_WINDOW, 75  # 75 blocks of 4 objects
    for size in sizes:  # each window at least as large as its turn asks (8, then 4 times more each time) ...
        assert min(want, left) <= size <= feed_module.MAX_WINDOW
        want, left = want * feed_module.GROWTH, left - size
    assert left == 0  # ... and every block in one of them
    seqs = [s for w in windows for s in _rows(w)]
    assert sorted(seqs) == list(range(300)) and listing.rows == listing.listed == 300
    staged = pa.concat_tables(listing.tables())  # what publishing and the rounds of isolation read back
    assert sorted(staged.column(SEQ).to_pylist()) == list(range(300))
    assert staged.column("uri").to_pylist() == sorted(staged.column("uri").to_pylist())


def test_the_listing_waits_while_its_window_is_full(ray_session, tmp_path):
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 200), read_block_rows=2)
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged"), first=2, most=5).start()
    time.sleep(1.0)
    assert listing.queued == 5 and listing._thread.is_alive()  # 100 blocks listed, 5 let into the queue
    sizes = [len(w) for w in listing.windows()]
    listing.join()
    assert sizes[0] == 5 and max(sizes) == 5 and sum(sizes) == 100  # what was queued, never more than 5


def test_suspects_stay_out_of_the_windows(ray_session, tmp_path):
    src = _folder(tmp_path, 20)
    spec = ScanSpec(model="-", output="-", input=src, read_block_rows=4)
    from ntf_ray.scan.index import skip_key
    from ntf_ray.scan.listing import list_objects

    rows = list_objects(spec, OPTS)
    key = skip_key(rows.filter(pa.compute.ends_with(rows["uri"], "/0005.png"))).to_pylist()[0]
    suspect = key["uri"]
    found = SimpleNamespace(unseen=None, losses=pa.Table.from_pylist([{**key, "losses": 2}], schema=LOSSES_SCHEMA),
                            settle=lambda: False)
    listing = ListingFeed(spec, OPTS, found, str(tmp_path / "staged")).start()
    queued = [s for w in listing.windows() for s in _rows(w)]
    listing.join()
    (seq,) = listing.suspect_seqs().tolist()
    assert seq not in queued and sorted([*queued, seq]) == list(range(20))
    assert listing.prior_losses()[seq] == 2 and int(np.count_nonzero(listing.prior_losses())) == 1
    uris = {r[SEQ]: r["uri"] for t in listing.tables() for r in t.to_pylist()}
    assert uris[seq] == suspect


def _held_listing(monkeypatch) -> threading.Event:
    """The listing lists nothing until the returned event is set."""
    gate, real = threading.Event(), feed_module.iter_kept

    def held(*args, **kwargs):
        assert gate.wait(60), "the test never let the listing go"
        yield from real(*args, **kwargs)

    monkeypatch.setattr(feed_module, "iter_kept", held)
    monkeypatch.setattr(feed_module, "START_WAIT_S", 0.2)
    return gate


def _live_rows(window: LiveWindow) -> list[int]:
    """The seqs a live window's stream gives, as a scan's detectors would get them."""
    return [s for batch in window.dataset().iter_batches(batch_format="pyarrow", batch_size=None)
            for s in batch.column(SEQ).to_pylist()]


def test_a_listing_still_going_gets_a_live_window_before_its_first_block(ray_session, tmp_path, monkeypatch):
    gate = _held_listing(monkeypatch)
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 40), read_block_rows=4)  # 10 blocks
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged"), live=3).start()
    windows = listing.windows()
    live = next(windows)  # its stream can start (and its detectors with it) while nothing is listed yet
    assert isinstance(live, LiveWindow) and listing.queued == 0 and len(live) == 0
    gate.set()
    got = _live_rows(live)
    rest = [_rows(w) for w in windows]
    listing.join()
    assert len(live) == 3 and sorted(got) == list(range(12))  # the first 3 blocks, each once
    assert sorted(s for w in rest for s in w) == list(range(12, 40))  # the others in the windows after it


def test_a_live_window_whose_listing_ends_first_ends_with_what_it_got(ray_session, tmp_path, monkeypatch):
    gate = _held_listing(monkeypatch)
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 8), read_block_rows=4)  # 2 blocks
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged"), live=5).start()
    windows = listing.windows()
    live = next(windows)
    gate.set()
    got = _live_rows(live)  # 3 of its 5 tokens get nothing, and the stream ends
    assert sorted(got) == list(range(8)) and len(live) == 2
    assert list(windows) == []
    listing.join()


def test_a_handoff_told_its_end_before_its_last_block_still_hands_that_block_over(ray_session):
    handoff = feed_module._Handoff.remote()
    block = ray.put(pa.table({SEQ: [7]}))
    ray.get(handoff.end.remote(1))  # an async actor may run the end before the put sent before it
    ray.get(handoff.put.remote([block]))
    item = ray.get(handoff.take.remote())
    assert ray.get(item[0]).column(SEQ).to_pylist() == [7]
    assert ray.get(handoff.take.remote(), timeout=30) is None  # then every token still waiting gets nothing


def test_a_live_window_of_a_listing_that_lists_nothing_scores_nothing(ray_session, tmp_path, monkeypatch):
    gate = _held_listing(monkeypatch)
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 8), read_block_rows=4)
    everything_seen = SimpleNamespace(unseen=lambda rows: rows.slice(0, 0), losses=LOSSES_SCHEMA.empty_table(),
                                      settle=lambda: False)
    listing = ListingFeed(spec, OPTS, everything_seen, str(tmp_path / "staged"), live=4).start()
    windows = listing.windows()
    live = next(windows)
    gate.set()
    assert _live_rows(live) == [] and len(live) == 0 and list(windows) == []
    listing.join()
    assert listing.listed == 8 and listing.rows == 0


def test_a_listing_that_fails_midway_raises_in_the_driver_after_what_it_queued(ray_session, tmp_path, monkeypatch):
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 10), read_block_rows=4)
    real = feed_module.iter_kept

    def failing(*args, **kwargs):
        yield from real(*args, **kwargs)
        raise OSError("the listing broke")

    monkeypatch.setattr(feed_module, "iter_kept", failing)
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged")).start()
    assert sum(len(w) for w in listing.windows()) == 3  # what was listed is still scored ...
    with pytest.raises(OSError, match="the listing broke"):  # ... and the run then fails
        listing.join()


def test_closing_a_feed_whose_windows_were_never_taken_ends_its_thread(ray_session, tmp_path):
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 100), read_block_rows=1)
    listing = ListingFeed(spec, OPTS, None, str(tmp_path / "staged"), most=3).start()
    time.sleep(0.5)
    listing.close()
    assert not listing._thread.is_alive()


class _Reopened:
    """A model's index whose first actors found a file that did not read (``SkipIndex.settle``
    starts others that read every run): what the first ones kept must not count."""

    def __init__(self):
        self.settled, self.losses = False, LOSSES_SCHEMA.empty_table()

    @property
    def unseen(self):
        if not self.settled:
            return lambda rows: rows  # the first actors: an unread index holds nothing
        return lambda rows: rows.filter(pa.compute.match_substring_regex(rows["uri"], "[13579][.]png$"))

    def settle(self) -> bool:
        first, self.settled = not self.settled, True
        return first


def test_a_listing_is_listed_again_when_the_index_actors_had_to_start_again(ray_session, tmp_path):
    spec = ScanSpec(model="-", output="-", input=_folder(tmp_path, 40), read_block_rows=4)
    monkey_chunk = 10  # several chunks: the first is listed before the index settles
    real = feed_module.iter_kept
    feed_module.iter_kept = lambda *a, **kw: real(*a, chunk=monkey_chunk, **kw)
    try:
        listing = ListingFeed(spec, OPTS, _Reopened(), str(tmp_path / "staged")).start()
        queued = [s for w in listing.windows() for s in _rows(w)]
        listing.join()
    finally:
        feed_module.iter_kept = real
    assert listing.listed == 40 and listing.rows == 20 and sorted(queued) == list(range(20))
    uris = [u for t in listing.tables() for u in t.column("uri").to_pylist()]
    assert len(uris) == 20 and all(u[-5] in "13579" for u in uris)
