"""Listing an S3 prefix: one lister against several (``scan --list-concurrency``), same bucket.

Starts moto's S3 server on 127.0.0.1, writes ``--keys`` objects spread over ``--folders``
folders, then lists the bucket with one ListObjectsV2 lister and with the fan-out at each
``--concurrency``, in the same run, and prints keys/s and the ratio to the one lister.

moto answers in about a millisecond from one Python process, where S3 takes tens of
milliseconds per page: ``--latency-ms`` adds that wait to every list request (on the client,
as a network round trip would), which is what one lister spends its time on. With 0, the
figures show moto's own throughput (one process: no gain to be had).

    python bench/list_bench.py --keys 20000 --folders 64 --concurrency 4 16 --latency-ms 0 30
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=20000, help="objects in the bucket (default 20000)")
    p.add_argument("--folders", type=int, default=64, help="folders they are spread over (default 64)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16], help="fan-out widths (default 4 16)")
    p.add_argument("--repeats", type=int, default=3, help="listings of each kind; the best counts (default 3)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 30.0],
                   help="added round trip per list request, each a run of its own (default 0 30)")
    args = p.parse_args(argv)

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from ntf_ray.storage import StorageOptions
    from ntf_ray.storage.s3 import fsspec_filesystem, list_s3, list_s3_fanout

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(timeout=20)
    host, port = server._server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: client.put_object(Bucket="bench", Key=f"f{k % args.folders:04d}/{k:08d}.jpg",
                                                      Body=b"x"), range(args.keys)))
        print(f"wrote {args.keys} keys in {args.folders} folders in {time.perf_counter() - start:.1f} s")
        options = StorageOptions(endpoint_url=endpoint)

        def best(listing) -> float:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                n = sum(1 for _ in listing())
                times.append(time.perf_counter() - t)
                assert n == args.keys, n
            return min(times)

        fs = fsspec_filesystem(options)
        real = fs._call_s3
        for latency in args.latency_ms:
            async def call(op, *a, _latency=latency / 1000, **kw):
                import asyncio

                if op == "list_objects_v2":
                    await asyncio.sleep(_latency)
                return await real(op, *a, **kw)

            fs._call_s3 = call
            one = best(lambda: list_s3("s3://bench/", options))
            print(f"latency {latency:g} ms per list request:")
            print(f"  one lister:    {args.keys / one:10.0f} keys/s ({one:.2f} s)")
            for width in args.concurrency:
                t = best(lambda w=width: list_s3_fanout("s3://bench/", options, concurrency=w))
                print(f"  fan-out x{width:<3d}  {args.keys / t:10.0f} keys/s ({t:.2f} s), ratio {one / t:.2f}")
        fs._call_s3 = real
    finally:
        server.stop()


if __name__ == "__main__":
    main()
