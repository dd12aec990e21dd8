"""A new kind of input is one module: a ``Source`` subclass, registered. Here the module is
this test's ``MemorySource`` (objects held in the source itself, ``mem://name/key``): the scan
and ``moderate`` list, read and publish it end to end through the CLI with nothing else
changed, and its objects keep the scan's guarantees (one row each, errors as rows, versions
checked on read, the size cap applied before a read)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.scan.table import completed_runs
from ntf_ray.storage.source import ObjectChanged, ObjectTooLarge, Source, matches

from .conftest import save_random_detector

pytestmark = pytest.mark.timeout(600)


class MemorySource(Source):
    """Objects held in the source: it pickles with them into the scan's read tasks."""

    scheme = "mem"

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.reads: list[str] = []

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    def list(self, prefix, pattern, options):
        for uri in sorted(self.objects):
            if uri.startswith(prefix.rstrip("/") + "/") and matches(uri.rsplit("/", 1)[-1], pattern):
                data = self.objects[uri]
                yield {"uri": uri, "etag": self._etag(data), "size_bytes": len(data), "last_modified": None}

    def read_many(self, uris, options, *, etags, max_bytes):
        out = []
        for uri, etag in zip(uris, etags):
            data = self.objects.get(uri)
            if data is None:
                out.append(FileNotFoundError(uri))
            elif etag is not None and etag != self._etag(data):
                out.append(ObjectChanged(f"{uri} changed after it was listed"))
            elif max_bytes is not None and len(data) > max_bytes:
                out.append(ObjectTooLarge(f"more than {max_bytes} bytes"))
            else:
                out.append(data)
        return out


def _png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def memory_source():
    objects = {f"mem://shelf/img_{k}.png": _png(k) for k in range(6)}
    objects["mem://shelf/notes.png"] = b"not an image"
    objects["mem://shelf/huge.png"] = _png(9, size=400)
    objects["mem://elsewhere/other.png"] = _png(10)
    source = storage.register(MemorySource(objects))
    yield source
    storage.unregister("mem")


def _rows(out: str) -> dict[str, dict]:
    runs = completed_runs(out, storage.StorageOptions())
    table = pads.dataset([f"{r}/scores.parquet" for r in runs], format="parquet").to_table()
    return {r["uri"]: r for r in table.to_pylist()}


def test_a_registered_source_is_scanned_end_to_end(local_ray, memory_source, tmp_path, capsys):
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "scores")
    argv = ["--input", "mem://shelf", "--model", model, "--output", out, "--max-bytes", "20000",
            "--cpus-per-actor", "0.5"]
    assert main(["moderate", *argv, "--run-id", "m1"]) == 0
    rows = _rows(out)
    (run,) = completed_runs(out, storage.StorageOptions())
    assert sorted(p.name for p in Path(run).iterdir()) == ["_SUCCESS", "_summary.json", "scores.parquet"]  # the contract's names
    assert set(rows) == {u for u in memory_source.objects if u.startswith("mem://shelf/")}  # one row each, only these
    scored = [u for u, r in rows.items() if r["error"] is None]
    assert sorted(scored) == [f"mem://shelf/img_{k}.png" for k in range(6)]
    assert all(0.0 <= rows[u]["score"] <= 1.0 and rows[u]["width"] == 32 for u in scored)
    assert rows["mem://shelf/notes.png"]["error"].startswith("decode:")
    assert rows["mem://shelf/huge.png"]["error"].startswith("too_large:")  # from the listed size, never read
    assert rows["mem://shelf/img_0.png"]["etag"] == MemorySource._etag(memory_source.objects["mem://shelf/img_0.png"])

    memory_source.objects["mem://shelf/img_0.png"] = _png(99)  # a new version: moderate scores it again
    assert main(["moderate", *argv, "--run-id", "m2"]) == 0
    printed = capsys.readouterr().out
    assert "run m2" in printed and "8 listed, 7 skipped as already scored, 1 scored" in printed
