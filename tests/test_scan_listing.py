"""The scan's driver-side parts without a cluster: listing, read retries, incremental bookkeeping."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntf_ray import storage
from ntf_ray.ray_edge import scan as ray_scan
from ntf_ray.scan.index import already_scored
from ntf_ray.scan.listing import list_objects
from ntf_ray.scan.reading import _read_with_retries, read_objects
from ntf_ray.scan.spec import ScanSpec, check_run_id
from ntf_ray.scan.table import FILE_SCHEMA, LISTING_SCHEMA, SUCCESS, SUMMARY


def _spec(**kw) -> ScanSpec:
    return ScanSpec(model="-", output="-", **kw)


def test_local_listing_recurses_filters_and_limits(tmp_path):
    for rel in ("a/1.JPG", "a/b/2.jpg", "c/3.png", ".hidden.jpg", "4.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 3)
    table = list_objects(_spec(input=str(tmp_path)), storage.StorageOptions())
    assert table.schema.equals(LISTING_SCHEMA)
    assert sorted(u[len(str(tmp_path)) + 1:] for u in table.column("uri").to_pylist()) == [
        "4.jpg", "a/1.JPG", "a/b/2.jpg", "c/3.png"]
    assert set(table.column("size_bytes").to_pylist()) == {3}
    jpgs = list_objects(_spec(input=str(tmp_path), pattern="*.jpg"), storage.StorageOptions())
    assert jpgs.num_rows == 3  # case-insensitive
    assert list_objects(_spec(input=str(tmp_path), limit=2), storage.StorageOptions()).num_rows == 2


def test_local_etag_changes_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"one")
    before = list_objects(_spec(input=str(tmp_path)), storage.StorageOptions()).column("etag")[0]
    f.write_bytes(b"three")
    after = list_objects(_spec(input=str(tmp_path)), storage.StorageOptions()).column("etag")[0]
    assert before != after


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_objects(_spec(input=str(tmp_path / "nope")), storage.StorageOptions())
    with pytest.raises(ValueError, match="exactly one"):
        list_objects(_spec(), storage.StorageOptions())


def test_transient_read_errors_are_retried_and_missing_objects_are_not(monkeypatch):
    calls: list[list[str]] = []
    flaky = {"s3://b/flaky": 2}

    def fake_read_many(uris, options=None, **kwargs):
        calls.append(list(uris))
        out = []
        for u in uris:
            if u == "s3://b/gone":
                out.append(FileNotFoundError(u))
            elif flaky.get(u, 0) > 0:
                flaky[u] -= 1
                out.append(ConnectionError("connection reset"))
            else:
                out.append(b"ok")
        return out

    monkeypatch.setattr(ray_scan.storage, "read_many", fake_read_many)
    monkeypatch.setattr(ray_scan.time, "sleep", lambda s: None)
    got = _read_with_retries(["s3://b/ok", "s3://b/flaky", "s3://b/gone"], storage.StorageOptions())
    assert got[0] == b"ok" and got[1] == b"ok" and isinstance(got[2], FileNotFoundError)
    assert calls[1:] == [["s3://b/flaky"], ["s3://b/flaky"]]  # the missing one is not read again
    batch = read_objects(pa.table({"uri": ["s3://b/gone"]}), endpoint=None)
    assert batch.column("read_error")[0].as_py().startswith("read: not found")


def _run(root, run_id, rows, *, model_id="m1", complete=True):
    d = root / "dt=2026-01-01" / f"run_id={run_id}"
    d.mkdir(parents=True)
    table = pa.table({f.name: pa.nulls(len(rows), f.type) for f in FILE_SCHEMA})
    for name, values in (("uri", [u for u, _ in rows]), ("etag", [e for _, e in rows]),
                         ("model_id", [model_id] * len(rows))):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    pq.write_table(table, d / "part-0.parquet")
    if complete:
        (d / SUMMARY).write_text(json.dumps({"rows": len(rows)}))
        (d / SUCCESS).write_bytes(b"")


def test_already_scored_counts_only_completed_runs_of_the_same_model(tmp_path):
    _run(tmp_path, "r1", [("u1", "e1"), ("u2", "e2")])
    _run(tmp_path, "r2", [("u3", "e3")], complete=False)  # crashed: ignored
    _run(tmp_path, "r3", [("u4", "e4")], model_id="other")  # another model: ignored
    _run(tmp_path, "r4", [("u1", "e1")])  # the same pair twice: counted once
    seen, runs = already_scored(str(tmp_path), "m1", storage.StorageOptions())
    assert sorted(zip(seen.column("uri").to_pylist(), seen.column("etag").to_pylist())) == [("u1", "e1"), ("u2", "e2")]
    assert runs == ["r1", "r3", "r4"]
    assert already_scored(str(tmp_path / "empty"), "m1", storage.StorageOptions())[0].num_rows == 0


def test_manifest_listing_keeps_a_row_for_a_missing_file(tmp_path):
    from ntf_ray.training.datasets import manifest_table, write_manifest

    (tmp_path / "a.png").write_bytes(b"xy")
    write_manifest(manifest_table([
        {"uri": str(tmp_path / "a.png"), "label": 0, "generator": "real", "split": "test"},
        {"uri": str(tmp_path / "gone.png"), "label": 1, "generator": "g", "split": "test"},
    ]), str(tmp_path / "m.parquet"))
    rows = list_objects(_spec(manifest=str(tmp_path / "m.parquet")), storage.StorageOptions()).to_pylist()
    assert [r["uri"] for r in rows] == [str(tmp_path / "a.png"), str(tmp_path / "gone.png")]
    assert rows[0]["size_bytes"] == 2 and rows[0]["etag"]
    assert rows[1]["etag"] is None and rows[1]["size_bytes"] is None  # its read fails later: an error row


def test_local_listing_gives_one_honest_row_per_file_and_reads_nothing_outside(tmp_path, monkeypatch):
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.jpg").write_bytes(b"x")  # hidden folder: not scanned
    (root / "locked").mkdir()
    (root / "locked" / "a.jpg").write_bytes(b"x")
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "ok.jpg").write_bytes(b"x")
    (root / "new\nline.jpg").write_bytes(b"x")
    (root / "sub" / "in.jpg").symlink_to(root / "ok.jpg")
    (root / "out.jpg").symlink_to(outside / "secret.jpg")
    os.mkfifo(root / "pipe.jpg")  # reading a FIFO would block the scan
    bad = os.fsencode(str(root)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write(b"x")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rows = {r["uri"][len(str(root)) + 1:]: r for r in
            list_objects(_spec(input=str(root)), storage.StorageOptions()).to_pylist()}
    assert set(rows) == {"ok.jpg", "new\nline.jpg", "sub/in.jpg", "out.jpg", "caf\\xe9.jpg", "locked/"}
    assert rows["ok.jpg"]["listing_error"] is None and rows["sub/in.jpg"]["listing_error"] is None
    assert rows["out.jpg"]["listing_error"].startswith("unsupported_name: a symbolic link that leads outside")
    assert rows["caf\\xe9.jpg"]["listing_error"] == "unsupported_name: the file name is not valid UTF-8"
    assert rows["locked/"]["listing_error"].startswith("read: cannot list this folder (PermissionError)")
    # the listing's reasons become the rows' errors, and those objects are never read
    read = read_objects(pa.Table.from_pylist(list(rows.values()), schema=LISTING_SCHEMA), endpoint=None)
    errors = dict(zip(read.column("uri").to_pylist(), read.column("read_error").to_pylist()))
    assert errors[str(root / "out.jpg")].startswith("unsupported_name:") and errors[str(root / "ok.jpg")] is None


def test_s3_listing_decodes_keys_with_control_characters(s3):
    name = s3.create_bucket()
    keys = ["k/tab\tname.jpg", "k/bell\x07.jpg", "k/plus+space .jpg", "k/pct%20.jpg"]
    for key in keys:
        s3.client().put_object(Bucket=name, Key=key, Body=b"x")
    listing = list_objects(_spec(input=f"s3://{name}/k"), storage.StorageOptions(endpoint_url=s3.endpoint_url))
    assert sorted(listing.column("uri").to_pylist()) == sorted(f"s3://{name}/{k}" for k in keys)


def test_a_manifest_naming_an_object_twice_lists_it_once_and_labels_do_not_matter(tmp_path):
    (tmp_path / "a.png").write_bytes(b"xy")
    (tmp_path / "m.csv").write_text(f"uri,label\n{tmp_path / 'a.png'},2\n{tmp_path / 'a.png'},0\n{tmp_path / 'b.png'},\n")
    rows = list_objects(_spec(manifest=str(tmp_path / "m.csv")), storage.StorageOptions())
    assert rows.column("uri").to_pylist() == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


@pytest.mark.parametrize("run_id", ["../x", "a/../../b", "a/b", "..", "", "x=y", "a b", "-x", "é"])
def test_a_run_id_that_is_not_a_plain_name_is_refused(run_id):
    with pytest.raises(ValueError, match="run id"):
        check_run_id(run_id)
    assert check_run_id("night-2026.11.26_a") == "night-2026.11.26_a"


def test_listing_refusals_keep_their_etag_so_moderate_does_not_write_them_again(tmp_path):
    (tmp_path / "out.jpg").symlink_to("/etc/hostname")
    etags = [list_objects(_spec(input=str(tmp_path)), storage.StorageOptions()).column("etag")[0].as_py()
             for _ in range(2)]
    assert etags[0] is not None and etags[0] == etags[1]


def test_an_s3_key_ending_in_a_slash_that_holds_bytes_is_an_object(s3):
    name = s3.create_bucket()
    s3.client().put_object(Bucket=name, Key="up/folder/", Body=b"")  # a folder marker
    s3.client().put_object(Bucket=name, Key="up/x.jpg/", Body=b"an upload")
    listing = list_objects(_spec(input=f"s3://{name}/up", pattern="*.jpg"),
                                    storage.StorageOptions(endpoint_url=s3.endpoint_url))
    assert listing.column("uri").to_pylist() == [f"s3://{name}/up/x.jpg/"]


@pytest.mark.timeout(60)
def test_a_file_swapped_for_a_fifo_after_listing_does_not_block_its_read(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"x")
    listing = list_objects(_spec(input=str(tmp_path)), storage.StorageOptions())
    f.unlink()
    os.mkfifo(f)  # nobody writes: a blocking open would wait forever
    error = read_objects(listing, endpoint=None).column("read_error")[0].as_py()
    assert error.startswith("read: ")


@pytest.mark.parametrize("sizes,max_rows,max_bytes,expected", [
    ([10] * 7, 3, 1000, [(0, 3), (3, 6), (6, 7)]),  # rows decide
    ([10] * 7, 100, 25, [(0, 2), (2, 4), (4, 6), (6, 7)]),  # bytes decide
    ([5, 500, 5, 5], 100, 20, [(0, 1), (1, 2), (2, 4)]),  # an object over the cap goes alone
    ([0, 0, 0], 2, 1, [(0, 2), (2, 3)]),  # unknown sizes (0): rows alone
    ([], 4, 10, []),
])
def test_read_blocks_are_cut_by_rows_and_by_listed_bytes(sizes, max_rows, max_bytes, expected):
    import numpy as np

    from ntf_ray.ray_edge.scan import block_bounds

    assert block_bounds(np.array(sizes, np.int64), len(sizes), max_rows, max_bytes) == expected
    assert block_bounds(None, len(sizes), max_rows, max_bytes) == [
        (s, min(s + max_rows, len(sizes))) for s in range(0, len(sizes), max_rows)]
