"""`ray job submit` to a real Ray cluster (`ray start --head` on 127.0.0.1), data and outputs in S3.

The cluster runs in its own processes, started the way a user starts one, with token
authentication on (Ray's default for local clusters) and a token of its own. It inherits
this process's environment, the fake S3 credentials included, as a cluster inherits
its nodes' credentials; nothing secret travels in the job's runtime environment.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAKE_SECRET_ACCESS_KEY, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(840)]
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Cluster:
    address: str  # the dashboard's HTTP address, where `ray job submit` goes
    env: dict[str, str]

    def submit(self, *entrypoint: str, timeout: int = 720) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir REPO -- ENTRYPOINT``; waits for the job and returns its output.

        A head whose dashboard agent has not registered yet refuses a job with "No available
        agent to submit job, please try again later" (seen on a loaded machine): tried again then."""
        for attempt in range(6):
            done = subprocess.run([RAY, "job", "submit", "--address", self.address, "--working-dir", str(REPO), "--",
                                   *entrypoint], env=self.env, capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0 or "No available agent to submit job" not in done.stdout + done.stderr:
                return done
            time.sleep(10)
        return done


@pytest.fixture(scope="module")
def ray_cluster(s3, tmp_path_factory):
    token = tmp_path_factory.mktemp("ray-auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    # More logical CPUs than cores: 2 train workers hold 2, Ray Data's tasks need more.
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=6",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Cluster(address=f"http://127.0.0.1:{dashboard}", env=env)
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=180)


def test_job_submit_trains_both_stages_from_s3_to_a_detector_in_s3(ray_cluster, s3, bucket, tmp_path):
    from ntf_ray import storage
    from ntf_ray.detector.scorer import Scorer
    from ntf_ray.training.datasets import read_manifest, select
    from ntf_ray.training.recipe import evaluate

    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    # A small set (the suite's time): that training learns at the recipe's scale is
    # tests/test_recipe.py's (AP >= 0.9 in one process), and that 2 workers train as one
    # worker of their global batch is tests/test_ray_train.py's parity tests. Here: the job
    # path, from and to S3, and a detector that learned something.
    manifest = s3.upload_synthetic(bucket, tmp_path / "synth", n_real=200, n_fake=200, size=64, seed=7)
    output = f"{bucket}/run"

    # 2 workers x 8 images: the global batch of the one-process recipe (batch 16)
    job = ray_cluster.submit("python", "jobs/train.py", "--stage", "both", "--manifest", manifest, "--output", output,
                             "--config", "jobs/configs/smoke.yaml", "--num-workers", "2", "--batch-size", "8",
                             "--s3-endpoint", s3.endpoint_url, "--run-name", "job-e2e")
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in log and f"detector artifact: {output}/detector" in log
    assert FAKE_SECRET_ACCESS_KEY not in log

    for name in ("detector/model.safetensors", "detector/model.json", "stage1/models.safetensors", "config.json"):
        assert storage.exists(f"{output}/{name}", options), name
    fs = storage.s3.fsspec_filesystem(options)
    assert any("checkpoint_" in p for p in fs.ls(f"{output}/ray/job-e2e-stage2"))  # Ray Train's checkpoints in S3
    config_json = storage.read_bytes(f"{output}/config.json", options).decode()
    assert FAKE_SECRET_ACCESS_KEY not in config_json and "endpoint" not in config_json
    # Ray's logs of the job, uploaded beside its outputs: the workers' lines in, no secret
    logs = fs.ls(f"{output}/_logs")
    assert len(logs) == 1 and f"Ray's logs of this run: {output}/_logs/" in log, (logs, log[-2000:])
    ray_log = fs.cat(logs[0]).decode()
    assert "(RayTrainWorker pid=" in ray_log and FAKE_SECRET_ACCESS_KEY not in ray_log

    # The detector, loaded from the bucket, on the held-out split read from the bucket.
    scorer = Scorer.from_artifact(f"{output}/detector", device="cpu", options=options)
    assert scorer.input_size == 48
    rows = evaluate(scorer, select(read_manifest(manifest, options), split="test"), options=options)
    assert rows[-1]["images"] == 120
    print(f"job-trained detector on the held-out split: AP {rows[-1]['ap']:.3f}")
    assert rows[-1]["ap"] >= 0.75, rows


def test_job_submit_scans_a_bucket_into_a_table_pandas_and_pyarrow_read(ray_cluster, s3, bucket, tmp_path):
    import pandas as pd
    import pyarrow.dataset as pads

    from ntf_ray import storage
    from ntf_ray.scan.table import SCORE_SCHEMA
    from ntf_ray.synth import make_synthetic
    from tests.awkward import make_awkward_files
    from tests.conftest import save_random_detector

    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    make_synthetic(tmp_path / "objects" / "synth", n_real=30, n_fake=30, size=32, seed=4)
    awkward = make_awkward_files(tmp_path / "objects" / "awkward")
    storage.s3.fsspec_filesystem(options).put(str(tmp_path / "objects") + "/", f"{bucket}/uploads/", recursive=True)
    model = save_random_detector(f"{bucket}/model", s3.endpoint_url)
    output = f"{bucket}/scores"

    job = ray_cluster.submit("python", "jobs/scan.py", "--input", f"{bucket}/uploads", "--model", model,
                             "--output", output, "--run-id", "job-scan", "--s3-endpoint", s3.endpoint_url)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "run job-scan" in log and f"{60 + len(awkward)} listed" in log and "succeeded" in log
    assert FAKE_SECRET_ACCESS_KEY not in log

    fs, path = storage.arrow_filesystem(output, options)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert table.select(SCORE_SCHEMA.names).schema.equals(SCORE_SCHEMA)
    assert table.num_rows == 60 + len(awkward) == len(set(table.column("uri").to_pylist()))
    frame = pd.read_parquet(path, filesystem=fs)
    assert len(frame) == table.num_rows and set(frame.columns) == {*SCORE_SCHEMA.names, "dt"}
    assert frame["error"].notna().sum() == sum(not good for good in awkward.values())
    assert frame.loc[frame["error"].isna(), "score"].between(0, 1).all()
