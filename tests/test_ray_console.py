"""What a command prints, and where Ray's own logs go (ntf_ray.ray_edge.console, the demo end to end)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ntf_ray.ray_edge import console
from ntf_ray.ray_edge.train_progress import batch_images, summary_line

#: What no default run may show on the terminal: Ray's internals, which a user cannot act on.
RAY_NOISE = re.compile(r"logging_progress|streaming_executor|core_worker\.cc|constructor arguments|"
                       r"Failed to query Ray Train|\(raylet\)|\(TrainController|\(RayTrainWorker|\(SplitCoordinator|"
                       r"Token authentication|Started a local Ray|RayDeprecationWarning|\[A")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


SESSION = """
    import logging, os, sys
    from ntf_ray.ray_edge import console
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with console.session("never", "refused", verbose={verbose}) as s:
        os.write(2, b"refused before it made its output\\n")
    assert s.kept is None and not os.path.exists("never"), s.kept
    os.makedirs("out")  # the command makes its output folder
    with console.session("out", "test", verbose={verbose}) as s:
        os.write(2, b"C-LEVEL LINE\\n")               # what Ray's core worker writes in this process
        print("the command's own line", file=sys.stderr)
        logging.getLogger("ray.data").info("ray data internals")
        logging.getLogger("ray").warning("ray internals")
        logging.getLogger("ntf_ray.x").info("ntf_ray progress")
    os.write(2, b"AFTER THE SESSION\\n")
    logging.getLogger("ray").warning("ray after")
"""


def test_a_session_sends_rays_logs_and_c_level_lines_to_its_file_and_keeps_the_commands_own(tmp_path):
    done = _run(SESSION.format(verbose=False), tmp_path)
    assert done.returncode == 0, done.stderr
    logs = list((tmp_path / "out" / console.LOG_DIR).glob("test-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    for line in ("C-LEVEL LINE", "ray data internals", "ray internals", "ntf_ray progress"):
        assert line in text, line
    for line in ("the command's own line", "ntf_ray progress", "AFTER THE SESSION", "ray after"):
        assert line in done.stderr, line  # after the session: fd 2 and Ray's loggers are back
    for line in ("C-LEVEL LINE", "ray data internals", "ray internals"):
        assert line not in done.stderr, line
    assert "AFTER THE SESSION" not in text


def test_verbose_shows_rays_logs_on_the_terminal_too(tmp_path):
    done = _run(SESSION.format(verbose=True), tmp_path)
    assert done.returncode == 0, done.stderr
    text = next((tmp_path / "out" / console.LOG_DIR).glob("test-*.log")).read_text()
    for line in ("ray data internals", "ray internals", "C-LEVEL LINE"):
        assert line in done.stderr, line
    assert "ray internals" in text


def _session(tmp_path):
    s = console.Session(tmp_path / "x.log", verbose=False)
    printed: list[dict] = []
    s._ray_message = lambda data, ignore_prefix=False: printed.append(data)
    return s, printed


def test_worker_lines_go_to_the_file_without_the_harmless_ones_and_the_autoscalers_status(tmp_path):
    s, _ = _session(tmp_path)
    s.worker_lines({"pid": 7, "actor_name": "TrainController", "ip": "10.0.0.1", "localhost": "10.0.0.1",
                    "lines": ["Started training worker group", console.HARMLESS[0] + ". Continuing to monitor."]})
    s.worker_lines({"pid": "autoscaler", "lines": ["======== Autoscaler status: now ========", "Node status"]})
    s.worker_lines({"pid": 8, "task_name": "read", "ip": "10.0.0.2", "localhost": "10.0.0.1", "lines": ["remote"]})
    s.worker_lines({"pid": 9, "actor_name": "SplitCoordinator", "lines": ['{"__ray_tqdm_magic_token__": 1, "x": 3}']})
    s._closed = True
    s.file.close()
    s.worker_lines({"pid": 7, "actor_name": "TrainController", "lines": ["a line Ray delivers as the session ends"]})
    assert (tmp_path / "x.log").read_text().splitlines() == [
        "(TrainController pid=7) Started training worker group", "(read pid=8, ip=10.0.0.2) remote"]


def test_raylet_messages_reach_the_terminal_but_the_harmless_ones(tmp_path):
    s, printed = _session(tmp_path)
    oom = "Task was killed due to the node running low on memory."
    s.raylet_message({"pid": "raylet", "lines": ["WARNING: 8 PYTHON " + console.HARMLESS[1] + ": 192.0.2.2"]})
    s.raylet_message({"pid": "raylet", "lines": [oom]})
    assert [d["lines"] for d in printed] == [[oom]]
    s._closed = True  # after its session, Ray's own printer, untouched
    s.raylet_message({"pid": "raylet", "lines": ["WARNING: 8 PYTHON " + console.HARMLESS[1]]})
    assert len(printed) == 2
    s.file.close()
    assert (tmp_path / "x.log").read_text().strip().endswith(oom)


SECRET_SESSION = """
    import logging, os, sys
    from ntf_ray.ray_edge import console
    token = os.environ["AWS_SESSION_TOKEN"]
    os.makedirs("out")
    with console.terminal(verbose=2), console.session("out", "test", verbose={verbose}):
        if not {verbose}:  # with -v, fd 2 is the terminal's: C/C++ lines are not redacted (see ray_console)
            os.write(2, f"C-LEVEL {{token}}\\n".encode())
        logging.getLogger("botocore.endpoint").debug("headers={{'X-Amz-Security-Token': %r}}", token.encode())
        logging.getLogger("ray").warning("ray says %s", token)
        print(f"printed {{token}}", file=sys.stderr)
        print(f"out {{token}}")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_no_line_of_a_session_carries_a_credential(tmp_path, verbose):
    """Every logger at DEBUG, Ray's loggers, prints, and (without -v) the C-level lines of fd 2:
    redacted on the terminal and in the log file alike."""
    token = "sessionTokenValue" + "Q" * 60
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SECRET_SESSION.format(verbose=verbose))],
                          cwd=tmp_path, env={**env, "AWS_SESSION_TOKEN": token, "AWS_EC2_METADATA_DISABLED": "true"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = next((tmp_path / "out" / console.LOG_DIR).glob("test-*.log")).read_text()
    assert token not in done.stderr + done.stdout + text
    assert "ray says <redacted>" in text and (verbose or "C-LEVEL <redacted>" in text)
    assert "'X-Amz-Security-Token': b'<redacted>'" in done.stderr and "printed <redacted>" in done.stderr
    assert "out <redacted>" in done.stdout


def test_worker_and_raylet_lines_are_redacted_in_the_file_and_on_the_terminal(tmp_path):
    s = console.Session(tmp_path / "x.log", verbose=True)
    printed: list[dict] = []
    s._ray_print = printed.append
    s._ray_message = lambda data, ignore_prefix=False: printed.append(data)
    leak = "headers={'X-Amz-Security-Token': b'FwoGZXIvYXdzEXAMPLETOKEN', 'Authorization': b'AWS4-HMAC-SHA256 " \
           "Credential=AKIAIOSFODNN7EXAMPLE/20261204/us-east-1/s3/aws4_request, Signature=deadbeef'}"
    s.worker_lines({"pid": 7, "actor_name": "DetectorActor", "lines": [leak]})
    s.raylet_message({"pid": "raylet", "lines": ["endpoint http://minio:s3cr3tpassw0rd@10.0.0.5:9000 unreachable"]})
    s._closed = True
    s.file.close()
    terminal = "\n".join(line for data in printed for line in data["lines"])
    file = (tmp_path / "x.log").read_text()
    for secret in ("FwoGZXIvYXdzEXAMPLETOKEN", "AKIAIOSFODNN7EXAMPLE", "deadbeef", "s3cr3tpassw0rd"):
        assert secret not in terminal + file, secret
    assert len(printed) == 2 and terminal.count("<redacted>") == file.count("<redacted>") == 4  # 3 + 1 each


def test_epoch_lines_and_batch_sizes():
    assert summary_line(2, 0, 10, {"loss": 2.91234, "images_per_s": 88.4, "seconds": 13.58, "rows_dropped": 0.0}) \
        == "stage 2 epoch 1/10, loss 2.912, 88 images/s, 13.6 s"
    assert summary_line(1, 1, 2, {"loss": 3.3, "rows_dropped": 3.0}).endswith("3 rows dropped")
    assert batch_images({"view1": [0] * 5, "view2": [0] * 5}) == 5
    assert batch_images(([0] * 3, [1] * 3)) == 3


@pytest.mark.timeout(420)
def test_the_demo_prints_its_steps_and_results_and_keeps_rays_logs_in_a_file(tmp_path):
    """``ntf-ray demo`` from a fresh process, its output captured (not a terminal): under 60
    lines, the results in them, none of Ray's internals; those are in the run's log file."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "ntf_ray", "demo", "--work", str(work), "--n", "40",
                           "--set", "epochs_stage1=1", "--set", "epochs_stage2=2"],
                          env=env, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert not [line for line in lines if RAY_NOISE.search(line)], out
    assert not [line for line in lines if re.search(r"\bWARNING\b|Warning:", line)], out
    for result in ("[4/4]", "80 listed", "mAP ", "stage 1 epoch 1/1, loss", "stage 2 epoch 2/2, loss", "demo finished"):
        assert result in out, result
    log = re.search(r"Ray's logs of this run: (\S+)", out)
    assert log and Path(log.group(1)).parent == work / console.LOG_DIR
    text = Path(log.group(1)).read_text()
    assert "Started a local Ray instance" in text and "(TrainController pid=" in text
    assert console.HARMLESS[0] not in text
    assert list((work / "scores").glob("dt=*/run_id=*/scores.parquet"))
    _report_of_the_demos_scan(work, tmp_path)
    report = work / "report"
    assert {"report.md", "metrics.json", "scores.parquet", "tsne.png"} <= {p.name for p in report.iterdir()}
    assert json.loads((report / "metrics.json").read_text())["clean"]["table"][-1]["images"] == 24


def _report_of_the_demos_scan(work: Path, tmp_path: Path) -> None:
    """``ntf-ray report`` on the demo's scan, with heatmaps, opened in headless Chromium."""
    from ntf_ray.cli import main
    from tests.test_report import browser_runs, render_in_browser

    page = work / "moderation"
    assert main(["report", "--scores", str(work / "scores"), "--top", "24", "--model", str(work / "run" / "detector"),
                 "--output", str(page)]) == 0
    text = (page / "index.html").read_text()
    assert "<th>listed</th><td>80</td>" in text and "<th>scored</th><td>80</td>" in text
    if not browser_runs():
        return  # the page's text is checked; the browser only where it is installed (CI installs it)
    shot = Path(os.environ.get("NTF_DEMO_REPORT_SCREENSHOT", tmp_path / "demo-report.png"))
    widths, errors = render_in_browser(page / "index.html", shot)
    assert len(widths) == 1 + 2 * 24 and all(w > 0 for _, w in widths), widths
    assert errors == []
