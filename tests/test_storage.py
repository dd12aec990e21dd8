"""Tests for ntf_ray.storage: URIs, local and S3 (moto server) round trips, endpoints, redaction."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntf_ray import storage
from ntf_ray.storage import StorageOptions
from tests.conftest import FAKE_SECRET_ACCESS_KEY

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def opts(s3) -> StorageOptions:
    return StorageOptions(endpoint_url=s3.endpoint_url)


# --- URIs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key/x.png", "s3://bucket/key/x.png"),
        ("s3a://bucket/key", "s3://bucket/key"),
        ("s3n://bucket/key", "s3://bucket/key"),
        ("s3://bucket", "s3://bucket"),
        ("file:///tmp/a/b.png", "/tmp/a/b.png"),
        ("/tmp/a/../a/b.png", "/tmp/a/../a/b.png"),  # absolute, not resolved (symlinks stay)
    ],
)
def test_normalize(uri, expected):
    assert storage.normalize(uri) == expected


def test_normalize_relative_and_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("a/b.png") == str(tmp_path / "a" / "b.png")
    assert storage.normalize(Path("b.png")) == str(tmp_path / "b.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.normalize("~/x.png") == str(tmp_path / "home" / "x.png")


@pytest.mark.parametrize("uri", ["gs://bucket/key", "http://host/x.png", "https://host/x.png", "hdfs://nn/x"])
def test_normalize_rejects_other_schemes(uri):
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.normalize(uri)


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3a:///key"])
def test_bucketless_uris_are_errors(uri):
    with pytest.raises(ValueError, match="without a bucket"):
        storage.normalize(uri)


def test_a_uri_goes_to_the_source_of_its_scheme():
    assert storage.scheme_of("s3://b/k") == storage.scheme_of("s3://b") == storage.scheme_of("s3a://b/k") == "s3"
    assert storage.scheme_of(Path("/tmp/x")) == storage.scheme_of("rel/x.png") == "file"
    assert storage.source_for("s3n://b/k").scheme == "s3" and storage.source_for("rel/x.png").scheme == "file"
    for odd in ("/tmp/s3://x", "S3://b/k", "FILE://x", "my dir://x"):  # nothing is guessed
        with pytest.raises(ValueError, match="unsupported URI scheme .* use a local path or s3://bucket/key"):
            storage.source_for(odd)


def test_split_s3():
    assert storage.s3.split_s3("s3://bucket/a/b/c.png") == ("bucket", "a/b/c.png")
    assert storage.s3.split_s3("s3://bucket") == ("bucket", "")
    assert storage.s3.split_s3("s3://bucket/") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        storage.s3.split_s3("/local/path")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.s3.split_s3("s3:///key")


def test_join():
    assert storage.join("s3://b", "a", "x.png") == "s3://b/a/x.png"
    assert storage.join("s3://b/prefix/", "/a/", "x.png") == "s3://b/prefix/a/x.png"
    assert storage.join("/tmp/out", "a", "x.png") == "/tmp/out/a/x.png"
    assert storage.join("/tmp/out/", "x.png") == "/tmp/out/x.png"


# --- local files -------------------------------------------------------------------------


def test_local_round_trip_is_atomic(tmp_path):
    target = tmp_path / "deep" / "er" / "blob.bin"
    assert not storage.exists(str(target))
    storage.write_bytes(str(target), b"\x00\x01hello")
    assert storage.exists(str(target))
    assert storage.read_bytes(str(target)) == b"\x00\x01hello"
    storage.write_bytes(f"file://{target}", b"replaced")  # overwrite through a file:// URI
    assert storage.read_bytes(str(target)) == b"replaced"
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]  # no temporary file left


def test_local_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")

    def failing_replace(src, dst):
        raise OSError("disk trouble")

    monkeypatch.setattr(storage.local.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk trouble"):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_local_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope.png"))
    assert not storage.exists(str(tmp_path / "nope.png"))


def test_arrow_filesystem_local(tmp_path):
    fs, path = storage.arrow_filesystem(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2]


# --- S3 through moto's server ------------------------------------------------------------


def test_s3_round_trip_fsspec(bucket, opts):
    uri = storage.join(bucket, "a", "b", "blob.bin")
    assert not storage.exists(uri, opts)
    storage.write_bytes(uri, b"hello s3", opts)
    assert storage.exists(uri, opts)
    assert storage.read_bytes(uri, opts) == b"hello s3"
    assert storage.read_bytes(uri.replace("s3://", "s3a://"), opts) == b"hello s3"
    storage.write_bytes(uri, b"v2", opts)
    assert storage.read_bytes(uri, opts) == b"v2"
    fs = storage.s3.fsspec_filesystem(opts)
    assert fs.ls(storage.join(bucket, "a", "b")) == [uri[len("s3://"):]]


def test_s3_filesystem_is_reused(s3, opts):
    """One client per endpoint and process: a new one per object costs a botocore session."""
    assert storage.s3.fsspec_filesystem(opts) is storage.s3.fsspec_filesystem(opts)
    other = StorageOptions(endpoint_url=s3.endpoint_url.replace("127.0.0.1", "localhost"))
    assert storage.s3.fsspec_filesystem(other) is not storage.s3.fsspec_filesystem(opts)


def test_s3_exists_sees_writes_from_elsewhere(s3, bucket, opts):
    """No stale listing: an object put by another client after a listing is seen."""
    name = storage.s3.split_s3(bucket)[0]
    assert storage.s3.fsspec_filesystem(opts).ls(bucket) == []
    s3.client().put_object(Bucket=name, Key="late.bin", Body=b"x")
    assert storage.exists(f"{bucket}/late.bin", opts)


def test_s3_pyarrow_parquet(bucket, opts):
    uri = storage.join(bucket, "tables", "t.parquet")
    table = pa.table({"uri": ["s3://x/1.png", "s3://x/2.png"], "score": pa.array([0.25, 0.75], pa.float32())})
    fs, path = storage.arrow_filesystem(uri, opts)
    assert isinstance(fs, pa.fs.S3FileSystem)
    assert path == f"{storage.s3.split_s3(bucket)[0]}/tables/t.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # The same object through s3fs: both clients see one store.
    assert pq.read_table(pa.BufferReader(storage.read_bytes(uri, opts))).equals(table)


def test_s3_missing_object_raises_file_not_found_without_secret(bucket, opts, caplog):
    uri = f"{bucket}/no/such/object.png"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri, opts)
    assert FAKE_SECRET_ACCESS_KEY not in str(info.value)
    assert FAKE_SECRET_ACCESS_KEY not in repr(info.value)
    assert FAKE_SECRET_ACCESS_KEY not in caplog.text
    assert not storage.exists(uri, opts)


def test_s3_missing_bucket(s3, opts):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://no-such-bucket-ntf-ray/x.png", opts)


# --- settings and secrets ----------------------------------------------------------------


def test_storage_options_resolve_precedence(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert StorageOptions.resolve() == StorageOptions(None, None)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert StorageOptions.resolve().endpoint_url == "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert StorageOptions.resolve().endpoint_url == "http://s3-specific:9000"
    assert StorageOptions.resolve("http://explicit:1").endpoint_url == "http://explicit:1"

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert StorageOptions.resolve().region == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert StorageOptions.resolve().region == "eu-central-1"
    assert StorageOptions.resolve(region="ap-south-1").region == "ap-south-1"

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "")  # empty means unset
    assert StorageOptions.resolve().endpoint_url == "http://generic:9000"


def test_resolved_endpoint_reaches_both_clients(s3, bucket, monkeypatch):
    """An endpoint from AWS_ENDPOINT_URL is handed to s3fs and to pyarrow by the resolver."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    uri = f"{bucket}/env.bin"
    storage.write_bytes(uri, b"via env")  # options=None: StorageOptions.resolve()
    assert storage.read_bytes(uri) == b"via env"
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"via env"


def test_storage_options_hold_no_credentials(s3):
    options = StorageOptions.resolve(s3.endpoint_url)
    assert FAKE_SECRET_ACCESS_KEY not in repr(options)
    assert set(vars(options)) == {"endpoint_url", "region"}


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    text = ("denied for AKIAIOSFODNN7EXAMPLE with secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
            "token=FwoGZXIvYXdzEXAMPLETOKEN temp ASIAQWERTYUIOPASDFGH at s3://bucket/key.png")
    out = storage.redact(text)
    for leaked in ("AKIAIOSFODNN7EXAMPLE", "ASIAQWERTYUIOPASDFGH", "wJalrXUtnFEMI", "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert leaked not in out
    assert "s3://bucket/key.png" in out and "<redacted>" in out
    assert storage.redact("nothing secret here") == "nothing secret here"


def test_redact_uses_the_current_secret(s3):
    assert FAKE_SECRET_ACCESS_KEY not in storage.redact(f"oops {FAKE_SECRET_ACCESS_KEY} leaked")


def test_read_error_is_one_redacted_line_of_at_most_200_characters(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert storage.read_error(FileNotFoundError(2, "No such file", "/x.png")) == "read: not found (deleted after listing?)"
    assert storage.read_error(TimeoutError()) == "read: TimeoutError"
    assert storage.read_error(OSError("SlowDown:\n  please  reduce\tyour rate")) == \
        "read: OSError: SlowDown: please reduce your rate"
    long = storage.read_error(PermissionError("denied for AKIAIOSFODNN7EXAMPLE with wJalrXUtnFEMI/K7MDENG/"
                                              "bPxRfiCYEXAMPLEKEY\n" + "x" * 500))
    assert len(long) == 200 and "\n" not in long and long.startswith("read: PermissionError: denied for <redacted>")
    assert "AKIA" not in long and "wJalr" not in long


def test_no_secret_in_storage_logs(bucket, opts, caplog):
    caplog.set_level(logging.DEBUG)
    storage.write_bytes(f"{bucket}/x.bin", b"x", opts)
    storage.read_bytes(f"{bucket}/x.bin", opts)
    assert FAKE_SECRET_ACCESS_KEY not in caplog.text


def test_read_many_mixes_s3_and_local_and_returns_errors_as_values(s3, bucket, tmp_path):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    storage.write_bytes(f"{bucket}/a", b"A", options)
    storage.write_bytes(f"{bucket}/b", b"BB", options)
    (tmp_path / "c").write_bytes(b"C")
    out = storage.read_many([f"{bucket}/a", str(tmp_path / "c"), f"{bucket}/missing", f"{bucket}/b",
                             str(tmp_path / "nope")], options)
    assert out[0] == b"A" and out[1] == b"C" and out[3] == b"BB"
    assert isinstance(out[2], FileNotFoundError) and isinstance(out[4], FileNotFoundError)


def test_read_errors_never_name_the_endpoint():
    exc = ConnectionError('Could not connect to the endpoint URL: "http://minio.internal.example:9000/bucket/key"')
    assert "minio" not in storage.read_error(exc) and "<endpoint>" in storage.read_error(exc)


# --- listing a large prefix with several listers ---------------------------------------------

AWKWARD_KEYS = ["top.png", "a/1.png", "a/2.png", "a/b/3.png", "a/b/c/4.png", "a/b/c/d/5.png", "with space/6 7.png",
                "plus+/8+9.png", "ünï/ß.png", "double//slash.png", "x/", "empty-marker/", "z/" + "*?[.png",
                "tab\there/t.png"]


@pytest.fixture
def awkward_bucket(s3):
    client = s3.client()
    name = s3.create_bucket()
    for k, key in enumerate(AWKWARD_KEYS):
        client.put_object(Bucket=name, Key=key, Body=b"" if key == "empty-marker/" else bytes([k]) * (k + 1))
    for k in range(40):  # enough for several pages in every folder
        client.put_object(Bucket=name, Key=f"many/{k % 5}/{k:03d}.png", Body=b"x")
    return name


@pytest.mark.parametrize("concurrency", [2, 4, 16])
def test_fanned_out_listing_lists_what_one_lister_lists(s3, awkward_bucket, monkeypatch, concurrency):
    from ntf_ray.storage import s3 as s3_source

    monkeypatch.setattr(s3_source, "PAGE_KEYS", 3)  # many pages per lister
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    one = sorted((o["key"], o["etag"], o["size"]) for o in s3_source.list_s3(f"s3://{awkward_bucket}/", options))
    many = sorted((o["key"], o["etag"], o["size"])
                  for o in s3_source.list_s3_fanout(f"s3://{awkward_bucket}/", options, concurrency=concurrency))
    assert many == one and len(one) == len(AWKWARD_KEYS) - 1 + 40  # every object once; the empty marker left out
    assert {"x/", "double//slash.png", "z/*?[.png", "tab\there/t.png"} <= {k for k, _, _ in one}


def test_fanned_out_listing_waits_out_throttling_and_stops_with_its_caller(s3, awkward_bucket, monkeypatch):
    from ntf_ray.storage import s3 as s3_source

    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    fs = s3_source.fsspec_filesystem(options)
    real, calls = fs._call_s3, {"n": 0}

    class SlowDown(OSError):
        response = {"Error": {"Code": "SlowDown"}}

    async def throttled(op, *args, **kwargs):
        calls["n"] += 1
        if op == "list_objects_v2" and calls["n"] % 3 == 1:  # every third request told to slow down
            raise SlowDown("Please reduce your request rate.")
        return await real(op, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", throttled)
    monkeypatch.setattr(s3_source, "PAGE_KEYS", 4)
    keys = [o["key"] for o in s3_source.list_s3_fanout(f"s3://{awkward_bucket}/", options, concurrency=4)]
    assert len(keys) == len(set(keys)) == len(AWKWARD_KEYS) - 1 + 40
    # a caller that stops early: the listers stop too, nothing hangs
    listing = s3_source.list_s3_fanout(f"s3://{awkward_bucket}/many/", options, concurrency=4)
    assert len([next(listing) for _ in range(3)]) == 3
    listing.close()

    async def broken(op, *args, **kwargs):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(fs, "_call_s3", broken)
    with pytest.raises(PermissionError, match="AccessDenied"):
        list(s3_source.list_s3_fanout(f"s3://{awkward_bucket}/", options, concurrency=4))


# ---- files an operator names: one guarded reader (a model card, a manifest, a report, a trust list)


def test_read_input_reads_a_regular_file_and_a_link_to_one(tmp_path):
    (tmp_path / "model.json").write_bytes(b'{"a": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "model.json")
    assert storage.read_input(str(tmp_path / "model.json"), what="model card") == b'{"a": 1}'
    assert storage.read_input(str(tmp_path / "link.json"), what="model card") == b'{"a": 1}'


def test_read_input_refuses_a_fifo_at_once(tmp_path):
    import os
    import threading

    fifo = tmp_path / "model.json"
    os.mkfifo(fifo)
    got: list = []
    t = threading.Thread(target=lambda: got.append(_raised(storage.read_input, str(fifo), what="model card")),
                         daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert isinstance(got[0], storage.InputError) and "not a regular file" in str(got[0])


def test_read_input_refuses_a_link_to_a_device(tmp_path):
    (tmp_path / "model.json").symlink_to("/dev/zero")
    with pytest.raises(storage.InputError, match="not a regular file"):
        storage.read_input(str(tmp_path / "model.json"), what="model card")


def test_read_input_caps_the_bytes_read(tmp_path):
    (tmp_path / "big.parquet").write_bytes(b"x" * 1001)
    with pytest.raises(storage.InputError, match="manifest .* larger than 1000 bytes"):
        storage.read_input(str(tmp_path / "big.parquet"), what="manifest", max_bytes=1000)
    assert len(storage.read_input(str(tmp_path / "big.parquet"), what="manifest", max_bytes=1001)) == 1001


def test_read_input_names_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(storage.InputError, match="is a folder"):
        storage.read_input(str(tmp_path), what="trust list")
    with pytest.raises(storage.InputError, match="does not exist"):
        storage.read_input(str(tmp_path / "gone.pem"), what="trust list")


def test_read_input_s3_caps_and_names(bucket, opts):
    storage.write_bytes(f"{bucket}/r/manifest.json", b"y" * 50, opts)
    assert storage.read_input(f"{bucket}/r/manifest.json", opts, what="report") == b"y" * 50
    with pytest.raises(storage.InputError, match="larger than 10 bytes"):
        storage.read_input(f"{bucket}/r/manifest.json", opts, what="report", max_bytes=10)
    with pytest.raises(storage.InputError, match="does not exist"):
        storage.read_input(f"{bucket}/r/none.json", opts, what="report")


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - handed to the test's thread
        return exc
    return None


def test_a_read_cap_sets_aside_what_the_file_holds_not_the_cap(tmp_path):
    """``read(cap)`` would reserve the whole cap (4 GiB for a model's weights) before reading a
    byte: under an address-space limit of 1 GiB, a 3-byte file read with a 2 GiB cap still reads."""
    import subprocess
    import sys

    (tmp_path / "small.json").write_bytes(b"abc")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
            "from ntf_ray import storage\n"
            "big = bytearray(2 * 2**30 - 2**27)  # most of the limit in use already\n"
            f"print(storage.read_input({str(tmp_path / 'small.json')!r}, what='x', max_bytes=2 * 2**30))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "b'abc'" in done.stdout, done.stderr[-2000:]
