"""Fault drills for the scan on a local Ray: awkward objects, transient S3 failures and their
retry by ``moderate``, re-submitted and overlapping runs, a detector actor and a driver killed
mid-scan. Each ends with exactly one row per object and nothing published from a failed attempt."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.ray_edge import scan as ray_scan
from ntf_ray.scan import lock
from ntf_ray.scan.publish import staging_dir
from ntf_ray.scan.table import SUMMARY, completed_runs
from ntf_ray.synth import make_synthetic
from tests.conftest import save_random_detector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """Where a fake Ghostscript writes if anything ever runs it."""
    return tmp_path_factory.mktemp("gs") / "ran"


@pytest.fixture(scope="module")
def drill_ray(s3, marker):
    """A local Ray whose workers find fake ``gs``/``gsc`` executables first on their PATH."""
    import ray

    bin_dir = marker.parent / "bin"
    bin_dir.mkdir()
    for name in ("gs", "gsc", "gswin32c", "gswin64c", "inkscape", "convert", "magick"):
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\necho $0 >> {marker}\nexit 1\n")
        exe.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


def _published(out: str, options: storage.StorageOptions | None = None) -> pa.Table:
    fs, path = storage.arrow_filesystem(out, options)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def _png(side: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (side, side, len(mode)), dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _awkward_objects() -> dict[str, bytes]:
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    eps = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(eps, "EPS")
    rgba = Image.new("RGBA", (5000, 5000), (255, 0, 0, 128))
    big = io.BytesIO()
    rgba.save(big, "PNG")
    names = ["*", "photo[1].png", "x?y.png", "{a,b}.png", "]bracket.png", "sp ace.png", "pct%41.png", "naïve.png",
             "n" * (1024 - len("awk/") - 4) + ".png"]
    objects = {f"awk/{n}": _png(40, i) for i, n in enumerate(names)}
    objects.update({"awk/empty.jpg": b"", "awk/vector.eps": eps.getvalue(), "awk/doc.pdf": b"%PDF-1.4\n%\xe2\xe3\n1 0 obj<<>>endobj\n",
                    "awk/logo.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                    "awk/rgba5000.png": big.getvalue(), "awk/truncated.jpg": jpeg.getvalue()[:-400]})
    return objects


def test_a_bucket_of_awkward_objects_gives_one_honest_row_each_and_runs_no_program(drill_ray, s3, tmp_path, marker):
    name = s3.create_bucket()
    objects = _awkward_objects()
    for key, body in objects.items():
        s3.client().put_object(Bucket=name, Key=key, Body=body)
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    assert main(["scan", "--input", f"s3://{name}/awk", "--model", model, "--output", out, "--run-id", "awk",
                 "--s3-endpoint", s3.endpoint_url, "--batch-size", "4"]) == 0
    rows = {r["uri"][len(f"s3://{name}/"):]: r for r in _published(out).to_pylist()}
    assert sorted(rows) == sorted(objects)
    errors = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert errors == {
        "awk/empty.jpg": "decode: empty file",
        "awk/vector.eps": "unsupported_format: EPS",
        "awk/doc.pdf": "unsupported_format: PDF",
        "awk/logo.svg": "unsupported_format: SVG",
        "awk/truncated.jpg": "decode: truncated image",
    }
    assert all(r["score"] is not None for k, r in rows.items() if k not in errors)  # the 5000x5000 RGBA PNG too
    assert not marker.exists(), marker.read_text()


def test_a_local_folder_with_a_3gb_sparse_file_and_odd_names(drill_ray, tmp_path, marker):
    src = tmp_path / "in"
    src.mkdir()
    for i, n in enumerate(["new\nline.png", "tab\t.png", "ok.png"]):
        (src / n).write_bytes(_png(40, i))
    with open(src / "huge.jpg", "wb") as f:
        f.truncate(3 * 2**30)
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    assert main(["scan", "--input", str(src), "--model", model, "--output", out, "--run-id", "local"]) == 0
    rows = {Path(r["uri"]).name: r for r in _published(out).to_pylist()}
    assert sorted(rows) == sorted(["new\nline.png", "tab\t.png", "ok.png", "huge.jpg"])
    assert rows["huge.jpg"]["error"].startswith("too_large: 3221225472 bytes > limit")
    assert all(rows[n]["score"] is not None for n in ("new\nline.png", "tab\t.png", "ok.png"))
    assert not marker.exists(), marker.read_text()


class _FaultProxy:
    """An HTTP proxy in front of moto that answers GETs of chosen keys with 503 SlowDown, or
    closes the connection (a reset), while ``failing`` says so."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlparse(upstream)
        self.slowdown: set[str] = set()
        self.reset: set[str] = set()
        self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = urllib.parse.unquote(self.path.split("?", 1)[0]).split("/", 2)[-1]
                if self.command == "GET" and key in proxy.reset:
                    proxy.failed += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == "GET" and key in proxy.slowdown:
                    proxy.failed += 1
                    data = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_moderate_retries_exactly_the_transient_failures_and_reruns_never_duplicate(drill_ray, s3, tmp_path):
    name = s3.create_bucket()
    make_synthetic(tmp_path / "src", n_real=6, n_fake=6, size=32, seed=3, splits={"test": 1.0})
    files = sorted(p for p in (tmp_path / "src").rglob("*.png"))
    keys = [f"in/{i:02d}.png" for i in range(len(files))]
    for key, f in zip(keys, files):
        s3.client().put_object(Bucket=name, Key=key, Body=f.read_bytes())
    proxy = _FaultProxy(s3.endpoint_url)
    proxy.slowdown = {keys[2], keys[5]}
    proxy.reset = {keys[8]}
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    args = ["moderate", "--input", f"s3://{name}/in", "--model", model, "--output", out, "--s3-endpoint", proxy.url,
            "--batch-size", "4"]

    assert main([*args, "--run-id", "night-1"]) == 0
    first = _published(out).to_pylist()
    failed = sorted(r["uri"].split("/", 3)[3] for r in first if r["error"])
    assert len(first) == len(keys) and failed == sorted([keys[2], keys[5], keys[8]]) and proxy.failed >= 9
    assert all(r["error"].startswith("read: ") for r in first if r["error"])
    night1 = json.loads(Path(completed_runs(out, storage.StorageOptions())[0], SUMMARY).read_text())
    assert (night1["listed"], night1["rows"], night1["scored"], night1["errors_by_kind"]) == (len(keys), len(keys),
                                                                                                len(keys) - 3, {"read": 3})

    proxy.slowdown, proxy.reset = set(), set()
    for _ in range(2):  # the retry, then the same command again (a scheduler's retry)
        assert main([*args, "--run-id", "night-2"]) == 0
        second = [r for r in _published(out).to_pylist() if r["run_id"] == "night-2"]
        assert sorted(r["uri"].split("/", 3)[3] for r in second) == failed
        assert all(r["error"] is None and r["score"] is not None for r in second)
    assert main(args) == 0  # no run id: a new run, nothing left to score
    runs = {d.rsplit("run_id=", 1)[1]: d for d in completed_runs(out, storage.StorageOptions())}
    assert len(runs) == 3
    last = max(set(runs) - {"night-1", "night-2"})
    summary = json.loads(Path(runs[last], SUMMARY).read_text())
    assert summary["rows"] == 0 and summary["skipped"] == len(keys)
    night2 = json.loads(Path(runs["night-2"], SUMMARY).read_text())
    assert (night2["listed"], night2["rows"], night2["scored"], night2["skipped"], night2["errors"]) == (
        len(keys), 3, 3, len(keys) - 3, 0)
    final = [r for r in _published(out).to_pylist() if r["error"] is None]
    assert sorted(r["uri"] for r in final) == sorted(f"s3://{name}/{k}" for k in keys)  # one scored row each


def _actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in cmd and "DetectorActor" in cmd:
                pids.append(int(proc.name))
    return pids


def test_a_detector_actor_killed_mid_scan_costs_no_row(drill_ray, tmp_path):
    make_synthetic(tmp_path / "src", n_real=60, n_fake=60, size=48, seed=4, splits={"test": 1.0})
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    killed: list[int] = []

    def killer():
        staged = Path(staging_dir(out, "kill-actor"))
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            pids = _actor_pids()
            if pids and staged.is_dir() and any(staged.rglob("*.parquet")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(["scan", "--input", str(tmp_path / "src"), "--model", model, "--output", out, "--run-id", "kill-actor",
                 "--batch-size", "2", "--read-block-rows", "4", "--max-actors", "1"]) == 0
    thread.join(timeout=5)
    assert killed, "the drill never found a detector actor to kill"
    rows = _published(out)
    n = len(list((tmp_path / "src").rglob("*.png")))
    assert rows.num_rows == n == len(set(rows.column("uri").to_pylist()))
    assert rows.column("error").null_count == n  # the batch in flight was retried on the restarted actor


def test_a_driver_killed_mid_scan_publishes_nothing_and_its_resubmission_completes(drill_ray, tmp_path):
    make_synthetic(tmp_path / "src", n_real=60, n_fake=60, size=48, seed=5, splits={"test": 1.0})
    model = save_random_detector(str(tmp_path / "model"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ntf_ray", "scan", "--input", str(tmp_path / "src"), "--model", model,
               "--output", str(out), "--run-id", "killed", "--batch-size", "2", "--read-block-rows", "4",
               "--max-actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": drill_ray}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = Path(staging_dir(str(out), "killed"))
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (staged.is_dir() and any(staged.rglob("*.parquet"))):
        time.sleep(0.1)
    assert driver.poll() is None, "the scan ended before the drill could kill it"
    driver.kill()
    driver.wait(timeout=30)
    assert completed_runs(str(out), storage.StorageOptions()) == []
    assert not list(out.glob("dt=*"))  # nothing published: readers see no rows of the killed attempt
    assert _readers_see(out) == (0, 0)  # though the staging folder holds rows

    assert main(command[3:]) == 0  # resubmitted with the same run id, in this process
    rows = _published(str(out))
    n = len(list((tmp_path / "src").rglob("*.png")))
    assert rows.num_rows == n == len(set(rows.column("uri").to_pylist()))
    # the resubmission removed its own staging; the killed attempt's stays until it is silent for
    # STALE_S (until then it cannot be told from an attempt still running), then the next one sweeps it
    left = {p.name for p in staged.iterdir()}
    assert len(left) == 2 and {n.split("-", 1)[0].split("=", 1)[0] for n in left} == {"attempt", "_alive"}
    assert len(lock.sweep_attempts(str(out), "killed", storage.StorageOptions(), stale_s=0)) == 1
    assert not staged.exists()
    assert _readers_see(out) == (n, n)


def _readers_see(out: Path) -> tuple[int, int]:
    """Rows the README's readers see under OUTPUT: DuckDB with the documented glob, and pyarrow."""
    import duckdb

    glob = f"{out}/dt=*/run_id=*/*.parquet"
    con = duckdb.connect()
    if con.execute(f"SELECT count(*) FROM glob('{glob}')").fetchone()[0] == 0:
        by_duckdb = 0  # read_parquet refuses a glob without files: a reader sees nothing
    else:
        by_duckdb = con.execute(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchone()[0]
    by_pyarrow = pads.dataset(str(out), format="parquet", partitioning="hive").count_rows() if out.exists() else 0
    return by_duckdb, by_pyarrow


class PoisonActor(ray_scan.DetectorActor):
    """A detector whose process dies on one object, every time (a decoder that crashes its worker)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if any(u.endswith("poison.png") for u in batch.column("uri").to_pylist()):
            os._exit(1)
        return super().__call__(batch)


def test_an_object_that_kills_its_actor_every_time_costs_only_its_own_row_and_ends_as_poison(drill_ray, tmp_path,
                                                                                              monkeypatch):
    make_synthetic(tmp_path / "src", n_real=8, n_fake=8, size=32, seed=6, splits={"test": 1.0})
    (tmp_path / "src" / "poison.png").write_bytes(_png(32, 9))
    model = save_random_detector(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    monkeypatch.setattr(ray_scan, "DetectorActor", PoisonActor)
    assert main(["moderate", "--input", str(tmp_path / "src"), "--model", model, "--output", out, "--run-id", "p1",
                 "--batch-size", "2", "--read-block-rows", "4", "--max-actors", "1"]) == 0
    rows = {Path(r["uri"]).name: r for r in _published(out).to_pylist()}
    n = len(list((tmp_path / "src").rglob("*.png")))
    assert len(rows) == n
    # the objects batched and queued with the poison were scored again in smaller groups, in this run
    assert sorted(k for k, r in rows.items() if r["error"] is not None) == ["poison.png"]
    assert rows["poison.png"]["error"].startswith("worker_lost: its worker died each time it was scored alone (2 ")
    assert all(r["score"] is not None for k, r in rows.items() if k != "poison.png")
    # worker_lost is retried: the next moderate scores the poison again, alone, and it is lost a third time
    assert main(["moderate", "--input", str(tmp_path / "src"), "--model", model, "--output", out, "--run-id", "p2",
                 "--batch-size", "1", "--read-block-rows", "1", "--max-actors", "1"]) == 0
    again = {Path(r["uri"]).name: r for r in _published(out).to_pylist() if r["run_id"] == "p2"}
    assert sorted(again) == ["poison.png"]
    assert again["poison.png"]["error"].startswith("poison: ")
