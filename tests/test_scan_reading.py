"""The scan's read stage against moto's S3 server and local files: each row reads exactly its
own object, the listed version of it, and never more than the size cap."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.scan.listing import list_objects
from ntf_ray.scan.reading import read_objects
from ntf_ray.scan.spec import ScanSpec

#: Keys that fsspec would expand as patterns, and others that are only awkward.
AWKWARD_KEYS = ["up/*", "up/photo[1].png", "up/x?y.png", "up/{a,b}.png", "up/sp ace+plus%25.png", "up/naïve.png",
                "up/tab\tkey.png", "up/" + "n" * 1017 + ".png", "up/a.png", "up/b.png",
                "up/photo1.png"]  # what the pattern photo[1].png would match
# (moto's server refuses a newline in a key; local files cover that name, see test_scan_listing)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _listing(spec: ScanSpec, options: storage.StorageOptions) -> pa.Table:
    return list_objects(spec, options)


@pytest.fixture
def awkward_bucket(s3):
    name = s3.create_bucket()
    client = s3.client()
    for i, key in enumerate(AWKWARD_KEYS):
        client.put_object(Bucket=name, Key=key, Body=_png(i))
    return name


def test_every_key_reads_its_own_bytes_and_none_is_a_pattern(s3, awkward_bucket, caplog):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    listing = _listing(ScanSpec(model="-", output="-", input=f"s3://{awkward_bucket}/up"), options)
    assert sorted(listing.column("uri").to_pylist()) == sorted(f"s3://{awkward_bucket}/{k}" for k in AWKWARD_KEYS)
    read = read_objects(listing, endpoint=s3.endpoint_url).to_pylist()
    assert [r["read_error"] for r in read] == [None] * len(AWKWARD_KEYS)
    by_key = {r["uri"].split("/", 3)[3]: r["data"] for r in read}
    assert by_key == {k: _png(i) for i, k in enumerate(AWKWARD_KEYS)}
    # a block holding only a pattern-like key reads that one object, with one request
    only = listing.filter(pa.compute.is_in(listing["uri"], pa.array([f"s3://{awkward_bucket}/up/*"])))
    caplog.clear()
    with caplog.at_level("INFO", logger="werkzeug"):
        assert read_objects(only, endpoint=s3.endpoint_url).column("data").to_pylist() == [_png(0)]
    requests = [r.getMessage() for r in caplog.records if r.name == "werkzeug" and awkward_bucket in r.getMessage()]
    assert len(requests) == 1 and "GET /" in requests[0], requests


def test_an_object_replaced_after_listing_is_not_scored_under_the_old_etag(s3, awkward_bucket):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    listing = _listing(ScanSpec(model="-", output="-", input=f"s3://{awkward_bucket}/up", pattern="a.png"), options)
    s3.client().put_object(Bucket=awkward_bucket, Key="up/a.png", Body=_png(99))
    row = read_objects(listing, endpoint=s3.endpoint_url).to_pylist()[0]
    assert row["data"] is None and row["read_error"] == "read: changed after listing"


def test_objects_over_the_cap_are_not_read(s3, monkeypatch):
    name = s3.create_bucket()
    s3.client().put_object(Bucket=name, Key="big.jpg", Body=b"x" * 5000)
    s3.client().put_object(Bucket=name, Key="empty.jpg", Body=b"")
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    listing = _listing(ScanSpec(model="-", output="-", input=f"s3://{name}"), options)
    reads: list[str] = []
    real = storage.read_many
    monkeypatch.setattr(storage, "read_many", lambda uris, *a, **k: reads.extend(uris) or real(uris, *a, **k))
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_objects(listing, endpoint=s3.endpoint_url, max_bytes=4096).to_pylist()}
    assert rows["big.jpg"]["read_error"] == "too_large: 5000 bytes > limit 4096" and rows["big.jpg"]["data"] is None
    assert rows["empty.jpg"]["data"] == b"" and rows["empty.jpg"]["read_error"] is None
    assert reads == []  # neither needed a read
    # a size the listing did not know (a manifest's failed stat) is capped while reading
    unknown = pa.table({"uri": [f"s3://{name}/big.jpg"], "etag": [None], "size_bytes": pa.array([None], pa.int64())})
    row = read_objects(unknown, endpoint=s3.endpoint_url, max_bytes=4096).to_pylist()[0]
    assert row["read_error"] == "too_large: more than 4096 bytes"


def test_a_local_file_rewritten_with_the_same_size_and_mtime_reads_as_changed(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(b"A" * 100)
    listing = _listing(ScanSpec(model="-", output="-", input=str(tmp_path)), storage.StorageOptions())
    st = f.stat()
    time.sleep(0.05)  # file times tick at the kernel's clock (a few ms): a later rewrite, as in life
    f.write_bytes(b"B" * 100)  # same length, then the old times put back (cp -p, rsync -t)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    row = read_objects(listing, endpoint=None).to_pylist()[0]
    assert row["read_error"] == "read: changed after listing"
    again = _listing(ScanSpec(model="-", output="-", input=str(tmp_path)), storage.StorageOptions())
    assert again.column("etag")[0] != listing.column("etag")[0]  # and the next moderate sees it as new


def test_a_large_local_file_is_refused_from_its_listed_size(tmp_path):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB, sparse: no disk used
    listing = _listing(ScanSpec(model="-", output="-", input=str(tmp_path)), storage.StorageOptions())
    row = read_objects(listing, endpoint=None).to_pylist()[0]
    assert row["data"] is None and row["read_error"] == f"too_large: {3 * 2**30} bytes > limit {128 * 2**20}"


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_binary_views_are_the_values_without_copying_them(kind):
    from ntf_ray.ray_edge.scan.actor import binary_views

    values = [b"abc", None, b"", b"\xff\xd8" * 1000, None, b"z"]
    whole = pa.array(values, kind)
    column = pa.chunked_array([whole.slice(0, 2), whole.slice(2, 3), whole.slice(5)])  # chunks with offsets
    views = binary_views(column)
    assert [None if v is None else bytes(v) for v in views] == values
    data = whole.buffers()[2]
    big = views[3]  # a view into Arrow's own buffer, not a copy
    assert np.frombuffer(big, np.uint8).ctypes.data == data.address + 3
    with pytest.raises(TypeError, match="binary"):
        binary_views(pa.array(["text"]))


def test_an_odd_uri_costs_its_own_row_never_its_block(s3, tmp_path):
    """A manifest or inventory row with an empty or odd bucket, an unknown scheme or no uri at
    all is that object's ``unsupported_name:`` row; its neighbours in the block are read."""
    bucket = s3.create_bucket()
    s3.client().put_object(Bucket=bucket, Key="up/a.png", Body=_png(1))
    (tmp_path / "b.png").write_bytes(_png(2))
    uris = ["s3:///k.png", f"s3://{bucket}/up/a.png", "s3://bad bucket/k.png", "gs://elsewhere/k.png",
            str(tmp_path / "b.png"), "s3://buck\x00et/k.png", None, str(tmp_path / "nul\x00.png"),
            f"s3://{bucket}", f"s3://{bucket}/"]
    batch = pa.table({"uri": pa.array(uris, pa.string())})
    out = read_objects(batch, endpoint=s3.endpoint_url).to_pylist()
    by_uri = {r["uri"]: r for r in out}
    assert len(out) == len(uris)
    assert by_uri[f"s3://{bucket}/up/a.png"]["data"] == _png(1) and by_uri[f"s3://{bucket}/up/a.png"]["read_error"] is None
    assert by_uri[str(tmp_path / "b.png")]["data"] == _png(2)
    for odd in ("s3:///k.png", "s3://bad bucket/k.png", "gs://elsewhere/k.png", "s3://buck\x00et/k.png", None,
                str(tmp_path / "nul\x00.png"), f"s3://{bucket}", f"s3://{bucket}/"):
        assert by_uri[odd]["data"] is None
        assert by_uri[odd]["read_error"].startswith("unsupported_name: "), (odd, by_uri[odd]["read_error"])
