"""How long ``moderate``'s "already scored?" check takes as runs pile up, with and without
the per-model index.

Builds OUTPUT folders holding 1, 10 and 100 published runs of ``--rows`` rows each (local
disk, the table's own writer), then times ``already_scored`` twice: reading every run (no
index yet, as the first ``moderate`` after many scans does) and with the index written by
the previous ``moderate`` plus one run since (what every nightly run does). Prints one line
per run count and, last, the ratio of the two at the largest count.

    python bench/moderate_check_bench.py             # 1, 10, 100 runs of 2,000 rows
    python bench/moderate_check_bench.py --rows 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.scan import index, publish, table

OPTIONS = storage.StorageOptions()


def publish_run(out: Path, run_id: str, uris: list[str]) -> None:
    listing = pa.table({"uri": uris, "etag": [f"e{u}" for u in uris], "size_bytes": pa.array([1] * len(uris), pa.int64()),
                        "last_modified": pa.nulls(len(uris), pa.timestamp("us", tz="UTC")),
                        "seq": pa.array(range(len(uris)), pa.int64())})
    run_dir = out / "dt=2026-01-01" / f"run_id={run_id}"
    # Nothing staged: publish writes one row per listed object with the given (final) error, which is
    # all the check reads.
    publish.publish(str(out / "_staging" / run_id), str(run_dir), lambda: [listing], len(uris), "decode: bench row",
                  run_id=run_id, model_id="m", threshold=0.5, options=OPTIONS)
    (run_dir / table.SUCCESS).write_bytes(b"")


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000, help="rows per run (default 2000)")
    p.add_argument("--runs", type=int, nargs="*", default=[1, 10, 100])
    args = p.parse_args()
    print(f"already_scored on local disk, {args.rows:,} rows per run; best of 3", flush=True)
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.runs:
            out = Path(tmp, f"out-{n}")
            for r in range(n):
                publish_run(out, f"r{r:04d}", [f"s3://b/{r}/{i}.jpg" for i in range(args.rows)])
            full = timed(lambda: index.already_scored(str(out), "m", OPTIONS))
            seen, runs = index.already_scored(str(out), "m", OPTIONS)
            index.write_index(str(out), "m", seen, runs, OPTIONS)
            publish_run(out, "since", [f"s3://b/new/{i}.jpg" for i in range(args.rows)])
            indexed = timed(lambda: index.already_scored(str(out), "m", OPTIONS))
            pairs = index.already_scored(str(out), "m", OPTIONS)[0].num_rows
            assert pairs == (n + 1) * args.rows, pairs
            ratio = full / indexed
            print(f"{n:4d} earlier runs ({n * args.rows:,} rows): every run read {full * 1e3:8.1f} ms; "
                  f"index + 1 run since {indexed * 1e3:8.1f} ms", flush=True)
    print(f"ratio every-run/indexed at {args.runs[-1]} runs: {ratio:.1f}x")


if __name__ == "__main__":
    main()
