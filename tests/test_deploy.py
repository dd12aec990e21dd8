"""The deploy files parse, and every job they start parses with the CLI's own parser, so they
cannot drift from the code (an option renamed or removed fails here, not at 02:30 on a cluster)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ntf_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
JOBS = {"jobs/train.py": "train", "jobs/scan.py": "scan", "jobs/moderate.py": "moderate",
        "jobs/evaluate.py": "evaluate"}
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def _dockerfile() -> tuple[str, str]:
    """The Ray version of the image's base and its working directory."""
    text = (DEPLOY / "Dockerfile").read_text()
    version = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", text, re.M).group(1)
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    return version, workdir


def _job_spec(doc: dict) -> dict:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def test_there_are_kuberay_files_for_training_an_audit_and_the_nightly_moderate():
    kinds = {}
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            command = JOBS[shlex.split(_job_spec(doc)["entrypoint"])[1]]
            kinds.setdefault(doc["kind"], set()).add(command)
    assert kinds == {"RayJob": {"train", "scan"}, "RayCronJob": {"moderate"}}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_entrypoint_parses_with_the_cli_and_every_cluster_runs_the_images_ray(path):
    version, workdir = _dockerfile()
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCronJob")
        job = _job_spec(doc)
        argv = shlex.split(job["entrypoint"])
        assert argv[0] == "python" and argv[1] in JOBS, argv[:2]
        assert (ROOT / argv[1]).is_file()
        args = build_parser().parse_args([JOBS[argv[1]], *argv[2:]])  # exits (fails) on an unknown option
        assert args.command == JOBS[argv[1]]
        assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": workdir}
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        cluster = job["rayClusterSpec"]
        assert cluster["rayVersion"] == version
        pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
        for pod in pods:
            assert all(c["image"] == "my-registry/ntf-ray:latest" for c in pod["spec"]["containers"])
            assert pod["spec"]["serviceAccountName"]  # S3 from the pod's identity ...
            text = yaml.safe_dump(pod)
            assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()  # ... never keys
        if doc["kind"] == "RayCronJob":
            spec = doc["spec"]
            assert len(spec["schedule"].split()) == 5 and spec["timeZone"]
            assert "RayCronJob" in path.read_text() and "1.6" in path.read_text()  # the gate and version it needs


def test_cluster_yaml_runs_the_images_ray_and_installs_this_checkout():
    version, _ = _dockerfile()
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    mounted = {remote for remote, local in cluster["file_mounts"].items() if local == "."}
    assert any(f"pip install -e {m}" in " ".join(cluster["setup_commands"]) for m in mounted)
    assert set(cluster["available_node_types"]) >= {cluster["head_node_type"]}
