"""Scanning from an S3 Inventory report: the rows of a versioned bucket's report, in each of
AWS's formats (CSV with URL-encoded keys, Parquet, ORC), are the rows a listing of the bucket
gives (latest versions, no delete markers), read with no LIST or HEAD call; a local copy of the
report reads the same; a report that does not match its manifest is refused."""

from __future__ import annotations

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
    files = []
    for part in range(parts):
        data = _data_file(records[part::parts], file_format)
        ext = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}[file_format]
        key = f"{source}/daily/data/{uuid.uuid4()}.{ext}"
        client.put_object(Bucket=destination, Key=key, Body=data)
        files.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{destination}", "version": "2016-11-30",
                "creationTimestamp": "1764892800000", "fileFormat": file_format,
                "fileSchema": ", ".join(FIELDS) if file_format == "CSV" else "message s3.inventory { ... }",
                "files": files}
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
    from ntf_ray.scan.inventory import Inventory, rows_of

    inventory = Inventory("m", "CSV", tuple(FIELDS), ())
    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    assert rows_of(inventory, str(tmp_path / "empty.csv.gz"), None, storage.StorageOptions()).num_rows == 0
    line = '"b","k.png","v","true","false","not-a-size","2026-12-05T01:02:03.456Z","e","STANDARD"\n'
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(line.encode()))
    with pytest.raises(InventoryError, match="bad.csv.gz is not a readable CSV inventory file"):
        rows_of(inventory, str(tmp_path / "bad.csv.gz"), None, storage.StorageOptions())
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress(line.replace("not-a-size", "12").encode()))
    (row,) = rows_of(inventory, str(tmp_path / "ok.csv.gz"), None, storage.StorageOptions()).to_pylist()
    assert row["uri"] == "s3://b/k.png" and row["last_modified"].microsecond == 456000  # milliseconds kept


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
    """``inventory._rows`` as it read a data file before, a row at a time in Python."""
    import re

    import pyarrow.compute as pc

    from ntf_ray.scan.inventory import _flag, _times
    from ntf_ray.storage.source import matches

    table = table.filter(pc.and_(pc.invert(_flag(table, "is_delete_marker", False)), _flag(table, "is_latest", True)))
    keys = table.column("key").to_pylist()
    sizes = pc.cast(table.column("size"), pa.int64()).fill_null(0).to_pylist() if table.num_rows else []
    wanted = [i for i, (k, n) in enumerate(zip(keys, sizes))
              if not (k.endswith("/") and n == 0) and matches(k.rstrip("/").rsplit("/", 1)[-1], pattern)]
    table = table.take(pa.array(wanted, pa.int64()))
    uris = [f"s3://{b}/{k}" for b, k in zip(table.column("bucket").to_pylist(), table.column("key").to_pylist())]
    etags = [re.sub(r'^"|"$', "", e) if e else None for e in table.column("e_tag").cast(pa.string()).to_pylist()]
    times = _times(table.column("last_modified_date")).to_pylist()
    sizes = pc.cast(table.column("size"), pa.int64()).to_pylist()
    return [{"uri": u, "etag": e, "size_bytes": n, "last_modified": t, "listing_error": None}
            for u, e, n, t in zip(uris, etags, sizes, times)]


@pytest.mark.parametrize("pattern", [None, "*.png", "A*"])
def test_a_data_file_is_read_column_at_a_time_as_it_was_row_at_a_time(pattern):
    from ntf_ray.scan.inventory import _rows

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
    got = _rows(table, "data.parquet", pattern)
    want = _reference_rows(table, pattern)
    assert len(want) > 100 and got.to_pylist() == want
    with pytest.raises(InventoryError, match="without a bucket or a key"):
        _rows(table.set_column(1, "key", pa.array(keys[:1] + [None] + keys[2:], pa.string())), "data.parquet", pattern)
