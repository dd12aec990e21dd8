"""The scan's control plane at scale: ``moderate`` from an inventory of N objects, all but
``--new`` of them already scored.

For each size N: a synthetic S3 Inventory report (a local copy: Parquet data files of N rows)
whose objects live in a bucket on moto's S3 server, of which only the ``--new`` newest exist
(tiny PNGs: no image is read for an object already scored); a model index holding every other
object, as ``moderate`` writes it; then ``ntf-ray moderate --inventory`` in a fresh process.
Printed per size: wall time, time to the first staged row (a file of scored rows in the
attempt's staging folder), the driver's peak private memory (RssAnon, sampled every 0.1 s),
the object store's peak (what ``/dev/shm`` grew by: Ray's store is a file there), objects
scored (must be ``--new``), and the control plane's
seconds per million objects: wall time less that of a run over the ``--new`` objects alone
(start-up and scoring), per million objects listed.

``--code PATH`` runs the ``ntf-ray`` of another checkout (``git worktree add /tmp/before REV``)
next to this one's, same sizes, same data: the before/after table of bench/README.md.

    python bench/scale_bench.py --sizes 1000000 3000000 --new 10000
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _moto():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(timeout=20)
    host, port = server._server.server_address[:2]
    return server, f"http://{host}:{port}"


def inventory(work: Path, n: int, new: int, bucket: str, uploaded: dict) -> str:
    """A local copy of an inventory report of ``n`` objects, the last ``new`` of them real; its manifest's path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = work / f"inv-{n}" / bucket / "daily"
    (config / "data").mkdir(parents=True, exist_ok=True)
    (config / "2026-12-05T01-00Z").mkdir(exist_ok=True)
    old = n - new
    files, per_file = [], 1_000_000
    for start in range(0, n, per_file):
        ids = np.arange(start, min(n, start + per_file))
        keys = [f"obj/{i:010d}.png" for i in ids]
        real = [uploaded.get(k) if i >= old else None for i, k in zip(ids, keys)]
        table = pa.table({
            "bucket": [bucket] * len(keys), "key": keys,
            "size": pa.array([r[2] if r else 1000 for r in real], pa.int64()),
            "last_modified_date": pa.array([r[1] if r else BASE for r in real], pa.timestamp("ms", tz="UTC")),
            "e_tag": [r[0] if r else _etag(i) for i, r in zip(ids, real)],
            "is_latest": [True] * len(keys), "is_delete_marker": [False] * len(keys)})
        path = config / "data" / f"part-{start // per_file:04d}.parquet"
        pq.write_table(table, path)
        files.append({"key": f"{bucket}/daily/data/{path.name}", "size": path.stat().st_size,
                      "MD5checksum": hashlib.md5(path.read_bytes()).hexdigest()})
    manifest = config / "2026-12-05T01-00Z" / "manifest.json"
    manifest.write_text(json.dumps({"sourceBucket": bucket, "destinationBucket": "arn:aws:s3:::inventory",
                                    "fileFormat": "Parquet", "fileSchema": "message s3.inventory {}", "files": files}))
    return str(manifest)


BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _etag(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def model(work: Path) -> tuple[str, str]:
    """A tiny detector (path, model id)."""
    import torch

    from ntf_ray.detector.artifact import load_artifact, save_artifact
    from ntf_ray.nn.model import Detector

    path = work / "model"
    if not (path / "model.json").exists():
        torch.manual_seed(0)
        save_artifact(str(path), Detector.build("tiny").eval(), input_size=16, threshold=0.5)
    return str(path), load_artifact(str(path)).model_id


_WRITE_INDEX = """
import sys, numpy as np, pyarrow as pa
from ntf_ray.scan.index import KEY_SCHEMA, write_index
from ntf_ray.storage import StorageOptions
out, model_id, bucket, old, base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ids = range(old)
pairs = pa.table({"uri": [f"s3://{bucket}/obj/{i:010d}.png" for i in ids],
                  "etag": [__import__("hashlib").md5(str(i).encode()).hexdigest() for i in ids],
                  "modified": pa.array(np.full(old, base), pa.int64())}, schema=KEY_SCHEMA)
write_index(out, model_id, pairs, {}, StorageOptions())
"""


def output_with_index(code: Path, out: Path, n: int, new: int, bucket: str, model_id: str) -> str:
    """A fresh output folder whose model index holds the ``n - new`` objects already scored,
    written by ``code``'s own ``write_index`` (its layout is the one its ``moderate`` reads)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    old = n - new
    if old:
        subprocess.run([sys.executable, "-c", _WRITE_INDEX, str(out), model_id, bucket, str(old),
                        str(int(BASE.timestamp() * 1e6))], check=True, cwd=code, env=dict(os.environ, PYTHONPATH=str(code)))
    return str(out)


def run(code: Path, manifest: str, model: str, out: str, endpoint: str, log: Path | None = None) -> dict:
    """``ntf-ray moderate`` of ``code`` in a process of its own: wall time, first staged row, RssAnon peak."""
    env = dict(os.environ, PYTHONPATH=str(code), AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    cmd = [sys.executable, "-m", "ntf_ray", "moderate", "--inventory", manifest, "--model", model, "--output", out,
           "--s3-endpoint", endpoint, "--cpus-per-actor", "0.5", "--stall-timeout", "never"]
    import shutil

    shm = shutil.disk_usage("/dev/shm").used  # Ray's object store lives there (a tmpfs: what is touched counts)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first, store = 0, None, 0
    staging = Path(out) / "_staging"
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
        store = max(store, (shutil.disk_usage("/dev/shm").used - shm) // 2**20)
        # the scored rows' files alone, not the listing's chunks one level down: a recursive walk of
        # the whole staging folder ten times a second takes CPU from the run it measures
        if first is None and next(staging.glob("run_id=*/attempt=*/*.parquet"), None) is not None:
            first = time.perf_counter() - start
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if log is not None:
        log.write_text(stderr)
    if proc.returncode:
        raise RuntimeError(f"moderate failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(next(Path(out).glob("dt=*/run_id=*/_summary.json")).read_text())
    return {"wall": wall, "first": first, "peak": peak, "store": store, "scored": summary["scored"],
            "listed": summary["listed"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    p.add_argument("--new", type=int, default=10_000, help="objects not yet scored (default 10000)")
    p.add_argument("--code", type=Path, nargs="*", default=[], help="other checkouts to run beside this one")
    p.add_argument("--work", type=Path, help="folder for the data (default: a temporary one)")
    p.add_argument("--logs", type=Path, help="folder to keep each run's log in (CODE-N.log)")
    args = p.parse_args(argv)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    import boto3

    server, endpoint = _moto()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
        bucket = "scale"
        client.create_bucket(Bucket=bucket)
        uploaded = {}
        sizes = sorted(set(args.sizes))
        for n in [args.new, *sizes]:  # the newest objects of every size exist; the others are only in the index
            for i in range(n - args.new, n):
                key = f"obj/{i:010d}.png"
                if key not in uploaded:
                    body = _png(i)
                    client.put_object(Bucket=bucket, Key=key, Body=body)
                    head = client.head_object(Bucket=bucket, Key=key)
                    uploaded[key] = (head["ETag"].strip('"'), head["LastModified"], len(body))
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            path, model_id = model(work)
            codes = [ROOT, *args.code]
            print(f"{'code':<28}{'objects':>12}{'wall s':>9}{'first row s':>13}{'driver MiB':>12}{'store MiB':>11}"
                  f"{'scored':>9}{'ctl s/M':>9}")
            results = {}
            for n in [args.new, *sizes]:  # first the new objects alone: the time scoring them takes
                manifest = inventory(work, n, args.new, bucket, uploaded)
                for code in codes:
                    out = output_with_index(code, work / f"out-{code.name}-{n}", n, args.new, bucket, model_id)
                    log = args.logs / f"{code.name}-{n}.log" if args.logs else None
                    r = results[(code, n)] = run(code, manifest, path, out, endpoint, log)
                    assert r["scored"] == args.new and r["listed"] == n, r
                    control = (r["wall"] - results[(code, args.new)]["wall"]) / (n / 1e6)
                    print(f"{str(code)[-28:]:<28}{n:>12}{r['wall']:>9.1f}{(r['first'] or float('nan')):>13.1f}"
                          f"{r['peak']:>12}{r['store']:>11}{r['scored']:>9}"
                          f"{control if n > args.new else float('nan'):>9.1f}",
                          flush=True)
            small, big = sizes[0], sizes[-1]
            for code in codes:
                r, s = results[(code, big)], results[(code, small)]
                print(f"{code}: moderate of {big / 1e6:g}M objects: driver peak {r['peak']} MiB "
                      f"({small / 1e6:g}M: {s['peak']} MiB), first scored row after {r['first'] or float('nan'):.1f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
