"""The moderator's report: what the page says, that it holds no secret, and that a real browser
renders every picture on it without a console error (Debian's chromium, headless)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ntf_ray.cli import main
from ntf_ray.ray_scan.table import FILE_SCHEMA

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
EVIL = '<img src=x onerror=alert(1)>.png'


@pytest.fixture
def scan_run(tmp_path):
    """A published scan run (as the scan writes it) over 12 local images, one of them gone since."""
    rng = np.random.default_rng(0)
    src = tmp_path / "bucket"
    src.mkdir()
    names = [f"img_{k:02d}.{'jpg' if k % 2 else 'png'}" for k in range(10)] + [EVIL, "gone.png"]
    rows = []
    for k, name in enumerate(names):
        img = (rng.random((48 + 4 * k, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(src / name, format="JPEG" if name.endswith(".jpg") else "PNG")
        score = float(k) / len(names)
        rows.append({"uri": str(src / name), "etag": f"e{k}", "size_bytes": 1000, "last_modified": None,
                     "score": score, "is_fake": score >= 0.5, "threshold": 0.5, "width": 64, "height": 48 + 4 * k,
                     "format": "PNG", "error": None, "model_id": "m1", "scanned_at": dt.datetime.now(dt.timezone.utc),
                     "decoder": "pil"})
    rows.append({**rows[0], "uri": str(src / "broken.png"), "score": None, "is_fake": None, "width": None,
                 "height": None, "error": "decode: not an image"})
    (src / "gone.png").unlink()
    run = tmp_path / "scores" / "dt=2026-11-27" / "run_id=r1"
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), run / "scores.parquet")
    (run / "_summary.json").write_text('{"listed": 13}')
    (run / "_SUCCESS").write_text("")
    return tmp_path / "scores"


def test_the_report_lists_the_run_and_escapes_what_uploaders_named(scan_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "5", "--output", str(out)]) == 0
    assert "report of run r1: 5 images (1 unreadable now)" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for part in ("<th>listed</th><td>13</td>", "<th>scored</th><td>12</td>", "<th>flagged</th><td>6</td>",
                 "<th>errors: decode</th><td>1</td>", "histogram.png", 'loading="lazy"', "not readable now"):
        assert part in page, part
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page  # a key is text, not markup
    assert len(list((out / "thumbs").iterdir())) == 4  # the top 5 less the one gone from the bucket
    assert "AWS" not in page and "X-Amz" not in page  # no credentials, no presigned links


def browser_runs() -> bool:
    """Chromium and its driver are here, or CI requires them (NTF_REQUIRE_BROWSER: fail, not skip)."""
    return bool(CHROMIUM and CHROMEDRIVER) or bool(os.environ.get("NTF_REQUIRE_BROWSER"))


NEEDS_BROWSER = pytest.mark.skipif(not browser_runs(),
                                   reason="needs Debian's chromium and chromium-driver (CI installs them)")


def render_in_browser(page: Path, screenshot: Path) -> tuple[list[tuple[str, int]], list[dict]]:
    """Open ``page`` in headless Chromium, scroll every lazy picture into view, wait for them,
    and return each picture's (src, naturalWidth) and the console's SEVERE entries."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.as_uri())
        for img in driver.find_elements("tag name", "img"):  # lazy images load once scrolled to
            driver.execute_script("arguments[0].scrollIntoView();", img)
        driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const wait = () => [...document.images].every(i => i.complete) ? done() : setTimeout(wait, 50);
            wait();""")
        widths = driver.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return widths, errors


@NEEDS_BROWSER
def test_a_browser_renders_every_picture_of_the_report_without_console_errors(scan_run, tmp_path):
    from tests.test_explain import patch_model_for_report

    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "50", "--output", str(out),
                 "--model", patch_model_for_report(tmp_path)]) == 0
    widths, errors = render_in_browser(out / "index.html", tmp_path / "report.png")
    assert len(widths) == 1 + 2 * 11  # the histogram, then a thumbnail and a heatmap for each readable image
    assert all(w > 0 for _, w in widths), [s for s, w in widths if w == 0]
    assert errors == []
