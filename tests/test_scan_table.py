"""The score table without a cluster: publishing a run in one piece, what counts as already
scored (final outcomes only, the index, a re-run's own rows), and OUTPUT's lease."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntf_ray import storage
from ntf_ray.scan import index, lock, publish, table


def _rows(uris: list[str], errors: list[str | None] | None = None, seqs: list[int] | None = None,
          model_id: str = "m1") -> pa.Table:
    """Staged rows as the detector actors write them (the table's columns and ``seq``)."""
    n = len(uris)
    cols = {f.name: pa.nulls(n, f.type) for f in publish.STAGED_SCHEMA}
    cols["uri"] = pa.array(uris, pa.string())
    cols["etag"] = pa.array([f"e-{u}" for u in uris], pa.string())
    cols["error"] = pa.array(errors or [None] * n, pa.string())
    cols["model_id"] = pa.array([model_id] * n, pa.string())
    cols["seq"] = pa.array(seqs if seqs is not None else range(n), pa.int64())
    return pa.table(cols, schema=publish.STAGED_SCHEMA)


def _listing(uris: list[str]) -> pa.Table:
    return pa.table({"uri": uris, "etag": [f"e-{u}" for u in uris], "size_bytes": pa.array([1] * len(uris), pa.int64()),
                     "last_modified": pa.nulls(len(uris), pa.timestamp("us", tz="UTC")),
                     "seq": pa.array(range(len(uris)), pa.int64())})


def _publish(out, run_id: str, staged_tables: list[pa.Table], listing: pa.Table) -> publish.Tally:
    staged = publish.staging_dir(str(out), run_id)
    for i, t in enumerate(staged_tables):
        storage.write_bytes(f"{staged}/part-{i}.parquet", _parquet(t))
    run_dir = f"{out}/dt=2026-01-01/run_id={run_id}"
    tally = publish.publish(staged, run_dir, lambda: [listing], listing.num_rows, "worker_lost: test", run_id=run_id,
                          model_id="m1", threshold=0.5, options=storage.StorageOptions())
    (out / "dt=2026-01-01" / f"run_id={run_id}" / table.SUCCESS).write_bytes(b"")
    return tally


def _parquet(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    return sink.getvalue().to_pybytes()


def test_a_run_is_published_as_one_file_with_one_row_per_listed_object(tmp_path):
    listing = _listing(["a", "b", "c"])
    staged = [_rows(["a", "b"]), _rows(["b"], seqs=[1])]  # "b" twice: a retried task; "c" never came back
    assert table.completed_runs(str(tmp_path), storage.StorageOptions()) == []
    tally = _publish(tmp_path, "r1", staged, listing)
    run_dir = tmp_path / "dt=2026-01-01" / "run_id=r1"
    assert sorted(p.name for p in run_dir.iterdir()) == [table.SUCCESS, table.ROWS]
    published = pq.read_table(run_dir / table.ROWS)
    assert sorted(published.column("uri").to_pylist()) == ["a", "b", "c"]
    lost = published.filter(pa.compute.equal(published["uri"], "c")).to_pylist()[0]
    assert lost["error"] == "worker_lost: test" and lost["etag"] == "e-c" and lost["model_id"] == "m1"
    assert published.schema.equals(table.FILE_SCHEMA)  # seq stays in the staging files
    assert (tally.rows, tally.scored, tally.errors_by_kind) == (3, 0, {"worker_lost": 1})
    # what the index keeps: final outcomes only (a lost object is scored again)
    final = index._final_pairs(published, "m1")
    assert sorted(final.column("uri").to_pylist()) == ["a", "b"]
    # the staging folder is under a name every reader skips
    assert table.run_dirs(str(tmp_path), storage.StorageOptions()) == [("r1", str(run_dir))]


def test_only_final_outcomes_count_as_scored_and_a_rerun_does_not_count_itself(tmp_path):
    opts = storage.StorageOptions()
    _publish(tmp_path, "r1", [_rows(["ok", "bad", "slow", "lost", "oom"], [
        None, "decode: not an image", "read: OSError: SlowDown", "worker_lost: x", "decode: out of memory"])],
        _listing(["ok", "bad", "slow", "lost", "oom"]))
    seen, runs = index.already_scored(str(tmp_path), "m1", opts)
    assert sorted(seen.column("uri").to_pylist()) == ["bad", "ok"] and runs == ["r1"]
    assert index.already_scored(str(tmp_path), "m1", opts, exclude_run="r1")[0].num_rows == 0
    assert index.already_scored(str(tmp_path), "other-model", opts)[0].num_rows == 0


def test_the_index_spares_rereading_history(tmp_path, monkeypatch):
    opts = storage.StorageOptions()
    for i in range(3):
        _publish(tmp_path, f"r{i}", [_rows([f"u{i}"])], _listing([f"u{i}"]))
    seen, runs = index.already_scored(str(tmp_path), "m1", opts)
    index.write_index(str(tmp_path), "m1", seen, index.history(str(tmp_path), "m1", opts).runs, opts)
    _publish(tmp_path, "r3", [_rows(["u3"])], _listing(["u3"]))
    read: list[list[str]] = []
    real = table.read_runs
    monkeypatch.setattr(index, "read_runs", lambda dirs, *a: read.append(dirs) or real(dirs, *a))
    seen, runs = index.already_scored(str(tmp_path), "m1", opts)
    assert sorted(seen.column("uri").to_pylist()) == ["u0", "u1", "u2", "u3"] and runs == ["r0", "r1", "r2", "r3"]
    assert [[d.rsplit("=", 1)[1] for d in dirs] for dirs in read] == [["r3"]]  # only the run since the index
    # re-running an indexed run: its old rows must not count, so everything is read again
    seen, _ = index.already_scored(str(tmp_path), "m1", opts, exclude_run="r1")
    assert sorted(seen.column("uri").to_pylist()) == ["u0", "u2", "u3"]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), storage.StorageOptions()
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.create_bucket()}/out", storage.StorageOptions(endpoint_url=s3.endpoint_url)


def test_a_second_moderate_run_refuses_while_the_first_holds_the_output(output):
    out, opts = output
    with lock.lease(out, "night-1", opts):
        with pytest.raises(lock.OutputBusy, match="run night-1 is scoring into this output"):
            with lock.lease(out, "night-2", opts):
                pass
        with lock.lease(out, "night-1", opts):  # the same run resubmitted takes its lease back
            pass
    with lock.lease(out, "night-2", opts):  # released: the next run goes
        pass
    assert not storage.exists(storage.join(out, lock.LOCK), opts)


def test_a_dead_runs_lease_is_taken_over_once_stale_and_the_loser_cannot_publish(output):
    out, opts = output
    dead = lock.Lease(out, "crashed", opts)
    dead.acquire()  # and never renewed
    storage.write_bytes(storage.join(out, lock.LOCK), json.dumps(
        {"run_id": "crashed", "since": "2026-01-01T00:00:00+00:00", "heartbeat": "2026-01-01T00:00:00+00:00"}).encode(), opts)
    with lock.lease(out, "night-2", opts, stale_s=60):
        with pytest.raises(lock.LeaseLost):
            dead.check()


def test_a_publish_that_fails_midway_leaves_nothing_at_the_table_path(output):
    """Written in place, pyarrow's close on the way out would complete the upload: a partial,
    valid scores.parquet that readers and moderate would take for a finished run."""
    out, opts = output
    target = storage.join(out, "dt=2026-01-01", "run_id=r1", table.ROWS)
    scratch = publish.staging_dir(out, "r1", "a1")

    def batches():
        yield _rows(["a"]).select(table.FILE_SCHEMA.names).to_batches()[0]
        raise KeyboardInterrupt  # Ctrl-C, or a staged file that cannot be read

    with pytest.raises(KeyboardInterrupt):
        publish.write_whole(target, batches(), opts, scratch=scratch)
    assert not storage.exists(target, opts)
    assert table.completed_runs(out, opts) == []


def test_a_resubmitted_run_takes_the_lease_and_the_first_attempt_cannot_publish(output):
    out, opts = output
    first = lock.Lease(out, "night-1", opts)
    first.acquire()
    second = lock.Lease(out, "night-1", opts)
    second.acquire()  # the same run id: a scheduler's retry takes its own lease back at once
    second.check()
    with pytest.raises(lock.LeaseLost, match="not published"):
        first.check()
    first.release()  # not its lease any more: left alone
    assert storage.exists(storage.join(out, lock.LOCK), opts)
    second.release()
    assert not storage.exists(storage.join(out, lock.LOCK), opts)


def test_a_truncated_staged_file_costs_only_its_rows(tmp_path):
    listing = _listing(["a", "b", "c"])
    staged = publish.staging_dir(str(tmp_path), "r1")
    storage.write_bytes(f"{staged}/part-0.parquet", _parquet(_rows(["a"])))
    storage.write_bytes(f"{staged}/part-1.parquet", _parquet(_rows(["b", "c"], seqs=[1, 2]))[:-40])  # writer killed
    tally = publish.publish(staged, f"{tmp_path}/dt=2026-01-01/run_id=r1", lambda: [listing], 3, "worker_lost: test",
                          run_id="r1", model_id="m1", threshold=0.5, options=storage.StorageOptions())
    assert (tally.rows, tally.errors_by_kind) == (3, {"worker_lost": 2})


def test_losses_alone_are_summed_across_runs_and_kept_in_the_index(tmp_path):
    from ntf_ray.errors import POISON_AFTER, lost_error

    opts = storage.StorageOptions()
    # r1: "k" lost alone twice, "u" lost with its group only, "g" scored
    _publish(tmp_path, "r1", [_rows(["k", "u", "g"], [lost_error(2, 2), lost_error(0, 0), None])],
             _listing(["k", "u", "g"]))
    found = index.history(str(tmp_path), "m1", opts)
    assert found.losses.to_pylist() == [{"uri": "k", "etag": "e-k", "modified": -1, "losses": 2}]
    assert sorted(found.seen.column("uri").to_pylist()) == ["g"]
    index.write_index(str(tmp_path), "m1", found.seen, found.runs, opts, losses=found.losses)
    # r2, read past the index: "k" lost alone once more (now poison, final), "u" lost alone once
    _publish(tmp_path, "r2", [_rows(["k", "u"], [lost_error(1, POISON_AFTER), lost_error(1, 1)])], _listing(["k", "u"]))
    again = index.history(str(tmp_path), "m1", opts)
    # "k" is final: no longer counted
    assert again.losses.to_pylist() == [{"uri": "u", "etag": "e-u", "modified": -1, "losses": 1}]
    assert sorted(again.seen.column("uri").to_pylist()) == ["g", "k"]
    # what the index holds and what reading every run gives are the same
    index.write_index(str(tmp_path), "m1", again.seen, again.runs, opts, losses=again.losses)
    indexed = index.history(str(tmp_path), "m1", opts)
    (tmp_path / table.INDEX).rename(tmp_path / "_moved")
    full = index.history(str(tmp_path), "m1", opts)
    for h in (indexed, full):
        assert sorted(h.seen.column("uri").to_pylist()) == ["g", "k"]
        assert h.losses.to_pylist() == [{"uri": "u", "etag": "e-u", "modified": -1, "losses": 1}]


@pytest.mark.parametrize("layout", ["pairs", "losses"])
def test_an_index_of_an_earlier_layout_is_read_past_not_trusted(tmp_path, layout, monkeypatch):
    """Indexes written before runs had versions cannot tell a replaced run: every run is read once."""
    opts = storage.StorageOptions()
    _publish(tmp_path, "r1", [_rows(["a"])], _listing(["a"]))
    old = {"uri": ["a", "ghost"], "etag": ["e-a", "e-ghost"]}
    if layout == "losses":
        old["losses"] = pa.nulls(2, pa.int64())
    storage.write_bytes(index.index_path(str(tmp_path), "m1"),
                        _parquet(pa.table(old).replace_schema_metadata({"runs": json.dumps(["r1"])})))
    read: list[list[str]] = []
    real = table.read_runs
    monkeypatch.setattr(index, "read_runs", lambda dirs, *a: read.append(dirs) or real(dirs, *a))
    found = index.history(str(tmp_path), "m1", opts)
    assert found.seen.column("uri").to_pylist() == ["a"] and found.losses.num_rows == 0 and list(found.runs) == ["r1"]
    assert [[d.rsplit("=", 1)[1] for d in dirs] for dirs in read] == [["r1"]]


def _replace(out, run_id: str, uris: list[str], model_id: str) -> None:
    """Publish ``run_id`` again with another model's rows, as a re-used run id does."""
    staged = publish.staging_dir(str(out), run_id)
    storage.write_bytes(f"{staged}/part-0.parquet", _parquet(_rows(uris, model_id=model_id)))
    publish.publish(staged, f"{out}/dt=2026-01-01/run_id={run_id}", lambda: [_listing(uris)], len(uris),
                  "worker_lost: test", run_id=run_id, model_id=model_id, threshold=0.5,
                  options=storage.StorageOptions())


def test_a_run_replaced_by_another_model_is_not_skipped_from_the_first_models_index(tmp_path):
    opts = storage.StorageOptions()
    _publish(tmp_path, "r1", [_rows(["a", "b"])], _listing(["a", "b"]))
    _publish(tmp_path, "r0", [_rows(["c"])], _listing(["c"]))
    found = index.history(str(tmp_path), "m1", opts, exclude_run="r2")
    index.write_index(str(tmp_path), "m1", found.seen, found.runs, opts)
    assert sorted(index.already_scored(str(tmp_path), "m1", opts)[0].column("uri").to_pylist()) == ["a", "b", "c"]
    _replace(tmp_path, "r1", ["a", "b"], "m2")  # model m2 re-uses run id r1: m1's rows of it are gone
    seen, runs = index.already_scored(str(tmp_path), "m1", opts, exclude_run="r2")
    assert seen.column("uri").to_pylist() == ["c"] and runs == ["r0", "r1"]
    assert index.already_scored(str(tmp_path), "m2", opts)[0].column("uri").to_pylist() == ["a", "b"]


def test_a_run_removed_since_the_index_read_it_is_not_skipped(output):
    out, opts = output
    _publish_at(out, opts, "r1", ["a"])
    _publish_at(out, opts, "r2", ["b"])
    found = index.history(out, "m1", opts)
    index.write_index(out, "m1", found.seen, found.runs, opts)
    storage.remove(storage.join(out, "dt=2026-01-01", "run_id=r1"), opts)  # retention, or by hand
    assert index.already_scored(out, "m1", opts)[0].column("uri").to_pylist() == ["b"]
    # unchanged runs: the index is trusted and no run is read again
    found = index.history(out, "m1", opts)
    index.write_index(out, "m1", found.seen, found.runs, opts)
    again = index.history(out, "m1", opts)
    assert again.seen.column("uri").to_pylist() == ["b"] and again.runs == found.runs


def _publish_at(out: str, opts, run_id: str, uris: list[str]) -> None:
    staged = publish.staging_dir(out, run_id)
    storage.write_bytes(storage.join(staged, "part-0.parquet"), _parquet(_rows(uris)), opts)
    publish.publish(staged, storage.join(out, "dt=2026-01-01", f"run_id={run_id}"), lambda: [_listing(uris)], len(uris),
                  "worker_lost: test", run_id=run_id, model_id="m1", threshold=0.5, options=opts)
    storage.write_bytes(storage.join(out, "dt=2026-01-01", f"run_id={run_id}", table.SUCCESS), b"", opts)


def test_the_skip_key_holds_the_last_modified_time_so_bytes_rewritten_under_one_etag_count_as_new():
    import datetime as dt

    t0, t1 = (dt.datetime(2026, 1, 1, s, tzinfo=dt.timezone.utc) for s in (1, 2))
    scored = pa.table({"uri": ["a", "b"], "etag": ["md5", None], "last_modified": pa.array([t0, None],
                                                                                          pa.timestamp("us", tz="UTC"))})
    key = index.skip_key(scored)
    assert key.to_pylist() == [{"uri": "a", "etag": "md5", "modified": 1767225600_000000 + 3600_000000},
                               {"uri": "b", "etag": "", "modified": -1}]
    listed = pa.table({"uri": ["a", "a"], "etag": ["md5", "md5"],
                       "last_modified": pa.array([t0, t1], pa.timestamp("us", tz="UTC"))})
    todo = key.join(index.skip_key(listed), keys=index.KEY, join_type="right anti")
    # same uri and etag, written again: scored
    assert todo.column("modified").to_pylist() == [1767225600_000000 + 2 * 3600_000000]


def test_a_finishing_attempt_leaves_the_staging_of_an_attempt_still_running_and_sweeps_dead_ones(output):
    out, opts = output
    with lock.attempt(out, "r1", opts) as running:
        storage.write_bytes(storage.join(running, "part-0.parquet"), b"rows of an attempt still going", opts)
        # an attempt that crashed long ago: its alive file's heartbeat is old
        dead = publish.staging_dir(out, "r1", "deadbeef0000")
        storage.write_bytes(storage.join(dead, "part-0.parquet"), b"rows of a crashed attempt", opts)
        old = json.dumps({"heartbeat": "2020-01-01T00:00:00+00:00"}).encode()
        storage.write_bytes(storage.join(publish.staging_dir(out, "r1"), "_alive-deadbeef0000.json"), old, opts)
        with lock.attempt(out, "r1", opts) as finishing:
            assert finishing != running
            storage.write_bytes(storage.join(finishing, "part-0.parquet"), b"rows", opts)
        assert storage.read_bytes(storage.join(running, "part-0.parquet"), opts) == b"rows of an attempt still going"
        assert not storage.exists(storage.join(dead, "part-0.parquet"), opts)
        assert not storage.exists(storage.join(finishing, "part-0.parquet"), opts)
    assert storage.list_names(publish.staging_dir(out, "r1"), opts) == []


def test_an_attempt_says_it_is_alive_while_it_runs(tmp_path):
    import time

    opts = storage.StorageOptions()
    with lock.attempt(str(tmp_path), "r1", opts, heartbeat_s=0.05):
        alive = [n for n in storage.list_names(publish.staging_dir(str(tmp_path), "r1"), opts) if n.startswith("_alive")]
        first = storage.read_bytes(storage.join(publish.staging_dir(str(tmp_path), "r1"), alive[0]), opts)
        time.sleep(0.3)
        assert storage.read_bytes(storage.join(publish.staging_dir(str(tmp_path), "r1"), alive[0]), opts) != first
        assert lock.sweep_attempts(str(tmp_path), "r1", opts) == []  # fresh: never taken for dead


def _spin(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_a_run_without_progress_stops_and_gives_its_lease_back_at_once(output):
    import time

    out, opts = output
    watch = lock.Watch(lambda: "stuck", stall_s=0.5)
    start = time.monotonic()
    with pytest.raises(lock.RunStalled, match="no progress for 0.5 s"):
        with lock.lease(out, "night-1", opts, heartbeat_s=0.05, watch=watch):
            _spin(30)
    assert time.monotonic() - start < 10  # stopped, not run out
    assert not storage.exists(storage.join(out, lock.LOCK), opts)
    with lock.lease(out, "night-2", opts):  # the next scheduled run goes at once
        pass


@pytest.mark.timeout(60)
def test_a_run_that_gets_on_is_not_stopped_and_a_scan_without_a_lease_is_watched_too(tmp_path):
    ticks = iter(range(10**6))
    with lock.lease(str(tmp_path), "night-1", storage.StorageOptions(), heartbeat_s=0.05,
                    watch=lock.Watch(lambda: next(ticks), stall_s=0.3)):
        _spin(1.0)
    with lock.watched(lock.Watch(lambda: None, stall_s=0.3), every=0.05):  # a phase not watched (publishing)
        _spin(1.0)
    with pytest.raises(lock.RunStalled):
        with lock.watched(lock.Watch(lambda: 1, stall_s=0.3), every=0.05):
            _spin(30)
