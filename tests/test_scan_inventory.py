"""Scanning from an S3 Inventory report: the rows of a versioned bucket's report, in each of
AWS's formats (CSV with URL-encoded keys, Parquet, ORC), are the rows a listing of the bucket
gives (latest versions, no delete markers), read with no LIST or HEAD call; a local copy of the
report reads the same; a report that does not match its manifest is refused.

A report stays inside what it inventories: a row of another bucket, a source bucket S3 would
not name, a data file named elsewhere than beside the manifest refuse the report, and what
they point at is never read (moto's recorder shows every request); data files are bounded
(bombs of each format refused by a low cap, with the option named); malformed schemas, types,
sizes and missing checksums are one clear error, exit status 2 from the CLI."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.scan.inventory import InventoryError
from ntf_ray.scan.listing import list_objects
from ntf_ray.scan.spec import ScanSpec
from ntf_ray.scan.table import SUMMARY, completed_runs

from .conftest import save_random_detector

pytestmark = pytest.mark.timeout(600)

FIELDS = ["Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "LastModifiedDate", "ETag",
          "StorageClass"]
KEYS = ["plain.png", "with space.png", "plus+sign.png", "ünïcode/ß.png", "deep/a/b/c.png", "folder/"]


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def versioned(s3):
    """A versioned bucket: images, one replaced (two versions), one deleted (a delete marker),
    an empty folder marker; returns (bucket, the boto3 client)."""
    client = s3.client()
    name = s3.create_bucket()
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for k, key in enumerate(KEYS):
        client.put_object(Bucket=name, Key=key, Body=b"" if key.endswith("/") else _png(k))
    client.put_object(Bucket=name, Key="plain.png", Body=_png(100))  # a newer version
    client.put_object(Bucket=name, Key="gone.png", Body=_png(101))
    client.delete_object(Bucket=name, Key="gone.png")  # a delete marker over it
    return name, client


def _records(client, bucket: str) -> list[dict]:
    """What S3 Inventory reports for ``bucket``: every version and delete marker."""
    out = []
    page = client.list_object_versions(Bucket=bucket)
    for v in page.get("Versions", []):
        out.append({"Bucket": bucket, "Key": v["Key"], "VersionId": v["VersionId"], "IsLatest": v["IsLatest"],
                    "IsDeleteMarker": False, "Size": v["Size"], "LastModifiedDate": v["LastModified"],
                    "ETag": v["ETag"].strip('"'), "StorageClass": "STANDARD"})
    for m in page.get("DeleteMarkers", []):
        out.append({"Bucket": bucket, "Key": m["Key"], "VersionId": m["VersionId"], "IsLatest": m["IsLatest"],
                    "IsDeleteMarker": True, "Size": None, "LastModifiedDate": m["LastModified"], "ETag": None,
                    "StorageClass": None})
    assert not page.get("IsTruncated")
    return out


def _data_file(records: list[dict], file_format: str) -> bytes:
    if file_format == "CSV":  # AWS's CSV: no header, every value quoted, keys URL-encoded, gzip
        lines = []
        for r in records:
            values = dict(r, Key=urllib.parse.quote(r["Key"], safe="/"),
                          LastModifiedDate=r["LastModifiedDate"].strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                          IsLatest=str(r["IsLatest"]).lower(), IsDeleteMarker=str(r["IsDeleteMarker"]).lower())
            lines.append(",".join('"' + ("" if values[f] is None else str(values[f])) + '"' for f in FIELDS))
        return gzip.compress(("\n".join(lines) + "\n").encode())
    columns = {"bucket": [r["Bucket"] for r in records], "key": [r["Key"] for r in records],
               "version_id": [r["VersionId"] for r in records], "is_latest": [r["IsLatest"] for r in records],
               "is_delete_marker": [r["IsDeleteMarker"] for r in records],
               "size": pa.array([r["Size"] for r in records], pa.int64()),
               "last_modified_date": pa.array([r["LastModifiedDate"] for r in records], pa.timestamp("ms", tz="UTC")),
               "e_tag": [r["ETag"] and r["ETag"].strip('"') for r in records]}
    table, sink = pa.table(columns), io.BytesIO()
    (pq.write_table if file_format == "Parquet" else orc.write_table)(table, sink)
    return sink.getvalue()


def _report(client, source: str, destination: str, file_format: str, *, parts: int = 2) -> str:
    """Write an inventory of ``source`` into ``destination`` as AWS lays one out; returns the manifest's uri."""
    records = _records(client, source)
    return _publish(client, destination, source, file_format,
                    [_data_file(records[part::parts], file_format) for part in range(parts)])


EXT = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}


def _publish(client, destination: str, source: str, file_format: str, data_files: list[bytes], *,
             entry=None, **fields) -> str:
    """A report of ``source`` in ``destination``, laid out as AWS lays one out, with these data
    files; ``entry(i, dict)`` edits each manifest entry, ``fields`` the manifest's own (None
    leaves one out). Returns the manifest's uri."""
    files = []
    for i, data in enumerate(data_files):
        key = f"{source}/daily/data/{uuid.uuid4()}.{EXT[file_format]}"
        client.put_object(Bucket=destination, Key=key, Body=data)
        files.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
        if entry is not None:
            entry(i, files[-1])
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{destination}", "version": "2016-11-30",
                "creationTimestamp": "1764892800000", "fileFormat": file_format,
                "fileSchema": ", ".join(FIELDS) if file_format == "CSV" else "message s3.inventory { ... }",
                "files": files}
    manifest.update(fields)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    key = f"{source}/daily/2026-12-05T01-00Z/manifest.json"
    client.put_object(Bucket=destination, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{destination}/{key}"


def _rows(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table.column(c).to_pylist() for c in ("uri", "etag", "size_bytes", "last_modified"))))


@pytest.mark.parametrize("file_format", ["CSV", "Parquet", "ORC"])
def test_an_inventory_gives_the_rows_a_listing_of_the_bucket_gives(s3, versioned, file_format, monkeypatch):
    name, client = versioned
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    manifest = _report(client, name, s3.create_bucket(), file_format)
    listed = list_objects(ScanSpec(model="-", output="-", input=f"s3://{name}"), options)

    def no_listing(*args, **kwargs):
        raise AssertionError("an inventory scan lists nothing")

    monkeypatch.setattr(storage.s3, "list_s3", no_listing)
    monkeypatch.setattr(storage.s3.S3Source, "stat_many", no_listing)
    from_inventory = list_objects(ScanSpec(model="-", output="-", inventory=manifest), options)
    assert _rows(from_inventory) == _rows(listed)
    uris = {u.rsplit("/", 1)[-1] for u in from_inventory.column("uri").to_pylist()}
    assert {"with space.png", "plus+sign.png", "ß.png"} <= uris and "gone.png" not in uris  # decoded; no markers
    assert len(uris) == len(KEYS) - 1  # one row per object: plain.png's older version and the folder left out


def test_a_local_copy_of_a_report_reads_the_same(s3, versioned, tmp_path):
    name, client = versioned
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    destination = s3.create_bucket()
    manifest = _report(client, name, destination, "CSV")
    remote = list_objects(ScanSpec(model="-", output="-", inventory=manifest), options)
    fs = storage.s3.fsspec_filesystem(options)
    fs.get(f"{destination}/{name}/", str(tmp_path / "copy") + "/", recursive=True)
    local = tmp_path / "copy" / "daily" / "2026-12-05T01-00Z" / "manifest.json"
    assert _rows(list_objects(ScanSpec(model="-", output="-", inventory=str(local)), options)) == _rows(remote)
    # a glob and a limit apply as to any listing
    spec = ScanSpec(model="-", output="-", inventory=str(local), pattern="*.PNG", limit=3)
    assert list_objects(spec, options).num_rows == 3


def test_a_data_file_that_is_not_the_manifests_is_refused(s3, versioned):
    name, client = versioned
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    destination = s3.create_bucket()
    manifest = _report(client, name, destination, "Parquet", parts=1)
    doc = json.loads(storage.read_bytes(manifest, options))
    client.put_object(Bucket=destination, Key=doc["files"][0]["key"], Body=b"truncated")
    with pytest.raises(InventoryError, match="MD5 is not the manifest's"):
        list_objects(ScanSpec(model="-", output="-", inventory=manifest), options)
    storage.write_bytes(manifest, b"{not json", options)
    with pytest.raises(InventoryError, match="not an S3 Inventory manifest"):
        list_objects(ScanSpec(model="-", output="-", inventory=manifest), options)


def test_moderate_from_an_inventory_scores_the_latest_objects(local_ray, s3, versioned, tmp_path, capsys):
    name, client = versioned
    manifest = _report(client, name, s3.create_bucket(), "CSV")
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "scores")
    argv = ["moderate", "--inventory", manifest, "--model", model, "--output", out, "--s3-endpoint", s3.endpoint_url,
            "--cpus-per-actor", "0.5"]
    assert main([*argv, "--run-id", "i1"]) == 0
    (run,) = completed_runs(out, storage.StorageOptions())
    table = pq.read_table(Path(run) / "scores.parquet")
    assert table.num_rows == len(KEYS) - 1 and table.column("error").null_count == table.num_rows
    summary = json.loads((Path(run) / SUMMARY).read_text())
    assert (summary["listed"], summary["scored"], summary["config"]["inventory"]) == (5, 5, manifest)
    assert main([*argv, "--run-id", "i2"]) == 0
    assert "5 listed, 5 skipped as already scored, 0 scored" in capsys.readouterr().out


def test_an_empty_data_file_is_no_rows_and_a_bad_value_names_its_file(tmp_path):
    from ntf_ray.scan.inventory import DataFile, Inventory, rows_of

    inventory = Inventory("m", "source-bucket", "CSV", tuple(FIELDS), ())

    def rows(name: str) -> pa.Table:
        return rows_of(inventory, DataFile(str(tmp_path / name), None, None), storage.StorageOptions())

    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    assert rows("empty.csv.gz").num_rows == 0
    line = '"source-bucket","k.png","v","true","false","not-a-size","2026-12-05T01:02:03.456Z","e","STANDARD"\n'
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(line.encode()))
    with pytest.raises(InventoryError, match="bad.csv.gz is not a readable CSV inventory data file"):
        rows("bad.csv.gz")
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress(line.replace("not-a-size", "12").encode()))
    (row,) = rows("ok.csv.gz").to_pylist()
    assert row["uri"] == "s3://source-bucket/k.png" and row["last_modified"].microsecond == 456000  # ms kept


def test_what_the_index_holds_stays_in_the_task_that_read_its_data_file(local_ray, s3, versioned, tmp_path):
    """``moderate`` from an inventory: the rows the model's index holds are dropped in the Ray
    task that read the data file (by the index actors), so only the rest reach the driver."""
    from ntf_ray.ray_edge.scan import ray_map
    from ntf_ray.ray_edge.scan.skip import SkipIndex
    from ntf_ray.scan import index
    from ntf_ray.scan.listing import iter_kept

    name, client = versioned
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    spec = ScanSpec(model="-", output="-", inventory=_report(client, name, s3.create_bucket(), "Parquet", parts=2))
    everything = list_objects(spec, options)
    out = str(tmp_path / "scores")
    index.write_index(out, "m1", index.skip_key(everything.slice(2)), {}, storage.StorageOptions())
    returned: list[int] = []

    def recording(fn, items):
        for listed, table in ray_map(fn, items):
            returned.append(table.num_rows)
            yield listed, table

    skip = SkipIndex(out, "m1", storage.StorageOptions())
    try:
        kept = list(iter_kept(spec, options, keep=skip.unseen, map_files=recording))
    finally:
        skip.close()
    assert sum(listed for listed, _ in kept) == everything.num_rows == len(KEYS) - 1
    assert sorted(u for _, t in kept for u in t.column("uri").to_pylist()) == sorted(
        everything.column("uri").to_pylist()[:2])
    assert sum(returned) == 2 and len(returned) == 2  # two data files; what the index holds never left them


def _reference_rows(table: pa.Table, pattern: str | None) -> list[dict]:
    """``inventory.rows.listing_rows`` as it read a data file before, a row at a time in Python."""
    import re

    import pyarrow.compute as pc

    from ntf_ray.scan.inventory.rows import flag, times
    from ntf_ray.storage.source import matches

    table = table.filter(pc.and_(pc.invert(flag(table, "is_delete_marker", False)), flag(table, "is_latest", True)))
    keys = table.column("key").to_pylist()
    sizes = pc.cast(table.column("size"), pa.int64()).fill_null(0).to_pylist() if table.num_rows else []
    wanted = [i for i, (k, n) in enumerate(zip(keys, sizes))
              if not (k.endswith("/") and n == 0) and matches(k.rstrip("/").rsplit("/", 1)[-1], pattern)]
    table = table.take(pa.array(wanted, pa.int64()))
    uris = [f"s3://{b}/{k}" for b, k in zip(table.column("bucket").to_pylist(), table.column("key").to_pylist())]
    etags = [re.sub(r'^"|"$', "", e) if e else None for e in table.column("e_tag").cast(pa.string()).to_pylist()]
    stamps = times(table.column("last_modified_date")).to_pylist()
    sizes = pc.cast(table.column("size"), pa.int64()).to_pylist()
    return [{"uri": u, "etag": e, "size_bytes": n, "last_modified": t, "listing_error": None}
            for u, e, n, t in zip(uris, etags, sizes, stamps)]


@pytest.mark.parametrize("pattern", [None, "*.png", "A*"])
def test_a_data_file_is_read_column_at_a_time_as_it_was_row_at_a_time(pattern):
    from ntf_ray.scan.inventory.rows import listing_rows

    rng = np.random.default_rng(11)
    parts = ["a", "b/", "ü", "x y", "%2F", "+", ".png", ".PNG", "/", "\"", "名"]
    n = 3000
    keys = ["".join(rng.choice(parts, rng.integers(1, 6))) for _ in range(n)]
    etags = [rng.choice(['"abc"', "abc", '""', "", None, '"a"b"', '"', 'x"']) for _ in range(n)]
    table = pa.table({
        "bucket": ["bk"] * n, "key": keys,
        "size": pa.array([None if i % 97 == 0 else int(rng.integers(0, 3)) for i in range(n)], pa.int64()),
        "last_modified_date": pa.array([f"2026-0{1 + i % 9}-05T01:02:03.{i % 1000:03d}Z" for i in range(n)]),
        "e_tag": pa.array(etags, pa.string()),
        "is_latest": pa.array([None if i % 13 == 0 else bool(i % 5) for i in range(n)], pa.bool_()),
        "is_delete_marker": pa.array(["true" if i % 7 == 0 else ("FALSE" if i % 2 else None) for i in range(n)]),
    })
    got = listing_rows(table, "data.parquet", pattern, "bk")
    want = _reference_rows(table, pattern)
    assert len(want) > 100 and got.to_pylist() == want
    with pytest.raises(InventoryError, match="without a bucket or a key"):
        listing_rows(table.set_column(1, "key", pa.array(keys[:1] + [None] + keys[2:], pa.string())), "data.parquet",
                     pattern, "bk")


# ---- An inventory stays inside what it inventories, and its data files are bounded.

WHEN = dt.datetime(2026, 12, 5, 1, 2, 3, tzinfo=dt.timezone.utc)


def _record(bucket: str, key: str, *, size: int | None = 10, latest=True, marker=False) -> dict:
    return {"Bucket": bucket, "Key": key, "VersionId": "v1", "IsLatest": latest, "IsDeleteMarker": marker,
            "Size": size, "LastModifiedDate": WHEN, "ETag": "0123456789abcdef0123456789abcdef",
            "StorageClass": "STANDARD"}


def _uploads(bucket: str) -> list[dict]:
    return [_record(bucket, f"uploads/{i}.png") for i in range(3)]


@pytest.fixture
def requests_seen(s3, tmp_path, monkeypatch):
    """What the S3 server is asked from now on (moto's recorder): one "METHOD url" a request."""
    import requests
    from moto.moto_api import recorder

    path = tmp_path / "requests.jsonl"
    monkeypatch.setattr(recorder, "_location", str(path))
    requests.post(f"{s3.endpoint_url}/moto-api/recorder/start-recording", timeout=10)

    def seen() -> list[str]:
        lines = path.read_text().splitlines() if path.exists() else []
        return [f"{e['method']} {urllib.parse.unquote(e['url'])}" for e in map(json.loads, lines)]

    yield seen
    requests.post(f"{s3.endpoint_url}/moto-api/recorder/stop-recording", timeout=10)


def _reads(requests: list[str], part: str) -> list[str]:
    """The GET and HEAD requests among ``requests`` whose url holds ``part``."""
    return [r for r in requests if r.split(" ")[0] in ("GET", "HEAD") and part in r]


def _listing(manifest: str, s3, **spec) -> pa.Table:
    return list_objects(ScanSpec(model="-", output="-", inventory=manifest, **spec),
                        storage.StorageOptions(endpoint_url=s3.endpoint_url))


@pytest.mark.parametrize("file_format", ["CSV", "Parquet", "ORC"])
def test_a_row_of_another_bucket_refuses_the_report_and_that_bucket_is_never_read(s3, file_format, requests_seen):
    """A data file naming an object of another bucket (the credentials reach it) beside the
    source's uploads: the whole report is refused, with one error naming the first such row."""
    client = s3.client()
    source, other, destination = s3.create_bucket(), s3.create_bucket(), s3.create_bucket()
    client.put_object(Bucket=other, Key="private/secret/passport.png", Body=_png(1))
    records = [*_uploads(source), _record(other, "private/secret/passport.png"), _record("", "k.png")]
    manifest = _publish(client, destination, source, file_format, [_data_file(records, file_format)])
    with pytest.raises(InventoryError, match=f"bucket '{other}', not the report's sourceBucket '{source}'"):
        _listing(manifest, s3)
    assert not _reads(requests_seen(), other)
    empty = _publish(client, destination, source, file_format, [_data_file([*_uploads(source), _record("", "k.png")],
                                                                          file_format)])
    with pytest.raises(InventoryError, match="a row names no bucket"):
        _listing(empty, s3)


@pytest.mark.parametrize("name", ["other/secret", "Upper-case", "under_score", "ab", "a" * 64, "-dash", "dash-",
                                  "two..dots", "192.168.5.4", "xn--punycode", "bucket-s3alias", "", 7, None])
def test_a_source_bucket_is_named_as_s3_names_buckets(s3, name):
    """A sourceBucket holding '/' (it would join onto every key: ``s3://other/secret/KEY``), or
    any name S3 does not give a bucket, refuses the report; so does a report without one."""
    client = s3.client()
    destination, source = s3.create_bucket(), s3.create_bucket()
    rows = [_record(name if isinstance(name, str) else source, "passport.png")]
    manifest = _publish(client, destination, source, "CSV", [_data_file(rows, "CSV")], sourceBucket=name)
    with pytest.raises(InventoryError, match="sourceBucket"):
        _listing(manifest, s3)


def test_data_files_are_read_beside_the_manifest_whatever_destination_bucket_says(s3, requests_seen):
    """The data files are read from the bucket and folder the manifest was read from (its
    ``data/`` folder), never from the bucket its ``destinationBucket`` names."""
    client = s3.client()
    source, destination, elsewhere = s3.create_bucket(), s3.create_bucket(), s3.create_bucket()
    manifest = _publish(client, destination, source, "CSV", [_data_file(_uploads(source), "CSV")],
                        destinationBucket=f"arn:aws:s3:::{elsewhere}")
    doc = json.loads(storage.read_bytes(manifest, storage.StorageOptions(endpoint_url=s3.endpoint_url)))
    planted = _data_file([_record(source, "planted.png")], "CSV")
    assert hashlib.md5(planted).hexdigest() != doc["files"][0]["MD5checksum"]
    client.put_object(Bucket=elsewhere, Key=doc["files"][0]["key"], Body=planted)  # same key, another bucket
    uris = _listing(manifest, s3).column("uri").to_pylist()
    assert sorted(uris) == [f"s3://{source}/uploads/{i}.png" for i in range(3)]
    assert not _reads(requests_seen(), elsewhere)


@pytest.mark.parametrize("key", ["x.csv.gz", "{source}/daily/data/", "{source}/daily/data/..",
                                 "{source}/daily/data/.hidden", "{source}/daily/data/a b.csv.gz", ""])
def test_a_data_file_is_named_as_s3_inventory_names_one(s3, key, requests_seen):
    """An entry's key is ``.../data/NAME`` (NAME a plain file name): anything else is refused."""
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    manifest = _publish(client, destination, source, "CSV", [_data_file(_uploads(source), "CSV")],
                        entry=lambda i, e: e.update(key=key.format(source=source)))
    with pytest.raises(InventoryError, match="not a data file"):
        _listing(manifest, s3)
    assert not _reads(requests_seen(), "/data/")


SECRET = "SECRET-9f1c2e-do-not-echo"


@pytest.mark.parametrize("file_format, data", [
    ("CSV", lambda source: gzip.compress(f'"{SECRET}","{SECRET}"\n'.encode())),  # two fields where nine are declared
    ("CSV", lambda source: gzip.compress(
        f'"{source}","k.png","v","true","false","{SECRET}","2026-12-05T01:02:03Z","e","S"\n'.encode())),
    ("CSV", lambda source: b"\x1f\x8b" + SECRET.encode()),  # not gzip after all
    ("Parquet", lambda source: b"PAR1" + SECRET.encode() * 3 + b"PAR1"),
    ("ORC", lambda source: b"ORC" + SECRET.encode() * 3),
], ids=["csv-columns", "csv-value", "csv-gzip", "parquet", "orc"])
def test_a_data_file_that_does_not_parse_is_named_never_quoted(s3, file_format, data):
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    manifest = _publish(client, destination, source, file_format, [data(source)])
    with pytest.raises(InventoryError, match=f"is not a readable {file_format} inventory data file") as caught:
        _listing(manifest, s3)
    assert SECRET not in str(caught.value) and SECRET[:10] not in str(caught.value)


def test_a_gzip_bomb_stops_at_the_inflated_cap(s3):
    """A small .csv.gz that inflates far past ``inventory_max_bytes`` is refused once the cap is
    read, with the option to raise it named; below the cap the same file reads."""
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    line = _data_file([_record(source, "a" * 200 + ".png")], "CSV")
    rows = gzip.decompress(line) * 40_000  # about 12 MB of text
    bomb = gzip.compress(rows, compresslevel=9)
    assert len(bomb) < len(rows) / 100
    manifest = _publish(client, destination, source, "CSV", [bomb])
    with pytest.raises(InventoryError, match=r"inflates to more than 1048576 bytes.*--inventory-max-bytes"):
        _listing(manifest, s3, inventory_max_bytes=2**20)
    with pytest.raises(InventoryError, match=r"more than 1000 rows.*--inventory-max-rows"):
        _listing(manifest, s3, inventory_max_rows=1000)
    assert _listing(manifest, s3, inventory_max_bytes=2 * len(rows)).num_rows == 40_000


@pytest.mark.parametrize("file_format", ["Parquet", "ORC"])
def test_a_columnar_bomb_is_refused_from_what_it_declares_or_as_it_inflates(s3, file_format):
    """Parquet and ORC: the rows a file declares are checked before a row is read; a few
    dictionary-encoded values repeated past the inflated cap are refused as they inflate."""
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    n = 20_000
    table = pa.table({"bucket": pa.array([source] * n).dictionary_encode(),
                      "key": pa.array([("k" * 1000) + ".png"] * n).dictionary_encode(),
                      "size": pa.array([10] * n, pa.int64()),
                      "last_modified_date": pa.array([WHEN] * n, pa.timestamp("ms", tz="UTC")),
                      "e_tag": ["e"] * n, "is_latest": [True] * n, "is_delete_marker": [False] * n})
    sink = io.BytesIO()
    if file_format == "Parquet":
        pq.write_table(table, sink, compression="zstd")
    else:
        orc.write_table(table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_dictionary(f.type) else f
                                              for f in table.schema])), sink, compression="zstd")
    assert len(sink.getvalue()) < 2**20  # 20 MB once read
    manifest = _publish(client, destination, source, file_format, [sink.getvalue()])
    with pytest.raises(InventoryError, match=r"declares 20000 rows, more than 1000.*--inventory-max-rows"):
        _listing(manifest, s3, inventory_max_rows=1000)
    with pytest.raises(InventoryError, match=r"inflates to more than 1048576 bytes.*--inventory-max-bytes"):
        _listing(manifest, s3, inventory_max_bytes=2**20)
    assert _listing(manifest, s3, inventory_max_bytes=2**26).num_rows == n


def test_the_caps_have_documented_defaults_and_cli_options():
    from ntf_ray.cli import build_parser
    from ntf_ray.cli.scan import scan_spec
    from ntf_ray.scan.inventory import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS

    spec = ScanSpec(model="-", output="-", inventory="m")
    assert (spec.inventory_max_bytes, spec.inventory_max_rows, spec.allow_unchecked_inventory) == (
        DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, False)
    argv = ["moderate", "--inventory", "m.json", "--model", "m", "--output", "o"]
    args = build_parser().parse_args([*argv, "--inventory-max-bytes", "2GiB", "--inventory-max-rows", "50000000",
                                      "--allow-unchecked-inventory"])
    args.storage_options = storage.StorageOptions()
    spec = scan_spec(args)
    assert (spec.inventory_max_bytes, spec.inventory_max_rows, spec.allow_unchecked_inventory) == (
        2 * 2**30, 50_000_000, True)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    for option in ("--inventory-max-bytes", "--inventory-max-rows", "--allow-unchecked-inventory"):
        assert option in docs
    assert f"{DEFAULT_MAX_BYTES // 2**20}MiB" in docs and f"{DEFAULT_MAX_ROWS:,}" in docs


def _repeated_key_report(client, destination: str, source: str) -> str:
    """A CSV report whose fileSchema names Key twice, its rows as that schema says (it once
    escaped as a KeyError traceback)."""
    lines = [f'"{source}","uploads/{i}.png","uploads/{i}.png","10","2026-12-05T01:02:03.000Z","e"' for i in range(3)]
    return _publish(client, destination, source, "CSV", [gzip.compress(("\n".join(lines) + "\n").encode())],
                    fileSchema="Bucket, Key, Key, Size, LastModifiedDate, ETag")


def test_a_repeated_schema_field_is_one_clear_error(s3):
    client = s3.client()
    manifest = _repeated_key_report(client, s3.create_bucket(), s3.create_bucket())
    with pytest.raises(InventoryError, match="fileSchema names Key more than once"):
        _listing(manifest, s3)


@pytest.mark.parametrize("file_format, column, values", [
    ("Parquet", "is_latest", pa.array([1, 1, 1], pa.int64())),
    ("Parquet", "is_delete_marker", pa.array([0, 0, 0], pa.int32())),
    ("Parquet", "size", pa.array(["10", "10", "10"])),
    ("Parquet", "key", pa.array([1, 2, 3], pa.int64())),
    ("Parquet", "last_modified_date", pa.array([1, 2, 3], pa.int64())),
    ("ORC", "is_latest", pa.array([1, 1, 1], pa.int64())),
])
def test_a_column_of_another_type_is_refused_not_read_as_no_rows(s3, file_format, column, values):
    """An ``is_latest`` of int64 once dropped every row silently: a column whose type is not the
    one S3 Inventory writes refuses the report, naming the column."""
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    good = pa.Table.from_pylist([{"bucket": r["Bucket"], "key": r["Key"], "size": r["Size"],
                                  "last_modified_date": r["LastModifiedDate"], "e_tag": r["ETag"],
                                  "is_latest": True, "is_delete_marker": False} for r in _uploads(source)])
    table, sink = good.set_column(good.column_names.index(column), column, values), io.BytesIO()
    (pq.write_table if file_format == "Parquet" else orc.write_table)(table, sink)
    manifest = _publish(client, destination, source, file_format, [sink.getvalue()])
    with pytest.raises(InventoryError, match=f"column {column} is "):
        _listing(manifest, s3)


def test_a_flag_of_csv_is_true_or_false(s3):
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    text = gzip.decompress(_data_file(_uploads(source), "CSV")).decode().replace('"true"', '"1"')
    manifest = _publish(client, destination, source, "CSV", [gzip.compress(text.encode())])
    with pytest.raises(InventoryError, match="column IsLatest holds a value other than true or false"):
        _listing(manifest, s3)


def test_a_data_file_without_a_checksum_is_refused_unless_allowed(s3):
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    manifest = _publish(client, destination, source, "CSV", [_data_file(_uploads(source), "CSV")],
                        entry=lambda i, e: e.pop("MD5checksum"))
    with pytest.raises(InventoryError, match="no MD5checksum.*--allow-unchecked-inventory"):
        _listing(manifest, s3)
    assert _listing(manifest, s3, allow_unchecked_inventory=True).num_rows == 3
    malformed = _publish(client, destination, source, "CSV", [_data_file(_uploads(source), "CSV")],
                         entry=lambda i, e: e.update(MD5checksum="not-a-digest"))
    with pytest.raises(InventoryError, match="MD5checksum is not an MD5"):
        _listing(malformed, s3, allow_unchecked_inventory=True)


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_a_negative_size_is_refused(s3, file_format):
    client = s3.client()
    source, destination = s3.create_bucket(), s3.create_bucket()
    records = [*_uploads(source), _record(source, "negative.png", size=-5)]
    manifest = _publish(client, destination, source, file_format, [_data_file(records, file_format)])
    with pytest.raises(InventoryError, match="a negative size"):
        _listing(manifest, s3)
    listed = _publish(client, destination, source, file_format, [_data_file(_uploads(source), file_format)],
                      entry=lambda i, e: e.update(size=-1))
    with pytest.raises(InventoryError, match="size -1 is not a number of bytes"):
        _listing(listed, s3)


@pytest.mark.timeout(60)
def test_a_manifest_or_data_file_that_is_not_a_regular_file_is_refused(tmp_path):
    """A local copy: a manifest that is a FIFO (it would block) or a link to /dev/zero (it would
    never end) is refused by the guarded reader, with one line; so is such a data file."""
    import os

    report = tmp_path / "SOURCE" / "CONFIG"
    (report / "data").mkdir(parents=True)
    (report / "2026-12-05T01-00Z").mkdir()
    manifest = report / "2026-12-05T01-00Z" / "manifest.json"
    os.mkfifo(manifest)
    with pytest.raises(storage.InputError, match="not a regular file"):
        list_objects(ScanSpec(model="-", output="-", inventory=str(manifest)), storage.StorageOptions())
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with pytest.raises(storage.InputError):
        list_objects(ScanSpec(model="-", output="-", inventory=str(manifest)), storage.StorageOptions())
    manifest.unlink()
    os.mkfifo(report / "data" / "part.csv.gz")
    manifest.write_text(json.dumps({"sourceBucket": "source-bucket", "fileFormat": "CSV",
                                    "fileSchema": ", ".join(FIELDS),
                                    "files": [{"key": "SOURCE/CONFIG/data/part.csv.gz", "size": 100,
                                               "MD5checksum": "0" * 32}]}))
    with pytest.raises(storage.InputError, match="not a regular file"):
        list_objects(ScanSpec(model="-", output="-", inventory=str(manifest)), storage.StorageOptions())


def test_a_report_that_steps_outside_its_bucket_stops_moderate_with_one_line(local_ray, s3, tmp_path, capsys,
                                                                            requests_seen):
    """End to end: ``moderate`` from a report naming another bucket's object exits 2 with one
    line, publishes nothing, and never reads that object; the caps and the escape hatch are
    options of the command."""
    client = s3.client()
    source, other, destination = s3.create_bucket(), s3.create_bucket(), s3.create_bucket()
    for i in range(3):
        client.put_object(Bucket=source, Key=f"uploads/{i}.png", Body=_png(i))
    client.put_object(Bucket=other, Key="private/secret/passport.png", Body=_png(9))
    records = [*_uploads(source), _record(other, "private/secret/passport.png")]
    manifest = _publish(client, destination, source, "CSV", [_data_file(records, "CSV")])
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "scores")
    argv = ["moderate", "--inventory", manifest, "--model", model, "--output", out, "--s3-endpoint", s3.endpoint_url,
            "--cpus-per-actor", "0.5"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert f"not the report's sourceBucket '{source}'" in line
    assert completed_runs(out, storage.StorageOptions()) == []
    assert not _reads(requests_seen(), other)
    unchecked = _publish(client, destination, source, "CSV", [_data_file(_uploads(source), "CSV")],
                         entry=lambda i, e: e.pop("MD5checksum"))
    argv[2] = unchecked
    assert main(argv) == 2
    assert "--allow-unchecked-inventory" in capsys.readouterr().err
    argv[2] = _repeated_key_report(client, s3.create_bucket(), source)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fileSchema names Key more than once" in err and "Traceback" not in err
    argv[2] = unchecked
    assert main([*argv, "--allow-unchecked-inventory", "--inventory-max-rows", "10",
                 "--inventory-max-bytes", "1MiB"]) == 0
