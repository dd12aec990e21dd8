"""A scan on local Ray exports its metrics: read back from Ray's metrics endpoint, they agree
with the table the scan wrote."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from ntf_ray.cli import main
from ntf_ray.ray_edge.scan.telemetry import METRICS
from ntf_ray.synth import make_synthetic
from tests.conftest import save_random_detector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metrics_ray():
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_ntf_scan_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels)] = out.get((m.group(1), labels), 0.0) + float(m.group(3))
    return out


def _total(samples, name: str, **tags) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and set(tags.items()) <= labels)


def test_a_scan_exports_what_it_listed_scored_flagged_and_failed(metrics_ray, tmp_path):
    make_synthetic(tmp_path / "src", n_real=10, n_fake=10, size=32, seed=2, splits={"test": 1.0})
    (tmp_path / "src" / "junk.png").write_bytes(b"not an image")
    model = save_random_detector(str(tmp_path / "model"))
    out = tmp_path / "scores"
    assert main(["scan", "--input", str(tmp_path / "src"), "--model", model, "--output", str(out), "--run-id", "m1",
                 "--max-actors", "1", "--batch-size", "8"]) == 0
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    scored = table.column("score").drop_null().to_pylist()
    flagged = sum(1 for f in table.column("is_fake").to_pylist() if f)
    want = {"ray_ntf_scan_listed_total": table.num_rows, "ray_ntf_scan_scored_total": len(scored),
            "ray_ntf_scan_flagged_total": flagged}
    deadline, samples = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # the agents report every second here (10 s by default)
        samples = _scrape(metrics_ray)
        if all(_total(samples, k) == v for k, v in want.items()) and _total(samples, "ray_ntf_scan_errors_total"):
            break
        time.sleep(1)
    print({k: _total(samples, k) for k in want}, "want", want)
    for name, value in want.items():
        assert _total(samples, name) == value, name
    assert _total(samples, "ray_ntf_scan_errors_total", kind="decode") == 1 == table.num_rows - len(scored)
    assert _total(samples, "ray_ntf_scan_scored_total", decoder="pil") == len(scored)
    assert _total(samples, "ray_ntf_scan_bytes_read_total") > 0
    assert _total(samples, "ray_ntf_scan_actor_images_per_second") > 0


def test_the_grafana_dashboard_plots_only_metrics_the_scan_exports():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ntf-scan.json").read_text())
    exported = {f"ray_{name}" + ("_total" if kind == "counter" else "") for name, (kind, _, _) in METRICS.items()}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"ray_ntf_scan_\w+", target["expr"]))
    assert used and used <= exported, used - exported
    assert exported - used == set(), f"exported but not plotted: {exported - used}"
