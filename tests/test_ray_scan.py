"""The Ray Data scan: one row per object, the documented schema, error rows, incremental runs, the demo.

Local Ray; every S3 path goes through moto's server. The detector is the tiny backbone at
random initialisation: these tests are about rows, not accuracy.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.scan.table import SCORE_SCHEMA, SUMMARY, completed_runs
from ntf_ray.synth import make_synthetic
from tests.awkward import make_awkward_files
from tests.conftest import FAKE_SECRET_ACCESS_KEY, save_random_detector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def scan_bucket(s3, tmp_path_factory):
    """A bucket with 200 synthetic PNGs and the awkward files (good and broken)."""
    name = s3.create_bucket()
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    local = tmp_path_factory.mktemp("scan-objects")
    make_synthetic(local / "synth", n_real=100, n_fake=100, size=40, seed=5)
    expected = make_awkward_files(local / "awkward")
    storage.s3.fsspec_filesystem(options).put(str(local) + "/", f"{name}/images/", recursive=True)
    keys = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    model = save_random_detector(f"s3://{name}/models/random", s3.endpoint_url)
    return {"bucket": f"s3://{name}", "prefix": f"s3://{name}/images", "keys": keys, "model": model,
            "awkward": expected, "local": local}


def _table(root: str, s3) -> pa.Table:
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    fs, path = storage.arrow_filesystem(root, options)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def _completed(root: str, s3) -> list[str]:
    return completed_runs(root, storage.StorageOptions(endpoint_url=s3.endpoint_url))


def test_scan_writes_one_row_per_object_with_the_documented_schema(local_ray, s3, scan_bucket, capsys):
    b = scan_bucket
    out = f"{b['bucket']}/scores"
    assert main(["scan", "--input", b["prefix"], "--model", b["model"], "--output", out, "--run-id", "audit-1",
                 "--s3-endpoint", s3.endpoint_url, "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "run audit-1" in printed and f"{len(b['keys'])} listed" in printed and "table: " in printed

    table = _table(out, s3)
    # The contract's columns and types; `run_id` (and `dt`) come from the hive partition folders.
    assert table.select(SCORE_SCHEMA.names).schema.equals(SCORE_SCHEMA)
    assert set(table.schema.names) == {*SCORE_SCHEMA.names, "dt"}
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == sorted(f"{b['prefix']}/{k}" for k in b["keys"])  # exactly one row per object
    assert set(table.column("run_id").to_pylist()) == {"audit-1"}

    rows = {r["uri"].rsplit("/images/", 1)[1]: r for r in table.to_pylist()}
    for name, good in b["awkward"].items():
        r = rows[f"awkward/{name}"]
        if good:
            assert r["error"] is None and 0.0 <= r["score"] <= 1.0 and r["is_fake"] == (r["score"] >= r["threshold"]), r
        else:
            assert r["error"] and r["score"] is None and r["is_fake"] is None, r
    assert {r["decoder"] for r in rows.values()} == {"pil"}  # CPU actors: the core decoder for every object
    synth = [r for k, r in rows.items() if k.startswith("synth/")]
    assert len(synth) == 200 and all(r["error"] is None and 0.0 <= r["score"] <= 1.0 for r in synth)
    for key, r in rows.items():  # the listing's facts about each object
        assert r["etag"] and r["last_modified"] is not None, r
        assert r["size_bytes"] == (b["local"] / key).stat().st_size, r

    # `ntf-ray score` gives the same numbers for the same objects.
    sample = [f"{b['prefix']}/{k}" for k in b["keys"][::9]]
    assert main(["score", "--model", b["model"], "--s3-endpoint", s3.endpoint_url, *sample]) == 0
    by_uri = {r["uri"]: r for r in table.to_pylist()}
    for line in capsys.readouterr().out.splitlines():
        one = json.loads(line)
        row = by_uri[one["uri"]]
        if one["error"] is None:
            assert one["score"] == pytest.approx(row["score"], abs=1e-5) and one["is_fake"] == row["is_fake"]
        else:
            assert row["error"] == one["error"]

    # summary.json and _SUCCESS mark the run complete; nothing secret in them.
    run_dir = _completed(out, s3)[0]
    summary_text = storage.read_bytes(storage.join(run_dir, SUMMARY),
                                      storage.StorageOptions(endpoint_url=s3.endpoint_url)).decode()
    summary = json.loads(summary_text)
    broken = sum(not g for g in b["awkward"].values())
    assert summary["listed"] == len(b["keys"]) and summary["errors"] == broken
    assert summary["scored"] == len(b["keys"]) - broken and sum(summary["score_histogram"]["counts"]) == summary["scored"]
    assert FAKE_SECRET_ACCESS_KEY not in summary_text and s3.endpoint_url not in summary_text

    # pandas reads the same table as is.
    import pandas as pd

    frame = pd.read_parquet(out[len("s3://"):], filesystem=storage.arrow_filesystem(out, storage.StorageOptions(
        endpoint_url=s3.endpoint_url))[0])
    assert len(frame) == len(b["keys"]) and set(frame.columns) == {*SCORE_SCHEMA.names, "dt"}
    assert set(frame["run_id"]) == {"audit-1"}


def test_the_gpu_decode_path_writes_the_cpu_paths_rows_for_the_awkward_files(local_ray, s3, scan_bucket):
    """--decoder nvjpeg on CPU actors (torchvision's CPU JPEG decoder standing in for nvJPEG):
    the screen, the routing and the fallback leave every row as the core decoder writes it."""
    b = scan_bucket
    tables = {}
    for decoder in ("pil", "nvjpeg"):
        out = f"{b['bucket']}/decoder-{decoder}"
        assert main(["scan", "--input", f"{b['prefix']}/awkward", "--model", b["model"], "--output", out,
                     "--decoder", decoder, "--s3-endpoint", s3.endpoint_url]) == 0
        tables[decoder] = {r["uri"]: r for r in _table(out, s3).to_pylist()}
    assert tables["pil"].keys() == tables["nvjpeg"].keys() and len(tables["pil"]) == len(b["awkward"])
    columns = ("score", "is_fake", "width", "height", "format", "error", "etag", "size_bytes")
    for uri, cpu in tables["pil"].items():
        assert {c: cpu[c] for c in columns} == {c: tables["nvjpeg"][uri][c] for c in columns}, uri
    on_gpu = sorted(uri.rsplit("/", 1)[1] for uri, r in tables["nvjpeg"].items() if r["decoder"] == "nvjpeg")
    assert on_gpu == ["baseline.jpg", "gray.jpg", "progressive.jpg"]


def test_rerunning_a_run_id_leaves_no_duplicates(local_ray, s3, scan_bucket):
    b = scan_bucket
    out = f"{b['bucket']}/rerun"
    for _ in range(2):
        assert main(["scan", "--input", f"{b['prefix']}/awkward", "--model", b["model"], "--output", out,
                     "--run-id", "same", "--s3-endpoint", s3.endpoint_url]) == 0
    table = _table(out, s3)
    assert table.num_rows == len(b["awkward"]) == len(set(table.column("uri").to_pylist()))


def test_moderate_scores_only_new_and_changed_objects(local_ray, s3, tmp_path):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    fs = storage.s3.fsspec_filesystem(options)
    name = s3.create_bucket()
    records = make_synthetic(tmp_path / "a", n_real=15, n_fake=15, size=32, seed=1, splits={"test": 1.0})
    fs.put(str(tmp_path / "a") + "/", f"{name}/in/", recursive=True)
    model = save_random_detector(f"s3://{name}/model", s3.endpoint_url)
    out, prefix = f"s3://{name}/mod", f"s3://{name}/in"
    args = ["moderate", "--input", prefix, "--model", model, "--output", out, "--s3-endpoint", s3.endpoint_url]

    assert main([*args, "--run-id", "night-1"]) == 0
    first = json.loads(storage.read_bytes(storage.join(_completed(out, s3)[0], SUMMARY), options))
    assert first["scored"] == 30 and first["skipped"] == 0

    # An unfinished run (no _SUCCESS) that claims every object is ignored.
    stale_dir = f"{out}/dt=2000-01-01/run_id=crashed"
    stale = _table(out, s3).drop_columns(["dt", "run_id"])
    fs.pipe_file(f"{stale_dir[len('s3://'):]}/part.parquet", _parquet_bytes(stale.set_column(
        stale.schema.get_field_index("etag"), "etag", pa.array(["x"] * stale.num_rows))))

    # 10 new objects and 1 overwritten with different bytes.
    extra = make_synthetic(tmp_path / "b", n_real=5, n_fake=5, size=32, seed=2, splits={"test": 1.0})
    for r in extra:
        fs.put_file(r["uri"], f"{name}/in/new/{Path(r['uri']).name}")
    changed = Path(records[0]["uri"]).relative_to(tmp_path / "a").as_posix()
    fs.pipe_file(f"{name}/in/{changed}", Path(extra[0]["uri"]).read_bytes())

    assert main([*args, "--run-id", "night-2"]) == 0
    runs = {d.rsplit("run_id=", 1)[1]: d for d in _completed(out, s3)}
    assert set(runs) == {"night-1", "night-2"}
    second = json.loads(storage.read_bytes(storage.join(runs["night-2"], SUMMARY), options))
    assert second["listed"] == 40 and second["rows"] == 11 and second["skipped"] == 29
    night2 = _table(out, s3).filter(pa.compute.equal(pa.compute.field("run_id"), "night-2"))
    assert f"{prefix}/{changed}" in night2.column("uri").to_pylist()

    assert main([*args, "--run-id", "night-3"]) == 0  # nothing new: an empty, complete run
    runs = {d.rsplit("run_id=", 1)[1]: d for d in _completed(out, s3)}
    third = json.loads(storage.read_bytes(storage.join(runs["night-3"], SUMMARY), options))
    assert third["rows"] == 0 and third["skipped"] == 40


def _summary_of(out: str, run_id: str, s3) -> dict:
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    runs = {d.rsplit("run_id=", 1)[1]: d for d in _completed(out, s3)}
    return json.loads(storage.read_bytes(storage.join(runs[run_id], SUMMARY), options))


def test_a_run_id_reused_by_another_model_leaves_no_stale_skips(local_ray, s3, tmp_path, caplog):
    """moderate A as r1, then B as r1 (replacing A's rows), then A again: A has no row left, so
    it scores everything; the same with scan replacing a run (no index removal to rely on)."""
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    name = s3.create_bucket()
    make_synthetic(tmp_path / "a", n_real=3, n_fake=3, size=32, seed=3, splits={"test": 1.0})
    storage.s3.fsspec_filesystem(options).put(str(tmp_path / "a") + "/", f"{name}/in/", recursive=True)
    model_a = save_random_detector(f"s3://{name}/model-a", s3.endpoint_url)
    model_b = save_random_detector(f"s3://{name}/model-b", s3.endpoint_url, seed=1)
    out = f"s3://{name}/mod"

    def run(command: str, model: str, run_id: str) -> dict:
        assert main([command, "--input", f"s3://{name}/in", "--model", model, "--output", out, "--run-id", run_id,
                     "--s3-endpoint", s3.endpoint_url]) == 0
        return _summary_of(out, run_id, s3)

    assert run("moderate", model_a, "r1")["scored"] == 6
    assert run("moderate", model_b, "r1")["scored"] == 6  # r1 now holds model B's rows only
    again = run("moderate", model_a, "r2")
    assert (again["scored"], again["skipped"]) == (6, 0)
    assert run("moderate", model_a, "r3")["skipped"] == 6  # r2's rows are model A's: skipped, as they should be
    assert run("scan", model_b, "r2")["scored"] == 6  # scan replaces A's r2 (and removes no index)
    assert _summary_of(out, "r2", s3)["model_id"] != again["model_id"]
    # r3 holds no row (it skipped everything): A has no row anywhere, and scores all six again
    assert (run("moderate", model_a, "r4")["scored"], _summary_of(out, "r4", s3)["skipped"]) == (6, 0)


def test_an_object_rewritten_under_the_same_etag_is_scored_again(local_ray, s3, tmp_path):
    """S3's ETag of a one-part upload is an MD5: bytes with a colliding MD5 keep it. The listing's
    last-modified time still changes, and the skip key holds it (here: the same bytes written again)."""
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    fs = storage.s3.fsspec_filesystem(options)
    name = s3.create_bucket()
    records = make_synthetic(tmp_path / "a", n_real=2, n_fake=2, size=32, seed=4, splits={"test": 1.0})
    fs.put(str(tmp_path / "a") + "/", f"{name}/in/", recursive=True)
    model = save_random_detector(f"s3://{name}/model", s3.endpoint_url)
    out = f"s3://{name}/mod"
    args = ["moderate", "--input", f"s3://{name}/in", "--model", model, "--output", out, "--s3-endpoint",
            s3.endpoint_url]
    assert main([*args, "--run-id", "n1"]) == 0
    key = Path(records[0]["uri"]).relative_to(tmp_path / "a").as_posix()
    before = fs.info(f"{name}/in/{key}")
    import time

    time.sleep(1.1)  # S3's last-modified has whole seconds
    fs.pipe_file(f"{name}/in/{key}", Path(records[0]["uri"]).read_bytes())
    fs.invalidate_cache()
    after = fs.info(f"{name}/in/{key}")
    assert after["ETag"] == before["ETag"] and after["LastModified"] != before["LastModified"]
    assert main([*args, "--run-id", "n2"]) == 0
    second = _summary_of(out, "n2", s3)
    assert (second["scored"], second["skipped"]) == (1, 3)


def test_a_gpu_request_no_node_can_meet_is_refused_at_once_and_holds_no_lock(local_ray, s3, tmp_path, capsys):
    import time

    make_synthetic(tmp_path / "a", n_real=2, n_fake=2, size=32, seed=4, splits={"test": 1.0})
    model = save_random_detector(str(tmp_path / "model"))
    out = tmp_path / "out"
    start = time.monotonic()
    code = main(["moderate", "--input", str(tmp_path / "a"), "--model", model, "--output", str(out),
                 "--gpus-per-actor", "1"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    print(f"refused in {took:.1f} s: {err.strip()}")
    assert code == 2 and "no node of this Ray cluster has 1 GPU(s)" in err and "Traceback" not in err
    assert took < 60 and not (out / "_lock.json").exists()
    assert completed_runs(str(out), storage.StorageOptions()) == []


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _completed_local(root: Path) -> list[str]:
    return completed_runs(str(root), storage.StorageOptions())


def test_the_stream_caps_its_read_ahead_and_sizes_its_actors_without_touching_the_session(local_ray, monkeypatch):
    """The read-ahead cap is the scan's own (other datasets of the session keep theirs); CPU
    actors score one batch at a time whatever --streams says; GPU actors score --streams
    batches at once in threads, four to a GPU, with the larger GPU batch."""
    import pyarrow as pa
    import ray

    from ntf_ray.ray_edge.scan import actor as actor_module
    from ntf_ray.ray_edge.scan.actor import CPU_BATCH, GPU_BATCH, DetectorActor, scored_stream
    from ntf_ray.scan.spec import ActorPool

    before = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    rows = pa.table({"uri": ["a", "b", "c", "d", "e"]})
    kwargs = {"model": "-", "endpoint": None, "threshold": None, "batch_size": None, "decoder": "auto"}

    def stream(gpus_per_actor, **kw):
        pool = ActorPool(read_block_rows=1, cpus_per_actor=0.5, gpus_per_actor=gpus_per_actor)
        ds = scored_stream(rows, DetectorActor, kwargs, pool=pool, endpoint=None, **kw)
        return ds, ds._logical_plan.dag  # the detector map, not run

    ds, op = stream(gpus_per_actor=0, streams=3, read_ahead_bytes=123 * 2**20)
    assert ds.context.execution_options.resource_limits.object_store_memory == 123 * 2**20
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == before
    assert op.compute.max_concurrent_calls_per_actor == 1 and not op.compute.enable_true_multi_threading
    assert op.batch_size == CPU_BATCH and op.fn_constructor_kwargs["batch_size"] == CPU_BATCH

    monkeypatch.setattr(actor_module, "_gpus_in_cluster", lambda: 1.0)
    monkeypatch.setattr(actor_module, "_most_gpus_on_a_node", lambda: 1.0)
    _, op = stream(gpus_per_actor=None, streams=3, actors_per_gpu=4)
    assert (op.compute.max_concurrent_calls_per_actor, op.compute.enable_true_multi_threading) == (3, True)
    assert op.compute.max_size == 4 and op.ray_remote_args["num_gpus"] == 0.25
    assert op.batch_size == GPU_BATCH and op.fn_constructor_kwargs == {**kwargs, "batch_size": GPU_BATCH,
                                                                        "device": "cuda"}
    with pytest.raises(ValueError, match="streams"):
        stream(gpus_per_actor=0, streams=0)


def _slow_square(x: int) -> int:
    import random
    import time

    time.sleep(random.random() * 0.05)
    if x == 13:
        raise ValueError("thirteen")
    return x * x


def test_ray_map_keeps_order_bounds_what_runs_and_raises_the_tasks_own_error(local_ray):
    """How the scan reads an inventory's data files: Ray tasks, results in order, a few at a time."""
    from ntf_ray.ray_edge.scan import ray_map

    taken = []

    def items():
        for x in range(12):
            taken.append(x)
            yield x

    results = ray_map(_slow_square, items(), in_flight=3)
    assert next(results) == 0 and len(taken) <= 4  # three started, one more as the first was taken
    assert list(results) == [x * x for x in range(1, 12)]
    with pytest.raises(ValueError, match="thirteen"):
        list(ray_map(_slow_square, range(20), in_flight=4))


def test_the_listing_runs_no_more_tasks_at_once_than_the_machine_has_cores(local_ray, monkeypatch):
    """A local Ray counts more CPUs than cores (``init_local_ray``): the listing's tasks are
    as many as the cores, not the CPUs; on a cluster, its CPUs (4 here)."""
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge.scan import ray_map

    for cores, want in [(2, 2), (None, 4)]:
        monkeypatch.setattr(runtime, "_local_cores", cores)
        taken = []

        def items():
            for x in range(10):
                taken.append(x)
                yield x

        results = ray_map(_slow_square, items())
        assert next(results) == 0 and len(taken) == want + 1, (cores, taken)  # one more as the first was taken
        assert list(results) == [x * x for x in range(1, 10)]


def test_the_rows_are_published_by_a_ray_task_not_the_driver(local_ray, s3, scan_bucket, monkeypatch):
    from ntf_ray.scan import publish

    def in_the_driver(*args, **kwargs):
        raise AssertionError("the driver wrote the run's rows")

    monkeypatch.setattr(publish, "write_whole", in_the_driver)  # this process only: Ray's workers are others
    b = scan_bucket
    out = f"{b['bucket']}/scores-published-in-a-task"
    assert main(["scan", "--input", f"{b['prefix']}/synth", "--model", b["model"], "--output", out,
                 "--run-id", "in-a-task", "--s3-endpoint", s3.endpoint_url]) == 0
    table = _table(out, s3)
    assert table.num_rows == 200 and table.column("uri").unique().to_pylist() == table.column("uri").to_pylist()


def test_a_scan_whose_detectors_start_before_its_listing_gives_the_rows_of_one_that_waits(local_ray, s3, scan_bucket,
                                                                                           monkeypatch):
    """A listing still going after ``START_WAIT_S`` is scored in a live first window (its stream,
    detectors included, started before the blocks are listed), then in the usual windows."""
    from ntf_ray.ray_edge.scan import feed, isolation

    b = scan_bucket
    args = ["--input", f"{b['prefix']}/synth", "--model", b["model"], "--s3-endpoint", s3.endpoint_url,
            "--read-block-rows", "16"]  # 200 objects: 13 blocks
    monkeypatch.setattr(feed, "LIVE_BLOCKS", 0)  # no live window, whatever the listing's pace
    assert main(["scan", *args, "--output", f"{b['bucket']}/scores-waited", "--run-id", "waited"]) == 0

    opened, real_open, real_list = threading.Event(), feed.ListingFeed._open_live, feed.iter_kept

    def open_live(self):
        window = real_open(self)
        opened.set()
        return window

    def listed_after_the_window_opened(*args, **kwargs):
        assert opened.wait(60), "no live window while the listing had listed nothing"
        yield from real_list(*args, **kwargs)

    monkeypatch.setattr(feed, "LIVE_BLOCKS", 3)  # then the windows after it
    monkeypatch.setattr(feed, "START_WAIT_S", 0.2)
    monkeypatch.setattr(feed.ListingFeed, "_open_live", open_live)
    monkeypatch.setattr(feed, "iter_kept", listed_after_the_window_opened)
    rounds = []  # the rounds that score again what has no row: none, every block had its window
    monkeypatch.setattr(isolation, "regroup", lambda *a, **k: rounds.append(a) or [])
    assert main(["scan", *args, "--output", f"{b['bucket']}/scores-live", "--run-id", "live"]) == 0
    assert rounds == []

    waited, live = _table(f"{b['bucket']}/scores-waited", s3), _table(f"{b['bucket']}/scores-live", s3)
    assert live.num_rows == 200 and len(set(live.column("uri").to_pylist())) == 200
    by_uri = {r["uri"]: r for r in waited.to_pylist()}
    for row in live.to_pylist():  # the same objects, scored alike (batched otherwise: float noise only)
        other = by_uri[row["uri"]]
        assert (row["etag"], row["is_fake"], row["error"]) == (other["etag"], other["is_fake"], other["error"])
        assert row["score"] == pytest.approx(other["score"], abs=1e-5)
