"""No credential reaches anything ntf-ray writes (ntf_ray.storage.redaction, and every command end to end).

The end-to-end test runs every command that touches storage or writes outputs with ``-vv``
(every library at DEBUG: botocore writes each request's headers, the session token and the
access key id among them) against moto, once per way of holding credentials, and counts
each secret in every place a run leaves text.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ntf_ray.storage import redaction
from ntf_ray.storage.redaction import MASK, redact

ROOT = Path(__file__).resolve().parents[1]


def _distinct(label: str, n: int = 40) -> str:
    """A value no pattern matches (lower and upper case, no AKIA prefix): only its value can redact it."""
    return (label + uuid.uuid4().hex + uuid.uuid4().hex)[:n]


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """An environment with no AWS setup but what a test puts there."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


# ---------------------------------------------------------------------- what redact removes
@pytest.mark.parametrize("text, secret", [
    ("denied for AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("temporary ASIAQWERTYUIOPASDFGH key", "ASIAQWERTYUIOPASDFGH"),
    ("headers={'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEXAMPLE+/=', 'X-Amz-Date': b'2026'}",
     "IQoJb3JpZ2luX2VjEXAMPLE"),
    ("x-amz-security-token:IQoJb3JpZ2luX2VjEXAMPLE\n\nhost;x-amz-date", "IQoJb3JpZ2luX2VjEXAMPLE"),
    ("GET /k?X-Amz-Security-Token=IQoJb3JpZ2lu%2Fx&X-Amz-Signature=9f2a3b", "IQoJb3JpZ2lu"),
    ("GET /k?X-Amz-Credential=myKeyId%2F20261204%2Fus-east-1&X-Amz-Signature=9f2a3b4c", "9f2a3b4c"),
    ("'Authorization': b'AWS4-HMAC-SHA256 Credential=myKeyIdValue/20261204/us-east-1/s3/aws4_request, "
     "SignedHeaders=host, Signature=290805646a9aefcd'", "myKeyIdValue"),
    ("'Authorization': b'AWS4-HMAC-SHA256 Credential=x/y, SignedHeaders=host, Signature=290805646a9aefcd'",
     "290805646a9aefcd"),
    ("botocore.auth: Signature:\n" + "a" * 64, "a" * 64),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG+bPxRfiCY", "wJalrXUtnFEMI"),
    ("aws_session_token=FwoGZXIvYXdzEXAMPLE", "FwoGZXIvYXdzEXAMPLE"),
    ("AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG'", "wJalrXUtnFEMI"),
    ('{"AccessKeyId": "myKeyIdValue", "SecretAccessKey": "wJalrXUtnFEMI", "Token" : "FwoGZXIv"}', "wJalrXUtnFEMI"),
    ('{"AccessKeyId": "myKeyIdValue", "SecretAccessKey": "wJalrXUtnFEMI", "Token" : "FwoGZXIv"}', "FwoGZXIv"),
    ("<Credentials><SessionToken>FwoGZXIvYXdz</SessionToken><SecretAccessKey>wJalr</SecretAccessKey>", "FwoGZXIvYXdz"),
    ("<Credentials><SessionToken>FwoGZXIvYXdz</SessionToken><SecretAccessKey>wJalr</SecretAccessKey>", "wJalr"),
    ("CALL: put_object - {'SSECustomerKey': 'c2VjcmV0a2V5'}", "c2VjcmV0a2V5"),
    ("Could not connect to the endpoint URL: http://minio:s3cr3tpass@10.0.0.5:9000/bucket", "s3cr3tpass"),
    ("Could not connect to the endpoint URL: http://minio:s3cr3tpass@10.0.0.5:9000/bucket", "minio:"),
])
def test_patterns_remove_what_looks_like_a_credential(no_aws, text, secret):
    out = redact(text)
    assert secret not in out and MASK in out, out


def test_patterns_leave_ordinary_text_and_redacted_text_alone(no_aws):
    for text in ("scored 12 of s3://bucket/key@2x.png in 3.1 s", "SignedHeaders=host;x-amz-security-token",
                 "http://127.0.0.1:9000/bucket", "token budget: 42", '{"__ray_tqdm_magic_token__": 1}'):
        assert redact(text) == text
    once = redact("'X-Amz-Security-Token': b'FwoGZXIv' aws_session_token=FwoG x-amz-security-token:bFwoG")
    assert redact(once) == once and "FwoG" not in once and "bFwoG" not in once


def test_the_values_in_use_are_redacted_wherever_they_come_from(no_aws, tmp_path):
    """A profile (and its role's source profile), the web-identity token file, the endpoint's
    password and any secret-named AWS_ variable: redacted as plain values, in any text."""
    key, secret, token, source = (_distinct(x) for x in ("profileKey", "profileSecret", "profileToken", "srcSecret"))
    web, password, other = _distinct("webIdentity", 300), _distinct("endpointPass", 24), _distinct("other")
    (tmp_path / "credentials").write_text(f"[redact]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
                                          f"aws_session_token = {token}\n[src]\naws_secret_access_key = {source}\n")
    (tmp_path / "config").write_text("[profile assumed]\nrole_arn = arn:aws:iam::123456789012:role/r\n"
                                     "source_profile = src\n")
    (tmp_path / "web-token").write_text(web + "\n")
    no_aws.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    no_aws.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    no_aws.setenv("AWS_PROFILE", "redact")
    no_aws.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "web-token"))
    no_aws.setenv("AWS_ENDPOINT_URL", f"http://someone:{password}@minio.internal:9000")
    no_aws.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", other)
    text = redact(f"a {key} b {secret} c {token} d {source} e {web} f {password} g {other} h")
    assert text == " ".join(f"{c} {MASK}" for c in "abcdefg") + " h"


def test_finding_the_credentials_asks_no_network(no_aws):
    """An instance-role setup whose metadata service never answers: the values are resolved at
    once (files only), not after botocore's metadata timeouts."""
    no_aws.delenv("AWS_EC2_METADATA_DISABLED")
    no_aws.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://192.0.2.1/")  # TEST-NET: never answers
    no_aws.setenv("AWS_METADATA_SERVICE_TIMEOUT", "3")
    started = time.monotonic()
    assert redact("ASIAQWERTYUIOPASDFGH") == MASK
    assert time.monotonic() - started < 2.0


def test_installed_redacts_every_log_record_and_what_reaches_stdout_and_stderr(no_aws, capsys):
    secret = _distinct("envSecret")
    no_aws.setenv("AWS_SECRET_ACCESS_KEY", secret)
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # any handler, made before or after: records are redacted as made
    logger = logging.getLogger("botocore.endpoint")
    logger.addHandler(handler)
    saved, factory = logger.level, logging.getLogRecordFactory()  # another library's factory, if any
    logger.setLevel(logging.DEBUG)
    try:
        with redaction.installed():
            logger.debug("Sending request with %s", {"secret": secret})
            try:
                raise PermissionError(f"denied with {secret}")
            except PermissionError:
                logger.exception("failed")
            logger.debug("stack", stack_info=True, extra={"unused": secret})
            print(f"printed {secret}")
            print(f"warned {secret}", file=sys.stderr)
        print(f"after {secret}")  # the streams are given back
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    captured = capsys.readouterr()
    assert secret not in out.getvalue() and "PermissionError: denied with <redacted>" in out.getvalue()
    assert f"printed {MASK}" in captured.out and f"warned {MASK}" in captured.err
    assert f"after {secret}" in captured.out
    assert logging.getLogRecordFactory() is factory  # given back as it was


# ---------------------------------------------------------------------- every command, end to end
SCENARIO = """
    import sys
    from ntf_ray.cli import main

    def run(*argv, card=False):
        if card:
            print("@@card-start", flush=True)
        try:
            code = main(["-vv", *argv])
        except Exception:  # printed as the process would print it, and on to the next command
            sys.excepthook(*sys.exc_info())
            code = "exception"
        if card:
            print("@@card-end", flush=True)
        print(f"@@rc {{argv[0]}} {{code}}", flush=True)

    for command in {commands!r}:
        run(*command[0], card=command[1])
"""


def _commands(data: str, model: str, out: str, local: Path, endpoint: str, *, train: bool) -> list:
    """Every command that touches storage or writes outputs, tiny (one actor, a few images)."""
    ep = ["--s3-endpoint", endpoint]
    image = f"{data}/test/nnconv/0_real/real_000000.png"
    manifest = f"{data}/manifest.parquet"
    actors = ["--max-actors", "1", "--batch-size", "8"]
    scan = ["--input", f"{data}/", "--glob", "*.png", "--model", model, "--output", f"{out}/scores",
            "--max-actors", "1", *ep]
    commands = [
        (["synth", str(local / "synth"), "--n-real", "2", "--n-fake", "2", "--size", "16"], False),
        (["index", f"{data}/", "--out", f"{out}/index.parquet", *ep], False),
        (["scan", *scan], False),
        (["moderate", *scan], False),
        (["evaluate", "--model", model, "--manifest", manifest, "--split", "all", "--output", f"{out}/eval", *actors,
          *ep], False),
        (["calibrate", "--model", model, "--manifest", manifest, "--split", "all", "--target-fpr", "0.5",
          "--output", f"{out}/calibrated", *actors, *ep], False),
        (["score", "--model", model, "--card", image, f"{data}/missing.png", *ep], True),
        (["explain", "--model", model, image, "--output", f"{out}/explain", "--device", "cpu", *ep], False),
        (["report", "--scores", f"{out}/scores", "--output", str(local / "report"), "--top", "4", "--model", model,
          "--card", *ep], True),
    ]
    if train:
        commands.insert(2, (["train", "--manifest", manifest, "--output", f"{out}/train", "--config",
                             str(ROOT / "ntf_ray" / "training" / "configs" / "smoke.yaml"), "--num-workers", "1",
                             "--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-size", "4",
                             "--set", "crop_size=16", "--set", "scl_crop_size=16", *ep], False))
    return commands


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    """One bucket with 12 tiny synthetic images and a random detector, shared by the scenarios."""
    from tests.conftest import save_random_detector

    bucket = s3.create_bucket()
    s3.upload_synthetic(f"s3://{bucket}", tmp_path_factory.mktemp("synth"), n_real=6, n_fake=6, size=16, seed=3)
    model = save_random_detector(f"s3://{bucket}/model", s3.endpoint_url, input_size=16)
    return {"bucket": bucket, "data": f"s3://{bucket}/data", "model": model}


def _scenario_env(kind: str, tmp: Path, endpoint: str) -> tuple[dict, dict, str]:
    """(environment, secrets by name, endpoint as the commands get it) for one way of holding
    credentials; the files it writes (the profile) are in ``tmp``, away from the outputs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-credentials"))
    secrets = {"access key id": _distinct(f"{kind}KeyId", 24), "secret": _distinct(f"{kind}Secret"),
               "session token": _distinct(f"{kind}Token", 200)}
    if kind == "profile":
        (tmp / "credentials").write_text(
            "[redaction-test]\n" + "".join(f"{name} = {secrets[k]}\n" for name, k in (
                ("aws_access_key_id", "access key id"), ("aws_secret_access_key", "secret"),
                ("aws_session_token", "session token"))))
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp / "credentials"), AWS_PROFILE="redaction-test")
    else:
        env.update(AWS_ACCESS_KEY_ID=secrets["access key id"], AWS_SECRET_ACCESS_KEY=secrets["secret"],
                   AWS_SESSION_TOKEN=secrets["session token"])
    if kind == "userinfo":
        secrets["endpoint password"] = _distinct("endpointPassword", 32)
        host = endpoint.split("://", 1)[1]
        endpoint = f"http://redactionUser:{secrets['endpoint password']}@{host}"
    return env, secrets, endpoint


def _places(done: subprocess.CompletedProcess, s3, bucket: str, out_prefix: str, local: Path) -> dict[str, bytes]:
    """Every text a scenario left: its streams, the model card it printed, and every file it wrote."""
    card = "".join(part.split("@@card-end")[0] for part in done.stdout.split("@@card-start")[1:])
    places = {"stderr": done.stderr.encode(), "stdout": done.stdout.encode(), "model card": card.encode(),
              "log files": b"", "_summary.json": b"", "report": b"", "other outputs": b""}
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=out_prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            place = ("log files" if "/_logs/" in key else "_summary.json" if key.endswith("_summary.json")
                     else "other outputs")
            places[place] += body
    for path in local.rglob("*"):
        if path.is_file():
            places["report" if "report" in path.relative_to(local).parts else "other outputs"] += path.read_bytes()
    return places


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_command_writes_a_credential_anywhere(s3, world, tmp_path):
    """Every command with ``-vv``, under (i) a session token in the environment, (ii) a profile
    and nothing in the environment, (iii) an endpoint URL with a password in it (which the S3
    clients refuse: the commands fail, and their errors and logs must not carry it either).
    Without redaction, botocore's debug lines alone carry the token and the key id in every request."""
    table, runs = [], {}
    for kind in ("environment", "profile", "userinfo"):
        home, local = tmp_path / kind / "home", tmp_path / kind / "work"
        home.mkdir(parents=True)
        local.mkdir()
        env, secrets, endpoint = _scenario_env(kind, home, s3.endpoint_url)
        out = f"s3://{world['bucket']}/{kind}"
        commands = _commands(world["data"], world["model"], out, local, endpoint, train=kind == "environment")
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCENARIO.format(commands=commands))],
                              cwd=local, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[kind] = done
        places = _places(done, s3, world["bucket"], f"{kind}/", local)
        for name, secret in secrets.items():
            table.append((kind, name, {place: text.count(secret.encode()) for place, text in places.items()}))
    print(f"\n{'credentials':<12} {'secret':<18} " + " ".join(f"{p:>13}" for p in table[0][2]))
    for kind, name, counts in table:
        print(f"{kind:<12} {name:<18} " + " ".join(f"{n:>13}" for n in counts.values()))
    leaks = [(kind, name, place, n) for kind, name, counts in table for place, n in counts.items() if n]
    assert not leaks, leaks
    # The runs did what they were asked (so the places were written): every command in (i) and (ii).
    for kind in ("environment", "profile"):
        codes = [line.split()[1:] for line in runs[kind].stdout.splitlines() if line.startswith("@@rc ")]
        errors = [line for line in runs[kind].stderr.splitlines() if line.startswith("ntf-ray ")]
        assert codes and all(code == "0" for _, code in codes), (kind, codes, errors)
        assert "DEBUG botocore.endpoint" in runs[kind].stderr and MASK in runs[kind].stderr  # -vv shows them
    assert "Cannot combine AUTHORIZATION header" in runs["userinfo"].stderr  # refused, and said so


@pytest.mark.slow
def test_v_leaves_the_storage_clients_debug_lines_out(s3, world, tmp_path):
    env, secrets, endpoint = _scenario_env("quiet", tmp_path, s3.endpoint_url)
    image = f"{world['data']}/test/nnconv/0_real/real_000000.png"
    done = subprocess.run([sys.executable, "-m", "ntf_ray", "-v", "score", "--model", world["model"], image,
                           "--s3-endpoint", endpoint], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"score"' in done.stdout
    assert " DEBUG botocore" not in done.stderr and " DEBUG s3fs" not in done.stderr, done.stderr[-2000:]
    assert all(secret not in done.stderr + done.stdout for secret in secrets.values())
