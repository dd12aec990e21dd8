"""Shared fixtures: moto's standalone S3 server (a real HTTP endpoint) and fresh buckets.

The endpoint is never exported as ``AWS_ENDPOINT_URL``: tests hand it to the code under
test explicitly (``StorageOptions(endpoint_url=s3.endpoint_url)``), as the product does
with pyarrow, which does not read it from the environment.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Fake credentials for moto. The secret is long and distinctive so tests can assert it
#: never leaks into messages, logs or outputs.
FAKE_ACCESS_KEY_ID = "testing"
FAKE_SECRET_ACCESS_KEY = "testing-secret-value-123"
FAKE_REGION = "us-east-1"


#: The test session's exit status, once it has ended (``pytest_sessionfinish``).
_session_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _session_status
    _session_status = int(exitstatus)


def pytest_report_header(config):
    """Which TurboJPEG 3 library (and libjpeg-turbo version) the window-decode tests use."""
    from tests import turbojpeg3

    return turbojpeg3.describe()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with the session's status, without the interpreter's teardown.

    Every test has run and the report is out by now. What is left is the teardown of the
    native libraries a thousand tests loaded in one process (pyarrow's S3 client, Ray's core
    worker, torch), which can crash at exit now and then (apache/arrow#38352): one did, after
    a fully green run (1503 passed), and turned it red.
    """
    if _session_status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_session_status)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MotoS3:
    """A running moto S3 server: ``endpoint_url`` plus a helper to make buckets."""

    endpoint_url: str
    region: str = FAKE_REGION

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=FAKE_ACCESS_KEY_ID, aws_secret_access_key=FAKE_SECRET_ACCESS_KEY)

    def create_bucket(self, name: str | None = None) -> str:
        """Create an empty bucket (a unique name when ``name`` is None); returns the name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_synthetic(self, bucket: str, local: Path, **synth) -> str:
        """``make_synthetic(local, **synth)``, copied under ``BUCKET/data/`` with a manifest of
        ``s3://`` uris; returns the manifest's uri."""
        from ntf_ray import storage
        from ntf_ray.synth import make_synthetic
        from ntf_ray.training.datasets import manifest_table, write_manifest

        options = storage.StorageOptions(endpoint_url=self.endpoint_url)
        records = make_synthetic(local, **synth)
        storage.s3.fsspec_filesystem(options).put(str(local) + "/", f"{bucket}/data/", recursive=True)
        for r in records:
            r["uri"] = f"{bucket}/data/" + Path(r["uri"]).relative_to(local).as_posix()
        manifest = f"{bucket}/data/manifest.parquet"
        write_manifest(manifest_table(records), manifest, options)
        return manifest


@pytest.fixture(scope="session")
def s3():
    """moto's ThreadedMotoServer on 127.0.0.1 with fake AWS credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
        mp.setenv("AWS_DEFAULT_REGION", FAKE_REGION)
        # Nothing from the developer's own AWS setup may reach the tests (or a real account).
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                     "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/ntf-ray-tests/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/ntf-ray-tests/aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")

        server, port = None, None
        for _ in range(5):
            # The port can be taken between picking it and binding it. ThreadedMotoServer.start()
            # would then wait forever (the bind fails in its thread), so wait with a timeout.
            port = _free_port()
            candidate = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            starter = threading.Thread(target=candidate.start, daemon=True)
            starter.start()
            starter.join(timeout=20)
            if not starter.is_alive():
                server = candidate
                break
        if server is None:
            raise RuntimeError("could not start moto's S3 server on 127.0.0.1")
        try:
            yield MotoS3(endpoint_url=f"http://127.0.0.1:{port}")
        finally:
            server.stop()


@pytest.fixture(scope="module")
def local_ray(s3):
    """A local Ray for one test module (4 logical CPUs: detector actors and Ray Data's tasks
    both find one). After ``s3``: Ray's workers inherit the environment, the test credentials
    included."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def bucket(s3) -> str:
    """A new, empty, uniquely named bucket as ``s3://name``."""
    return f"s3://{s3.create_bucket()}"


def save_random_detector(uri: str, endpoint_url: str | None = None, input_size: int = 32, seed: int = 0) -> str:
    """A detector artifact with the tiny backbone at random initialisation: real weights and
    a real contract, for tests about rows and plumbing rather than accuracy (another ``seed``:
    another model_id)."""
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector
    from ntf_ray.storage import StorageOptions

    torch.manual_seed(seed)
    save_artifact(uri, Detector.build("tiny"), input_size=input_size, options=StorageOptions(endpoint_url=endpoint_url))
    return uri


def save_nan_detector(uri: str, endpoint_url: str | None = None, input_size: int = 32) -> str:
    """A detector whose weights are all finite but whose last batch norm holds a negative
    running variance: it loads, and scores every image NaN (a detector that fails open if
    nothing checks its scores)."""
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector
    from ntf_ray.storage import StorageOptions

    torch.manual_seed(0)
    detector = Detector.build("tiny").eval()
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        norms[-1].running_var.fill_(-1.0)
    save_artifact(uri, detector, input_size=input_size, options=StorageOptions(endpoint_url=endpoint_url))
    return uri
