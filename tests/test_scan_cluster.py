"""Drill: a scan on a Ray cluster of several nodes (``ray.cluster_utils.Cluster``: raylets on this
machine), and a worker node removed mid-scan, its actors and tasks gone with it. The run still
publishes exactly one row per object, the lost work redone on the node that is left.

The node left has room for one detector actor only: the one that was on the removed node can
be started nowhere, so the batches it held must not wait for it (``actor.scored_stream``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ntf_ray import storage
from ntf_ray.scan.spec import ScanSpec
from ntf_ray.scan.table import completed_runs
from ntf_ray.synth import make_synthetic
from tests.conftest import save_random_detector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def cluster():
    """A head that runs nothing (0 CPUs) and two worker nodes of 3 CPUs each: one detector
    actor of 2 CPUs fits a node, with a CPU left there for Ray Data's read tasks."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=3) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _published(out: Path) -> list[dict]:
    (run,) = completed_runs(str(out), storage.StorageOptions())
    return pq.read_table(Path(run) / "scores.parquet").to_pylist()


def test_a_worker_node_lost_mid_scan_costs_no_row(cluster, tmp_path):
    import ray

    from ntf_ray.ray_edge import scan as ray_scan

    c, workers = cluster
    records = make_synthetic(tmp_path / "data", n_real=120, n_fake=120, size=48, seed=5, splits={"test": 1.0})
    model = save_random_detector(str(tmp_path / "model"))
    out = tmp_path / "scores"
    staged: list[int] = []

    def remove_a_node_once_rows_are_staged() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = list((out / "_staging").rglob("*.parquet")) if (out / "_staging").exists() else []
            if rows:
                staged.append(len(rows))
                c.remove_node(workers[1], allow_graceful=False)
                return
            time.sleep(0.2)

    nodes_before = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
    killer = threading.Thread(target=remove_a_node_once_rows_are_staged, daemon=True)
    killer.start()
    # two actors of 2 CPUs on nodes of 3: one on each worker node, a CPU left on each for the reads
    result = ray_scan.scan(ScanSpec(model=model, output=str(out), input=str(tmp_path / "data"), max_actors=2,
                                    cpus_per_actor=2, read_block_rows=8, batch_size=8, stall_s=None))
    killer.join(timeout=5)
    rows = _published(out)
    uris = [r["uri"] for r in rows]
    objects = {r["uri"] for r in records}
    errors = [r["error"] for r in rows if r["error"] is not None]
    print(f"\nnode-loss drill: {len(nodes_before)} worker nodes, one removed after {staged} staged files; "
          f"rows {len(rows)}, objects {len(objects)}, duplicates {len(uris) - len(set(uris))}, "
          f"lost {len(objects - set(uris))}, errors {len(errors)}, {result.summary['seconds']:.1f} s")
    assert len(nodes_before) == 2 and staged, "the drill removed no node while the scan ran"
    assert sorted(uris) == sorted(objects)  # one row per object: none lost, none twice
    assert errors == [] and all(r["score"] is not None for r in rows)  # the lost work redone, not written off
    assert result.summary["scored"] == len(objects)

