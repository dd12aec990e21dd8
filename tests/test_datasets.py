"""Tests for ntf_ray.training.datasets: folder indexing, manifest I/O (local and moto S3), the Dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main as cli_main
from ntf_ray.storage import StorageOptions
from ntf_ray.training.datasets import (
    MANIFEST_SCHEMA,
    ManifestDataset,
    collate_drop_none,
    index_folder,
    manifest_schema,
    manifest_table,
    read_manifest,
    select,
    validate_manifest,
    write_manifest,
)
from tests.conftest import FAKE_SECRET_ACCESS_KEY

pytestmark = pytest.mark.timeout(120)

SIDE = 40


def png_bytes(seed: int, side: int = SIDE) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_files(root: Path, rel_paths: list[str], data: bytes | None = None) -> None:
    for i, rel in enumerate(rel_paths):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(i) if data is None else data)


def rows(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table.column(n).to_pylist() for n in ("uri", "label", "generator", "split"))))


# --- index_folder ------------------------------------------------------------------------

WITH_SPLIT = [
    "train/progan/airplane/0_real/a.png",
    "train/progan/airplane/1_fake/b.png",
    "train/progan/cat/0_real/c.PNG",  # extensions are matched case-insensitively
    "val/progan/cat/1_fake/d.jpg",
    "test/stylegan/bedroom/0_real/e.png",
    "test/stylegan/bedroom/1_fake/f.webp",
    "test/whichfaceisreal/0_real/g.png",  # no class level
]
SKIPPED = [
    "train/progan/airplane/0_real/notes.txt",  # not an image
    "train/progan/airplane/0_real/.hidden.png",  # hidden file
    "train/progan/airplane/1_fake/._b.png",  # macOS resource fork
    "train/progan/.cache/0_real/h.png",  # hidden folder
    "train/progan/airplane/preview.png",  # not under a label folder
    "README.png",
]


def test_index_folder_with_split_level(tmp_path):
    make_files(tmp_path, WITH_SPLIT + SKIPPED)
    table = index_folder(tmp_path)
    assert table.schema == MANIFEST_SCHEMA
    expected = [
        (str(tmp_path / "test/stylegan/bedroom/0_real/e.png"), 0, "stylegan", "test"),
        (str(tmp_path / "test/stylegan/bedroom/1_fake/f.webp"), 1, "stylegan", "test"),
        (str(tmp_path / "test/whichfaceisreal/0_real/g.png"), 0, "whichfaceisreal", "test"),
        (str(tmp_path / "train/progan/airplane/0_real/a.png"), 0, "progan", "train"),
        (str(tmp_path / "train/progan/airplane/1_fake/b.png"), 1, "progan", "train"),
        (str(tmp_path / "train/progan/cat/0_real/c.PNG"), 0, "progan", "train"),
        (str(tmp_path / "val/progan/cat/1_fake/d.jpg"), 1, "progan", "val"),
    ]
    assert rows(table) == expected
    assert all(Path(u).is_absolute() for u in table.column("uri").to_pylist())


def test_index_folder_without_split_level(tmp_path, monkeypatch):
    make_files(tmp_path, ["progan/airplane/0_real/a.png", "progan/airplane/1_fake/b.png",
                          "biggan/1_fake/c.png", "0_real/d.png", "misc/e.png"])
    monkeypatch.chdir(tmp_path.parent)
    table = index_folder(tmp_path.name)  # a relative root gives absolute uris
    assert rows(table) == [
        (str(tmp_path / "0_real/d.png"), 0, tmp_path.name, "test"),
        (str(tmp_path / "biggan/1_fake/c.png"), 1, "biggan", "test"),
        (str(tmp_path / "progan/airplane/0_real/a.png"), 0, "progan", "test"),
        (str(tmp_path / "progan/airplane/1_fake/b.png"), 1, "progan", "test"),
    ]
    assert set(index_folder(tmp_path, default_split="val").column("split").to_pylist()) == {"val"}


def test_index_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images") as info:
        index_folder(tmp_path)
    assert_names_both_layouts(str(info.value))
    make_files(tmp_path, ["progan/notes.txt", "progan/0_real/notes.txt", "progan/x.png"])
    message = r"1 image under .* but none in a known layout \(e\.g\. ROOT/progan/x\.png\)"
    with pytest.raises(ValueError, match=message) as info:
        index_folder(tmp_path)
    assert_names_both_layouts(str(info.value))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        index_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        index_folder(tmp_path / "progan" / "x.png")
    make_files(tmp_path, ["progan/0_real/a.png"])
    with pytest.raises(ValueError, match="default_split"):
        index_folder(tmp_path, default_split="holdout")


def assert_names_both_layouts(message: str) -> None:
    assert "CNNDetection" in message and "ROOT/train/progan/airplane/1_fake/00001.png" in message
    assert "GenImage" in message and "ROOT/stable_diffusion_v_1_4/train/ai/00001.png" in message


def test_unknown_layout_lists_both_layouts(tmp_path):
    """ImageNet-style class folders, and ai/nature folders not below train/val, are neither layout."""
    make_files(tmp_path, ["train/n01440764/a.JPEG", "val/n01440764/b.JPEG", "sd/ai/c.png", "sd/test/nature/d.png"])
    with pytest.raises(ValueError, match=r"4 images under .* but none in a known layout") as info:
        index_folder(tmp_path)
    assert_names_both_layouts(str(info.value))


# --- GenImage layout ---------------------------------------------------------------------

GENIMAGE = [
    "stable_diffusion_v_1_4/train/ai/000_sdv4_00001.png",
    "stable_diffusion_v_1_4/train/nature/n01440764_1.JPEG",
    "stable_diffusion_v_1_4/val/ai/000_sdv4_00002.png",
    "stable_diffusion_v_1_4/val/nature/ILSVRC2012_val_00000001.JPEG",
    "ADM/imagenet_ai_0508_adm/val/ai/1_adm_3.PNG",  # the release nests one more folder
    "ADM/imagenet_ai_0508_adm/val/nature/ILSVRC2012_val_00000002.JPEG",
]
GENIMAGE_SKIPPED = [
    "stable_diffusion_v_1_4/train/ai/._000_sdv4_00001.png",  # macOS resource fork
    "stable_diffusion_v_1_4/.thumbs/train/ai/x.png",  # hidden folder
    "stable_diffusion_v_1_4/train/ai/captions.txt",  # not an image
    "stable_diffusion_v_1_4/preview.png",  # not in a class folder
]


def test_index_genimage_layout(tmp_path):
    make_files(tmp_path, GENIMAGE + GENIMAGE_SKIPPED)
    table = index_folder(tmp_path, default_split="val")  # default_split does not apply to GenImage
    assert table.schema == MANIFEST_SCHEMA
    assert rows(table) == sorted([
        (str(tmp_path / GENIMAGE[0]), 1, "stable_diffusion_v_1_4", "train"),
        (str(tmp_path / GENIMAGE[1]), 0, "stable_diffusion_v_1_4", "train"),
        (str(tmp_path / GENIMAGE[2]), 1, "stable_diffusion_v_1_4", "test"),  # GenImage val is the test set
        (str(tmp_path / GENIMAGE[3]), 0, "stable_diffusion_v_1_4", "test"),
        (str(tmp_path / GENIMAGE[4]), 1, "ADM", "test"),  # the first folder below the root
        (str(tmp_path / GENIMAGE[5]), 0, "ADM", "test"),
    ])


def test_index_genimage_single_generator_root(tmp_path):
    root = tmp_path / "imagenet_ai_0419_sdv4"
    make_files(root, ["train/ai/a.png", "train/nature/b.JPEG", "val/ai/c.png", "val/nature/d.JPEG"])
    assert rows(index_folder(root)) == [
        (str(root / "train/ai/a.png"), 1, "imagenet_ai_0419_sdv4", "train"),
        (str(root / "train/nature/b.JPEG"), 0, "imagenet_ai_0419_sdv4", "train"),
        (str(root / "val/ai/c.png"), 1, "imagenet_ai_0419_sdv4", "test"),
        (str(root / "val/nature/d.JPEG"), 0, "imagenet_ai_0419_sdv4", "test"),
    ]


def test_mixed_layouts_are_an_error(tmp_path):
    make_files(tmp_path, ["cnndetection/progan/0_real/a.png", "genimage/sd14/train/ai/b.png"])
    with pytest.raises(ValueError, match=r"mixes two layouts: CNNDetection \(e\.g\. ROOT/cnndetection/progan/0_real/a\.png\) "
                                         r"and GenImage \(e\.g\. ROOT/genimage/sd14/train/ai/b\.png\)"):
        index_folder(tmp_path)
    # Each part on its own is fine.
    assert index_folder(tmp_path / "genimage").column("generator").to_pylist() == ["sd14"]
    # A 0_real/1_fake folder decides: this is CNNDetection, not GenImage.
    make_files(tmp_path / "both", ["train/ai/1_fake/c.png"])
    assert rows(index_folder(tmp_path / "both")) == [(str(tmp_path / "both/train/ai/1_fake/c.png"), 1, "ai", "train")]


def test_local_file_names_with_glob_characters(tmp_path):
    names = ["[1].png", "*.png", "?.png", "a[!b].png", "sp ace.png"]
    make_files(tmp_path, [f"progan/1_fake/{n}" for n in names] + ["progan/1_fake/1.png"])
    uris = index_folder(tmp_path).column("uri").to_pylist()
    assert sorted(uris) == sorted(str(tmp_path / "progan/1_fake" / n) for n in names + ["1.png"])


# --- indexing S3 -------------------------------------------------------------------------

GLOB_NAMES = ["[1].png", "*.png", "?.png", "a[!b].png", "sp ace.png", "1.png"]


def put_keys(s3, bucket: str, keys: list[str]) -> None:
    """Objects put under their exact keys (no glob expansion anywhere on the way)."""
    client = s3.client()
    name = bucket[len("s3://"):]
    for i, key in enumerate(keys):
        client.put_object(Bucket=name, Key=key, Body=png_bytes(i, side=8))


@pytest.mark.parametrize("layout", ["cnndetection", "genimage"])
def test_index_s3_matches_local(s3, bucket, tmp_path, monkeypatch, layout):
    """The same tree indexed locally and on S3 gives the same rows, with s3://bucket/key uris."""
    monkeypatch.setattr("ntf_ray.storage.s3.PAGE_KEYS", 3)  # several ListObjectsV2 pages
    files = (WITH_SPLIT + SKIPPED) if layout == "cnndetection" else (GENIMAGE + GENIMAGE_SKIPPED)
    local = tmp_path / "data"
    make_files(local, files)
    put_keys(s3, bucket, [f"sets/data/{f}" for f in files] + ["sets/data2/progan/0_real/x.png",  # another prefix
                                                              "sets/data/test/progan/",  # a folder marker
                                                              "top.png"])
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    for root in (f"{bucket}/sets/data", f"{bucket}/sets/data/"):
        table = index_folder(root, options=opts)
        assert table.schema == MANIFEST_SCHEMA
        local_rows = [(u.replace(str(local), f"{bucket}/sets/data"), *rest) for u, *rest in rows(index_folder(local))]
        assert rows(table) == sorted(local_rows)
        assert len(local_rows) == (7 if layout == "cnndetection" else 6)


def test_index_s3_lists_every_page(s3, bucket, monkeypatch):
    """Prefixes with more keys than one ListObjectsV2 page are listed page by page, to the end."""
    put_keys(s3, bucket, [f"d/g/0_real/{i}.png" for i in range(7)])
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    fs = storage.s3.fsspec_filesystem(opts)  # fsspec's cached instance: the one index_folder uses
    tokens = []
    call = fs._call_s3

    async def spy(method, *args, **kwargs):
        tokens.append((method, kwargs.get("MaxKeys"), kwargs.get("ContinuationToken") is not None))
        return await call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", spy)
    monkeypatch.setattr("ntf_ray.storage.s3.PAGE_KEYS", 3)
    assert index_folder(f"{bucket}/d", options=opts).num_rows == 7
    assert tokens == [("list_objects_v2", 3, False), ("list_objects_v2", 3, True), ("list_objects_v2", 3, True)]


def test_index_s3_glob_characters_and_hidden_keys(s3, bucket):
    keys = [f"ds/progan/1_fake/{n}" for n in GLOB_NAMES] + [
        "ds/progan/0_real/.hidden.png", "ds/progan/.cache/0_real/h.png", "ds/progan/0_real//double.png"]
    put_keys(s3, bucket, keys)
    table = index_folder(f"{bucket}/ds", options=StorageOptions(endpoint_url=s3.endpoint_url))
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == len(GLOB_NAMES) + 1
    assert sorted(uris) == sorted([f"{bucket}/ds/progan/1_fake/{n}" for n in GLOB_NAMES]
                                  + [f"{bucket}/ds/progan/0_real//double.png"])  # the key verbatim
    assert set(table.column("generator").to_pylist()) == {"progan"}
    assert table.column("label").to_pylist().count(0) == 1


def test_index_s3_bucket_root_and_flat_sets(s3, bucket):
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    put_keys(s3, bucket, ["0_real/a.png", "1_fake/b.png", "flat/train/ai/c.png"])
    with pytest.raises(ValueError, match="mixes two layouts"):
        index_folder(bucket, options=opts)
    put_keys(s3, bucket, ["cnn/0_real/a.png", "cnn/1_fake/b.png"])
    # A flat set takes the last prefix component (the bucket's name at the bucket root).
    assert index_folder(f"{bucket}/cnn", options=opts).column("generator").to_pylist() == ["cnn", "cnn"]
    assert index_folder(f"{bucket}/flat", options=opts).to_pylist() == [
        {"uri": f"{bucket}/flat/train/ai/c.png", "label": 1, "generator": "flat", "split": "train"}]


def test_index_s3_errors(s3, bucket):
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    put_keys(s3, bucket, ["imgs/a.png", "imgs/b/c.png", "notes/readme.txt"])
    with pytest.raises(FileNotFoundError, match=f"no objects under {bucket}/missing/"):
        index_folder(f"{bucket}/missing", options=opts)
    with pytest.raises(FileNotFoundError, match=f"no objects under {bucket}/imgs/a.png/"):
        index_folder(f"{bucket}/imgs/a.png", options=opts)  # an object, not a prefix
    with pytest.raises(ValueError, match="2 images under .* but none in a known layout") as info:
        index_folder(f"{bucket}/imgs", options=opts)
    assert_names_both_layouts(str(info.value))
    with pytest.raises(ValueError, match="no images under") as info:
        index_folder(f"{bucket}/notes", options=opts)
    assert_names_both_layouts(str(info.value))


# --- manifest I/O ------------------------------------------------------------------------


def sample_table() -> pa.Table:
    return manifest_table([
        {"uri": "s3://bucket/a.png", "label": 0, "generator": "real", "split": "train"},
        {"uri": "/data/b.png", "label": 1, "generator": "progan", "split": "test", "extra": "dropped"},
        {"uri": "/data/c.png", "label": None, "generator": None, "split": None},
        {"uri": "/data/d.png", "label": 1, "generator": "1", "split": "val"},  # a numeric-looking name
    ])


def test_manifest_table_schema_and_defaults():
    table = sample_table()
    assert table.schema == MANIFEST_SCHEMA
    only_uri = manifest_table([{"uri": "/x.png"}])
    assert only_uri.to_pylist() == [{"uri": "/x.png", "label": None, "generator": None, "split": None}]
    assert manifest_table([]).num_rows == 0


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_manifest_round_trip_local(tmp_path, suffix):
    table = sample_table()
    uri = str(tmp_path / "sub" / f"m.{suffix}")
    write_manifest(table, uri)
    back = read_manifest(uri)
    assert back.schema == MANIFEST_SCHEMA
    assert back.equals(table)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"m.{suffix}"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_manifest_round_trip_s3(bucket, s3, suffix):
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    table = sample_table()
    uri = f"{bucket}/manifests/m.{suffix}"
    write_manifest(table, uri, opts)
    assert storage.exists(uri, opts)
    assert read_manifest(uri, opts).equals(table)


FAMILY_RECORDS = [
    {"uri": "/d/progan/0_real/a.png", "label": 0, "generator": "progan", "split": "test", "family": "gan"},
    {"uri": "/d/progan/1_fake/b.png", "label": 1, "generator": "progan", "split": "test", "family": "gan"},
    {"uri": "/d/ldm/1_fake/c.png", "label": 1, "generator": "ldm", "split": "test", "family": "dm", "extra": 1},
    {"uri": "/d/x/1_fake/d.png", "label": 1, "generator": "x", "split": "test", "family": None},
    {"uri": "/d/y/1_fake/e.png", "label": 1, "generator": "y", "split": "test"},  # no family key: null
    {"uri": "/d/z/1_fake/f.png", "label": 1, "generator": "z", "split": "test", "family": "1"},  # numeric-looking
]


def test_family_column_kept_when_present():
    table = manifest_table(FAMILY_RECORDS)
    assert table.schema == manifest_schema(with_family=True)
    assert table.column_names == ["uri", "label", "generator", "split", "family"]
    assert table.column("family").to_pylist() == ["gan", "gan", "dm", None, None, "1"]
    # Without the key, no family column: the schema is exactly as before.
    without = [{k: v for k, v in r.items() if k != "family"} for r in FAMILY_RECORDS]
    assert manifest_table(without).schema == MANIFEST_SCHEMA
    # validate_manifest keeps family (cast to string) and still drops other columns.
    raw = pa.table({"uri": ["a.png", "b.png"], "family": [7, None], "other": ["x", "y"]})
    checked = validate_manifest(raw)
    assert checked.column_names == ["uri", "label", "generator", "split", "family"]
    assert checked.column("family").to_pylist() == ["7", None]
    assert select(table, generators=["progan"]).column("family").to_pylist() == ["gan", "gan"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_family_round_trip(tmp_path, s3, bucket, suffix):
    table = manifest_table(FAMILY_RECORDS)
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    for uri, options in ((str(tmp_path / f"m.{suffix}"), None), (f"{bucket}/m.{suffix}", opts)):
        write_manifest(table, uri, options)
        back = read_manifest(uri, options)
        assert back.schema == manifest_schema(with_family=True)
        assert back.equals(table)
    # A hand-made CSV with a family column, in any position.
    path = tmp_path / "hand.csv"
    path.write_text("family,uri,label\ngan,/a.png,0\n,/b.png,1\n")
    assert read_manifest(str(path)).column("family").to_pylist() == ["gan", None]


def test_synth_records_carry_family(tmp_path):
    from ntf_ray.synth import make_synthetic

    records = make_synthetic(tmp_path, n_real=2, n_fake=2, size=16, splits={"test": 1.0}, generators=("tconv",),
                             workers=1)
    table = manifest_table(records)
    assert table.column("family").to_pylist() == [r["family"] for r in records]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_relative_local_uris_resolve_against_manifest_folder(tmp_path, monkeypatch, suffix):
    folder = tmp_path / "set"
    table = manifest_table([{"uri": "imgs/a.png", "label": 0}, {"uri": "/abs/b.png", "label": 1},
                            {"uri": "s3://bucket/c.png", "label": 1}])
    write_manifest(table, str(folder / f"m.{suffix}"))
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    back = read_manifest(f"set/m.{suffix}")
    assert back.column("uri").to_pylist() == [str(folder / "imgs" / "a.png"), "/abs/b.png", "s3://bucket/c.png"]


def test_csv_written_by_hand(tmp_path):
    """A spreadsheet-made CSV: columns in any order, some missing, empty cells are nulls."""
    path = tmp_path / "hand.csv"
    path.write_text("split,uri,label\ntrain,a.png,0\n,b.png,\ntest,c.png,1\n")
    back = read_manifest(str(path))
    assert back.schema == MANIFEST_SCHEMA
    assert back.to_pylist() == [
        {"uri": str(tmp_path / "a.png"), "label": 0, "generator": None, "split": "train"},
        {"uri": str(tmp_path / "b.png"), "label": None, "generator": None, "split": None},
        {"uri": str(tmp_path / "c.png"), "label": 1, "generator": None, "split": "test"},
    ]


def _write_raw(tmp_path: Path, table: pa.Table, suffix: str) -> str:
    path = tmp_path / f"raw.{suffix}"
    if suffix == "csv":
        pacsv.write_csv(table, str(path))
    else:
        pq.write_table(table, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"path": ["a.png"], "label": [0]}, r"no 'uri' column \(columns: \['path', 'label'\]\)"),
        ({"uri": ["a.png", "b.png"], "label": [0, 2]}, r"labels must be 0 \(real\), 1 \(fake\) or null, found \[2\] in 1 rows"),
        ({"uri": ["a.png"], "split": ["foo"]}, r"split must be one of \('train', 'val', 'test'\) or null, found \['foo'\] in 1 rows"),
        ({"uri": ["a.png"], "label": ["real"]}, r"columns do not fit the manifest schema"),
    ],
)
def test_invalid_manifests(tmp_path, suffix, columns, message):
    path = _write_raw(tmp_path, pa.table(columns), suffix)
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(path)
    assert path in str(info.value)  # the message names the file


def test_null_uri_is_a_clear_error(tmp_path):
    table = pa.table({"uri": pa.array(["a.png", None, None], pa.string()), "label": [0, 1, 0]})
    with pytest.raises(ValueError, match="manifest: 2 rows have no uri"):
        validate_manifest(table)
    path = _write_raw(tmp_path, table, "parquet")
    with pytest.raises(ValueError, match="2 rows have no uri"):
        read_manifest(path)
    csv = tmp_path / "m.csv"
    csv.write_text("uri,label\na.png,0\n,1\n")
    with pytest.raises(ValueError, match="1 rows have no uri"):
        read_manifest(str(csv))
    with pytest.raises(ValueError, match="1 rows have no uri"):
        manifest_table([{"uri": None, "label": 0}])


def test_write_manifest_validates(tmp_path):
    with pytest.raises(ValueError, match="labels must be"):
        write_manifest(pa.table({"uri": ["a.png"], "label": [3]}), str(tmp_path / "m.parquet"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="do not fit"):
        manifest_table([{"uri": "a.png", "label": "fake"}])


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("uri\na.png\n")
    with pytest.raises(ValueError, match=r"not a Parquet manifest.*must end in \.csv"):
        read_manifest(str(path))
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "missing.parquet"))


def test_select():
    table = manifest_table([
        {"uri": "a", "label": 0, "generator": "real", "split": "train"},
        {"uri": "b", "label": 1, "generator": "progan", "split": "train"},
        {"uri": "c", "label": 1, "generator": "biggan", "split": "train"},
        {"uri": "d", "label": 1, "generator": "progan", "split": "test"},
        {"uri": "e", "label": None, "generator": None, "split": None},
    ])

    def uris(t):
        return t.column("uri").to_pylist()

    assert select(table) is table
    assert uris(select(table, split="train")) == ["a", "b", "c"]
    assert uris(select(table, labels=[1])) == ["b", "c", "d"]
    assert uris(select(table, labels=(0, 1))) == ["a", "b", "c", "d"]
    assert uris(select(table, generators=["progan"])) == ["b", "d"]
    assert uris(select(table, split="train", labels=[1], generators=["progan", "real"])) == ["b"]
    assert select(table, split="val").num_rows == 0
    assert select(table, split="val").schema == MANIFEST_SCHEMA


# --- ManifestDataset ---------------------------------------------------------------------


def two_crops(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A transform with two outputs, like the training views."""
    assert img.dtype == torch.uint8 and img.shape == (3, SIDE, SIDE)
    x = img.float() / 255
    return x[:, :32, :32], x[:, -16:, -16:].flip(-1)


@pytest.fixture
def image_set(tmp_path) -> tuple[pa.Table, list[np.ndarray]]:
    """Four good PNGs, one corrupt file (index 2) and one missing file (index 4)."""
    records, pixels = [], []
    for i in range(4):
        data = png_bytes(i)
        path = tmp_path / f"img{i}.png"
        path.write_bytes(data)
        records.append({"uri": str(path), "label": i % 2, "generator": "g", "split": "train"})
        pixels.append(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes(9)[:60])  # a truncated PNG
    records.insert(2, {"uri": str(corrupt), "label": 1})
    records.insert(4, {"uri": str(tmp_path / "missing.png"), "label": 0})
    records.append({"uri": records[0]["uri"], "label": None})  # unlabelled -> -1
    return manifest_table(records), pixels


def test_manifest_dataset_items(image_set, caplog):
    table, pixels = image_set
    ds = ManifestDataset(table, two_crops, keys=("view1", "view2"))
    assert len(ds) == 7
    item = ds[0]
    assert set(item) == {"view1", "view2", "label", "index"}
    expected = torch.from_numpy(pixels[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["view1"], expected[:, :32, :32], rtol=0, atol=0)
    torch.testing.assert_close(item["view2"], expected[:, -16:, -16:].flip(-1), rtol=0, atol=0)
    assert item["label"].dtype == torch.long and item["label"].item() == 0
    assert item["index"].item() == 0
    assert ds[1]["label"].item() == 1
    assert ds[2] is None  # corrupt
    assert ds[4] is None  # missing
    assert ds[6]["label"].item() == -1
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text


def test_manifest_dataset_single_output_and_key_mismatch(image_set):
    table, _ = image_set
    item = ManifestDataset(table, lambda img: img[:, :8, :8])[0]
    assert set(item) == {"image", "label", "index"} and item["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="2 parts for keys"):
        ManifestDataset(table, two_crops)[0]


def test_manifest_dataset_max_pixels(image_set):
    table, _ = image_set
    ds = ManifestDataset(table, two_crops, keys=("a", "b"), max_pixels=SIDE * SIDE - 1)
    assert ds[0] is None


def test_collate_drop_none(image_set):
    table, _ = image_set
    ds = ManifestDataset(table, two_crops, keys=("view1", "view2"))
    batch = collate_drop_none([ds[i] for i in range(len(ds))])
    assert batch["dropped"] == 2
    assert batch["view1"].shape == (5, 3, 32, 32) and batch["view2"].shape == (5, 3, 16, 16)
    assert batch["label"].tolist() == [0, 1, 0, 1, -1]
    assert batch["index"].tolist() == [0, 1, 3, 5, 6]
    assert collate_drop_none([None, None]) == {"dropped": 2}


def test_dataloader_over_manifest_dataset(image_set):
    table, _ = image_set
    ds = ManifestDataset(table, two_crops, keys=("view1", "view2"))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, num_workers=0, collate_fn=collate_drop_none)
    batches = list(loader)
    assert len(batches) == 3
    assert sum(b["dropped"] for b in batches) == 2
    seen = torch.cat([b["index"] for b in batches if "index" in b]).tolist()
    assert seen == [0, 1, 3, 5, 6]
    assert all(b["view1"].dtype == torch.float32 for b in batches if "view1" in b)


def test_manifest_dataset_over_s3(s3, bucket, caplog):
    opts = StorageOptions(endpoint_url=s3.endpoint_url)
    good = f"{bucket}/imgs/0_real/a.png"
    storage.write_bytes(good, png_bytes(1), opts)
    table = manifest_table([{"uri": good, "label": 0}, {"uri": f"{bucket}/imgs/gone.png", "label": 1}])
    ds = ManifestDataset(table, two_crops, keys=("view1", "view2"), options=opts)
    assert ds[0]["view1"].shape == (3, 32, 32)
    assert ds[1] is None
    assert "gone.png" in caplog.text and FAKE_SECRET_ACCESS_KEY not in caplog.text


# --- ntf-ray index -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_cli_index(tmp_path, capsys, suffix):
    root = tmp_path / "data"
    make_files(root, WITH_SPLIT + SKIPPED)
    out = tmp_path / "out" / f"m.{suffix}"
    assert cli_main(["index", str(root), "--out", str(out)]) == 0
    assert "indexed 7 images (4 real, 3 fake)" in capsys.readouterr().out
    assert rows(read_manifest(str(out))) == rows(index_folder(root))


def test_cli_index_split_flag(tmp_path):
    make_files(tmp_path / "data", ["progan/0_real/a.png"])
    out = tmp_path / "m.parquet"
    assert cli_main(["index", str(tmp_path / "data"), "--out", str(out), "--split", "val"]) == 0
    assert read_manifest(str(out)).column("split").to_pylist() == ["val"]


def test_cli_index_to_s3(s3, bucket, tmp_path, capsys):
    make_files(tmp_path / "data", ["progan/0_real/a.png", "progan/1_fake/b.png"])
    out = f"{bucket}/manifests/m.parquet"
    assert cli_main(["index", str(tmp_path / "data"), "--out", out, "--s3-endpoint", s3.endpoint_url]) == 0
    assert read_manifest(out, StorageOptions(endpoint_url=s3.endpoint_url)).num_rows == 2
    assert FAKE_SECRET_ACCESS_KEY not in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["missing", "empty", "no_label_folders"])
def test_cli_index_bad_root(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_label_folders":
        make_files(root, ["progan/a.png"])
    out = tmp_path / "m.parquet"
    assert cli_main(["index", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntf-ray index: error: ") and str(root) in err
    assert not out.exists()


def test_flat_layout_uses_the_root_name_as_generator(tmp_path):
    from PIL import Image

    from ntf_ray.training.datasets import index_folder

    root = tmp_path / "mydata"
    for label in ("0_real", "1_fake"):
        (root / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / label / "a.png")
    table = index_folder(root)
    assert table.column("generator").to_pylist() == ["mydata", "mydata"]
    assert table.column("label").to_pylist() == [0, 1]


def test_cli_index_reads_an_s3_root(s3, bucket, tmp_path):
    put_keys(s3, bucket, ["d/sd14/val/ai/a.png", "d/sd14/val/nature/b.png"])
    out = tmp_path / "m.parquet"
    assert cli_main(["index", f"{bucket}/d", "--out", str(out), "--s3-endpoint", s3.endpoint_url]) == 0
    table = read_manifest(str(out))
    assert table.column("uri").to_pylist() == [f"{bucket}/d/sd14/val/ai/a.png", f"{bucket}/d/sd14/val/nature/b.png"]
    assert table.column("label").to_pylist() == [1, 0] and set(table.column("split").to_pylist()) == {"test"}


@pytest.mark.timeout(60)
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "m.parquet")
    (tmp_path / "z.csv").symlink_to("/dev/zero")
    for odd in ("m.parquet", "z.csv"):
        with pytest.raises(ValueError, match="manifest .* not a regular file"):
            read_manifest(str(tmp_path / odd))
