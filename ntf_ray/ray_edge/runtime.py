"""The Ray a command runs on: the cluster ``RAY_ADDRESS`` names, or a local one started here.

Every command that needs Ray (train, scan, moderate, evaluate, calibrate, demo) starts it
through ``init_local_ray``, so they all size a laptop's Ray the same way."""

from __future__ import annotations

import os

import ray

from ntf_ray.ray_edge import console

#: The cores of the local Ray this process started (None: it started none).
_local_cores: int | None = None


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray unless one is configured (RAY_ADDRESS / already initialised).

    Logical CPUs exceed the cores: train workers hold a CPU each for the whole run, and
    Ray Data's decode tasks would otherwise never be scheduled (a silent hang).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a cluster (ray job submit sets it for its entrypoint)
        ray.init()
    else:
        cores = os.cpu_count() or 2
        # Ray Train V2 (the default of recent Rays): set here, the local workers inherit it from the
        # raylet this process starts. A job-wide runtime_env would do the same, but makes every
        # worker start wait on Ray's runtime-env agent (0.6-1.1 s a start on a laptop).
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # address="local": a new local Ray even when `ray start` left a cluster on this machine
        # (use RAY_ADDRESS to run on that one).
        ray.init(address="local", num_cpus=num_cpus or max(4, 2 * cores), include_dashboard=False)
        global _local_cores
        _local_cores = cores
    console.attach_worker_logs()  # a command's session sends its workers' output to its log file


def cluster_cores() -> int:
    """The cores Ray's CPUs stand for: this machine's for the local Ray started here (which
    counts more CPUs than it has cores, see ``init_local_ray``), else the cluster's CPUs."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, _local_cores) if _local_cores else cpus)
