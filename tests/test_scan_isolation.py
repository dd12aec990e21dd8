"""No file can blind a scan: in a bucket or a folder where every read block holds a poison
object (bombs, a BMP of absurd width, a JPEG cut short, one whose scoring raises, one that
kills its worker), every ordinary image is scored in the first run, each poison gets exactly
one error row, and the worker-killer is retried until it is marked poison, then never again.
A detector that scores NaN stops the run; nothing of it is published."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.errors import POISON_AFTER, SOLO_ATTEMPTS
from ntf_ray.ray_edge import scan as ray_scan
from tests import bombs
from tests.awkward import texture
from tests.conftest import save_nan_detector, save_random_detector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KILL = b"KILL-MY-WORKER"
RAISE = b"RAISE-WHILE-SCORING"
BLOCK = 6  # objects per read block: every block of the listing holds one poison


class PoisonActor(ray_scan.DetectorActor):
    """The scan's detector, whose process dies on one object every time (a decoder crash), and
    whose scoring raises on another (a bug one file finds)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if any(KILL in bytes(d) for d in batch.column("data").to_pylist() if d is not None):
            os._exit(1)
        return super().__call__(batch)

    def _score(self, data):
        if any(RAISE in bytes(d) for d in data):
            raise RuntimeError("a decoder bug this one file finds")
        return super()._score(data)


CRASH = b"CRASH-THE-DECODER"


class CrashingDecoderActor(ray_scan.DetectorActor):
    """The scan's detector whose decoder crashes natively (a segmentation fault in the worker
    process, as a broken codec library would) on any file that holds ``CRASH``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import ctypes

        from ntf_ray.detector import scorer

        real = scorer.decode

        def crashing(data, *a, **kw):
            if CRASH in bytes(data):
                ctypes.string_at(0)  # reads address 0: SIGSEGV, the process dies in native code
            return real(data, *a, **kw)

        scorer.decode = crashing  # in this actor's process only


def _ordinary(i: int) -> tuple[str, bytes]:
    img = Image.fromarray(texture(40 + i % 7, 48 + i % 5, seed=i))
    fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return ext, buf.getvalue()


def _poisons() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what its row's error starts with; "" for one that must be scored)."""
    made = bombs.bombs(small=True)
    killer = _ordinary(1)[1] + KILL  # an ordinary PNG but for its trailing bytes
    raiser = _ordinary(2)[1] + RAISE
    return {
        "absurd-width.bmp": (made["absurd-width.bmp"], "too_large: "),
        "huge-tile.tif": (made["huge-tile.tif"], "too_large: TIFF tiles"),
        "many-scans.jpg": (made["many-scans.jpg"], "too_large: more than 500 scans"),
        "hiding.ico": (bombs.ico_hiding(12000), "too_large: an embedded icon image"),
        "cut-with-eoi.jpg": (made["cut-with-eoi.jpg"], "decode: truncated image"),
        "raises.webp": (raiser, "decode: failed while scoring (RuntimeError"),
        "kills-its-worker.png": (killer, "worker_lost: "),
        "sliver.png": (made["sliver.png"], ""),  # a bomb of memory once; now cropped first and scored
    }


def _objects() -> tuple[dict[str, bytes], dict[str, str]]:
    """Names interleaved so that each block of BLOCK listed objects holds one poison, in its
    middle: when its actor dies, batches are queued behind it as well as ahead."""
    poisons = _poisons()
    objects, expected = {}, {}
    k = 0
    for name, (data, error) in poisons.items():
        for slot in range(BLOCK):
            if slot == BLOCK // 2:
                objects[f"{k:03d}-{name}"] = data
                expected[f"{k:03d}-{name}"] = error
            else:
                ext, body = _ordinary(k)
                objects[f"{k:03d}.{ext}"] = body
                expected[f"{k:03d}.{ext}"] = ""
            k += 1
    return objects, expected


def _published(out: str) -> pa.Table:
    fs, path = storage.arrow_filesystem(out)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_poison_in_every_block_costs_only_its_own_row_and_the_killer_is_retried_until_poison(
        local_ray, s3, tmp_path, monkeypatch, where):
    objects, expected = _objects()
    if where == "bucket":
        name = s3.create_bucket()
        for key, body in objects.items():
            s3.client().put_object(Bucket=name, Key=f"up/{key}", Body=body)
        source, base = f"s3://{name}/up/", f"s3://{name}/up/"
    else:
        (tmp_path / "src").mkdir()
        for key, body in objects.items():
            (tmp_path / "src" / key).write_bytes(body)
        source, base = str(tmp_path / "src"), str(tmp_path / "src") + "/"
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    monkeypatch.setattr(ray_scan, "DetectorActor", PoisonActor)
    args = ["moderate", "--input", source, "--model", model, "--output", out, "--s3-endpoint", s3.endpoint_url,
            "--read-block-rows", str(BLOCK), "--batch-size", str(BLOCK), "--max-actors", "1"]

    assert main([*args, "--run-id", "p1"]) == 0
    rows = {r["uri"][len(base):]: r for r in _published(out).to_pylist()}
    assert sorted(rows) == sorted(objects)  # one row per object
    for key, want in expected.items():
        row = rows[key]
        if want:
            assert row["error"] is not None and row["error"].startswith(want), (key, row["error"])
            assert row["score"] is None and row["is_fake"] is None
        else:  # every ordinary image scored, the sliver and the killer's and raiser's neighbours included
            assert row["error"] is None and 0.0 <= row["score"] <= 1.0, (key, row["error"])
    killer = next(k for k in rows if k.endswith("kills-its-worker.png"))
    assert f"({SOLO_ATTEMPTS} alone in this run, {SOLO_ATTEMPTS} of {POISON_AFTER}" in rows[killer]["error"]
    assert rows[next(k for k in rows if k.endswith("absurd-width.bmp"))]["width"] is None  # 2**32 - 127: no int32
    assert sum(1 for r in rows.values() if (r["error"] or "").startswith("worker_lost")) == 1

    # the next moderate retries the killer alone (no neighbour is lost with it) and marks it poison
    assert main([*args, "--run-id", "p2"]) == 0
    second = {r["uri"][len(base):]: r for r in _published(out).to_pylist() if r["run_id"] == "p2"}
    assert list(second) == [killer]
    assert second[killer]["error"].startswith(f"poison: its worker died each time it was scored alone ({POISON_AFTER} ")

    # poison is final: a third moderate scores nothing at all
    assert main([*args, "--run-id", "p3"]) == 0
    third = _published(out).to_pylist()
    assert not [r for r in third if r["run_id"] == "p3"]
    summary = json.loads(next(Path(out).glob("dt=*/run_id=p3/_summary.json")).read_text())
    assert (summary["listed"], summary["skipped"], summary["rows"]) == (len(objects), len(objects), 0)


def _jpegs(folder: Path, n: int, crash_at: set[int]) -> list[str]:
    folder.mkdir()
    names = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(texture(40, 48, seed=i)).save(buf, "JPEG", quality=90)
        body = buf.getvalue()
        if i in crash_at:  # a comment segment before the frame: Pillow reads it while decoding the header
            body = body[:2] + b"\xff\xfe" + (len(CRASH) + 2).to_bytes(2, "big") + CRASH + body[2:]
        (folder / f"{i:02d}.jpg").write_bytes(body)
        names.append(f"{i:02d}.jpg")
    return names


def test_one_crashing_file_in_a_small_moderate_costs_its_own_row_and_reaches_poison(local_ray, tmp_path, monkeypatch):
    """Twelve new JPEGs in one read block, one of which crashes its decoder's process: the run
    publishes eleven scores and one ``worker_lost`` row, and the next runs try that file
    alone until it is ``poison``, never stopping a run."""
    names = _jpegs(tmp_path / "src", 12, {5})
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    monkeypatch.setattr(ray_scan, "DetectorActor", CrashingDecoderActor)
    args = ["moderate", "--input", str(tmp_path / "src"), "--model", model, "--output", out,
            "--max-actors", "1", "--batch-size", "4"]  # the default read block (128) holds all twelve

    assert main([*args, "--run-id", "c1"]) == 0
    rows = {Path(r["uri"]).name: r for r in _published(out).to_pylist()}
    assert sorted(rows) == names
    assert rows["05.jpg"]["error"].startswith("worker_lost: its worker died each time it was scored alone")
    assert all(rows[n]["error"] is None and 0 <= rows[n]["score"] <= 1 for n in names if n != "05.jpg")

    assert main([*args, "--run-id", "c2"]) == 0
    second = {Path(r["uri"]).name: r for r in _published(out).to_pylist() if r["run_id"] == "c2"}
    assert list(second) == ["05.jpg"] and second["05.jpg"]["error"].startswith("poison: ")


def _small_moderate(tmp_path: Path, monkeypatch, actor: type, n: int, crash_at: set[int]) -> tuple[list[str], list[str]]:
    """``n`` new JPEGs (those in ``crash_at`` crash their decoder) scored by ``actor``: their
    names, and the arguments of a ``moderate`` whose read block (the default, 128) holds them all."""
    names = _jpegs(tmp_path / "src", n, crash_at)
    model = save_random_detector(str(tmp_path / "model"))
    monkeypatch.setattr(ray_scan, "DetectorActor", actor)
    return names, ["moderate", "--input", str(tmp_path / "src"), "--model", model, "--output", str(tmp_path / "out"),
                   "--max-actors", "1", "--batch-size", "4"]


def test_a_run_of_only_crashing_files_is_published_and_they_reach_poison_not_a_stop(local_ray, tmp_path,
                                                                                   monkeypatch):
    """Every new object crashes its decoder: the detector still scores a known-good image, so
    the objects (not the detector) are at fault; the run publishes their ``worker_lost`` rows,
    and the next run, scoring them alone, makes them ``poison``. No upload can stop a run."""
    names, args = _small_moderate(tmp_path, monkeypatch, CrashingDecoderActor, 2, {0, 1})
    out = tmp_path / "out"

    assert main([*args, "--run-id", "a1"]) == 0
    rows = {Path(r["uri"]).name: r for r in _published(str(out)).to_pylist()}
    assert sorted(rows) == names
    assert all(r["error"].startswith("worker_lost: its worker died each time it was scored alone (2 alone")
               for r in rows.values()), rows
    assert main([*args, "--run-id", "a2"]) == 0
    second = {Path(r["uri"]).name: r for r in _published(str(out)).to_pylist() if r["run_id"] == "a2"}
    assert sorted(second) == names
    assert all(r["error"].startswith(f"poison: its worker died each time it was scored alone ({POISON_AFTER} ")
               for r in second.values()), second


class BrokenDetectorActor(ray_scan.DetectorActor):
    """A detector whose process dies on every image it decodes (a broken driver or codec)."""

    def _score(self, data):
        import ctypes

        ctypes.string_at(0)


def test_a_detector_that_dies_on_every_image_stops_the_run_and_counts_no_object_as_lost(local_ray, tmp_path,
                                                                                        monkeypatch, capsys):
    """When the known-good image kills its worker too, the detector is at fault: the run stops
    with one line and publishes nothing, and no object is counted towards ``poison``, so a
    broken node never turns real uploads into final rows, however often the run is retried."""
    _, args = _small_moderate(tmp_path, monkeypatch, BrokenDetectorActor, 2, set())
    out = tmp_path / "out"
    assert main([*args, "--run-id", "b1"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("ntf-ray moderate: error:"))
    assert "known-good image" in line and "no object is counted as lost" in line, line
    assert not list(out.glob("dt=*"))
    # nothing recorded against the uploads: the next run starts from nothing, as this one did
    assert not list(out.glob("_index/*/losses-*.parquet")) and not list(out.glob("_index/*/index.json"))


def test_a_detector_that_scores_nan_stops_the_scan_and_publishes_nothing(local_ray, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    for i in range(6):
        ext, body = _ordinary(i)
        (tmp_path / "src" / f"{i}.{ext}").write_bytes(body)
    model = save_nan_detector(str(tmp_path / "nan"))
    out = tmp_path / "out"
    code = main(["scan", "--input", str(tmp_path / "src"), "--model", model, "--output", str(out), "--run-id", "n1"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("ntf-ray scan: error:"))
    assert "NaN or infinity" in line and "none is written as a decision" in line
    assert not list(out.glob("dt=*"))  # no row of a broken detector reaches a reader


@pytest.mark.timeout(300)  # the bound: a stall in any one file would hold the scan past it
def test_a_scan_of_thousands_of_damaged_files_gives_one_row_each_and_no_lost_worker(local_ray, tmp_path):
    from tests.mutations import corpus

    (tmp_path / "src").mkdir()
    files = corpus(2000, seed=11)
    for i, (fmt, how, data) in enumerate(files):
        (tmp_path / "src" / f"{i:04d}-{how}.{fmt.lower()}").write_bytes(data)
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    assert main(["scan", "--input", str(tmp_path / "src"), "--model", model, "--output", out, "--run-id", "m1"]) == 0
    rows = _published(out)
    assert rows.num_rows == len(files) == len(set(rows.column("uri").to_pylist()))
    errors = [e for e in rows.column("error").to_pylist() if e is not None]
    kinds = {e.split(":")[0] for e in errors}
    assert kinds <= {"decode", "too_large", "unsupported_format"}, kinds  # no worker_lost, no poison
    assert not [e for e in errors if e.startswith("decode: failed while scoring")]  # nothing escaped decode
    assert rows.num_rows - len(errors) > 200  # and what still decodes is scored


def test_a_stream_that_writes_no_row_leaves_the_staging_folder_and_the_listing_in_it(local_ray, tmp_path,
                                                                                     monkeypatch):
    """Ray Data removes a folder it created for a write of no row; the scan's staging folder
    also holds the listing's chunks, written beside the stream, so it must never be one."""
    import pyarrow.parquet as pq
    import ray

    from ntf_ray.scan.spec import ScanSpec
    from ntf_ray.storage import StorageOptions

    names = _jpegs(tmp_path / "src", 2, {0, 1})
    block = pa.table({"uri": [str(tmp_path / "src" / n) for n in names]})
    staged = tmp_path / "staged"  # not there yet, as when the first window starts before the first chunk is staged
    monkeypatch.setattr(ray_scan, "DetectorActor", CrashingDecoderActor)
    spec = ScanSpec(model=save_random_detector(str(tmp_path / "model")), output=str(tmp_path / "out"),
                    max_actors=1, batch_size=2)
    ray_scan._write_rows([ray.put(block)], spec, 0.5, str(staged), StorageOptions())
    assert staged.is_dir()
    (staged / "_listing").mkdir()
    pq.write_table(block, staged / "_listing" / "000000.parquet")
    ray_scan._write_rows([ray.put(block)], spec, 0.5, str(staged), StorageOptions())
    assert (staged / "_listing" / "000000.parquet").is_file()
