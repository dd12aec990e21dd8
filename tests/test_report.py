"""The moderator's report: what the page says, that it holds no secret, and that a real browser
renders every picture on it without a console error (Debian's chromium, headless)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.scan.table import FILE_SCHEMA, PROVENANCE_COLUMNS

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
EVIL = '<img src=x onerror=alert(1)>.png'
BIDI = "report\u202egpj.exe"  # reads as "reportexe.jpg" where U+202E is shown raw
SWAPPED = "swapped.png"


def cards(page: str) -> dict[str, str]:
    """Each contact-sheet card's HTML by the file name at the end of its uri, as the page shows it."""
    out = {}
    for card in page.split('<figure class="card">')[1:]:
        uri = card.split("<code>", 1)[1].split("</code>", 1)[0]
        out[uri.rsplit("/", 1)[-1]] = card.split("</figure>", 1)[0]
    return out


@pytest.fixture
def scan_run(tmp_path):
    """A published scan run (as the scan writes it: each row with its object's etag and size)
    over 14 local images: one replaced by another picture since, one gone since, one whose name
    holds U+202E, and a row the scan could not decode."""
    rng = np.random.default_rng(0)
    src = tmp_path / "bucket"
    src.mkdir()
    names = [f"img_{k:02d}.{'jpg' if k % 2 else 'png'}" for k in range(10)] + [EVIL, BIDI, SWAPPED, "gone.png"]
    rows = []
    for k, name in enumerate(names):
        img = (rng.random((48 + 4 * k, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(src / name, format="JPEG" if name.endswith(".jpg") else "PNG")
        st = os.stat(src / name)
        score = float(k) / len(names)
        rows.append({"uri": str(src / name), "etag": storage.local.local_etag(st), "size_bytes": st.st_size,
                     "last_modified": None, "score": score, "is_fake": score >= 0.5, "threshold": 0.5, "width": 64,
                     "height": 48 + 4 * k, "format": "PNG", "error": None, "model_id": "m1",
                     "scanned_at": dt.datetime.now(dt.timezone.utc), "decoder": "pil"})
    rows.append({**rows[0], "uri": str(src / "broken.png"), "score": None, "is_fake": None, "width": None,
                 "height": None, "error": "decode: not an image"})
    (src / "gone.png").unlink()
    Image.new("RGB", (64, 64), "white").save(src / SWAPPED, format="PNG")  # a harmless picture under the old key
    run = tmp_path / "scores" / "dt=2026-11-27" / "run_id=r1"
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), run / "scores.parquet")
    (run / "_summary.json").write_text(json.dumps({"listed": 15, "config": {"max_bytes": 2**20}}))
    (run / "_SUCCESS").write_text("")
    return tmp_path / "scores"


def test_the_report_lists_the_run_and_escapes_what_uploaders_named(scan_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "5", "--output", str(out)]) == 0
    assert ("report of run r1: 5 images (1 changed since the scan, 1 no longer there, 0 larger than 1048576 bytes, "
            "0 unreadable now; no picture of those)") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for part in ("<th>listed</th><td>15</td>", "<th>scored</th><td>14</td>", "<th>flagged</th><td>7</td>",
                 "<th>errors: decode</th><td>1</td>", "histogram.png", 'loading="lazy"'):
        assert part in page, part
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page  # a key is text, not markup
    assert len(list((out / "thumbs").iterdir())) == 3  # the top 5 less the one replaced and the one gone
    assert "AWS" not in page and "X-Amz" not in page  # no credentials, no presigned links


def test_a_card_shows_no_picture_of_an_object_changed_or_gone_since_the_scan(scan_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "5", "--output", str(out)]) == 0
    sheet = cards((out / "index.html").read_text())
    assert "changed since the scan" in sheet[SWAPPED] and "<img" not in sheet[SWAPPED]
    assert "no longer there" in sheet["gone.png"] and "<img" not in sheet["gone.png"]
    assert "<img" in sheet["img_09.jpg"] and "changed" not in sheet["img_09.jpg"]


def test_a_key_with_bidi_or_control_characters_is_shown_as_escapes(scan_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "5", "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "\u202e" not in page  # the key cannot read reversed
    assert r"report\u202egpj.exe" in page and "<img" in cards(page)[r"report\u202egpj.exe"]


def test_the_page_allows_only_its_own_images_and_inline_style(scan_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "3", "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    head = page.split("</head>", 1)[0]
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src \'self\'; '
            'style-src \'unsafe-inline\'">') in head
    assert "<script" not in page


def test_a_report_with_its_folder_under_a_file_is_one_line(scan_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["report", "--scores", str(scan_run), "--output", str(tmp_path / "file" / "report")]) == 2
    err = capsys.readouterr().err  # refused before any work, by the check every output folder gets
    assert err.startswith("ntf-ray report: error: output folder") and "is not a folder" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_endpoint_is_one_line_without_the_endpoint(s3, scan_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection: seconds each
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for argv in (["--scores", str(scan_run), "--output", "s3://nowhere/report"],
                 ["--scores", "s3://nowhere/scores", "--output", str(tmp_path / "report")]):
        assert main(["report", *argv, "--s3-endpoint", endpoint]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ntf-ray report: error:") and len(err.strip().splitlines()) == 1, err
        assert "127.0.0.1" not in err and "Traceback" not in err


def test_a_report_in_a_bucket_reads_only_what_was_scored_and_never_more_than_the_cap(s3, bucket, tmp_path,
                                                                                     monkeypatch):
    """On S3, with the scan's If-Match reads: a swapped, a grown (past max_bytes) and a deleted
    object get notices and no picture, the grown one is never read whole, and the page and its
    pictures go to the bucket (not to a local folder named ``s3:``)."""
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    client, name = s3.client(), bucket[len("s3://"):]
    rng = np.random.default_rng(1)

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    rows = []
    for k, key in enumerate(["keep.png", "swapped.png", "grown.png", "deleted.png"]):
        data = png(32)
        etag = client.put_object(Bucket=name, Key=f"data/{key}", Body=data)["ETag"].strip('"')
        rows.append({"uri": f"{bucket}/data/{key}", "etag": etag, "size_bytes": len(data), "last_modified": None,
                     "score": 0.9 - k / 10, "is_fake": True, "threshold": 0.5, "width": 32, "height": 32,
                     "format": "PNG", "error": None, "model_id": "m1", "scanned_at": dt.datetime.now(dt.timezone.utc),
                     "decoder": "pil"})
    cap = 50_000
    run = f"{bucket}/scores/dt=2026-11-27/run_id=r1"
    fs, path = storage.arrow_filesystem(f"{run}/scores.parquet", options)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), path, filesystem=fs)
    storage.write_bytes(f"{run}/_summary.json", json.dumps({"listed": 4, "config": {"max_bytes": cap}}).encode(),
                        options)
    storage.write_bytes(f"{run}/_SUCCESS", b"", options)
    client.put_object(Bucket=name, Key="data/swapped.png", Body=png(32))  # same key, other bytes
    grown = png(256)
    assert len(grown) > cap
    client.put_object(Bucket=name, Key="data/grown.png", Body=grown)
    client.delete_object(Bucket=name, Key="data/deleted.png")

    reads = []
    read_many = storage.read_many

    def recorded(uris, options=None, *, etags=None, max_bytes=None):
        out = read_many(uris, options, etags=etags, max_bytes=max_bytes)
        reads.extend((u, max_bytes, len(v) if isinstance(v, bytes) else type(v).__name__) for u, v in zip(uris, out))
        return out

    monkeypatch.setattr(storage, "read_many", recorded)
    monkeypatch.chdir(tmp_path)
    argv = ["report", "--scores", f"{bucket}/scores", "--s3-endpoint", s3.endpoint_url]
    assert main([*argv, "--output", f"{bucket}/report"]) == 0
    assert not (tmp_path / "s3:").exists()
    page = storage.read_bytes(f"{bucket}/report/index.html", options).decode()
    sheet = cards(page)
    for key, notice in (("swapped.png", "changed since the scan"), ("grown.png", "changed since the scan"),
                        ("deleted.png", "no longer there")):
        assert notice in sheet[key] and "<img" not in sheet[key], key
    assert "<img" in sheet["keep.png"]
    assert storage.exists(f"{bucket}/report/thumbs/00000.jpg", options)
    assert storage.exists(f"{bucket}/report/histogram.png", options)
    assert {u for u, _, _ in reads} == {r["uri"] for r in rows}
    assert all(m == cap for _, m, _ in reads)  # every read capped at the scan's max_bytes...
    assert dict((u.rsplit("/", 1)[-1], n) for u, _, n in reads)["grown.png"] == "ObjectChanged"  # ...the grown unread

    reads.clear()  # a smaller --max-bytes: an object listed larger is not read at all
    assert main([*argv, "--max-bytes", "100", "--output", f"{bucket}/small"]) == 0
    sheet = cards(storage.read_bytes(f"{bucket}/small/index.html", options).decode())
    assert "larger than 100 bytes" in sheet["keep.png"] and "<img" not in sheet["keep.png"]
    assert reads == []


def browser_runs() -> bool:
    """Chromium and its driver are here, or CI requires them (NTF_REQUIRE_BROWSER: fail, not skip)."""
    return bool(CHROMIUM and CHROMEDRIVER) or bool(os.environ.get("NTF_REQUIRE_BROWSER"))


NEEDS_BROWSER = pytest.mark.skipif(not browser_runs(),
                                   reason="needs Debian's chromium and chromium-driver (CI installs them)")


def render_in_browser(page: Path, screenshot: Path) -> tuple[list[tuple[str, int]], list[dict]]:
    """Open ``page`` in headless Chromium, scroll every lazy picture into view, wait for them,
    and return each picture's (src, naturalWidth) and the console's SEVERE entries."""
    rendered = render_cards_in_browser(page, screenshot)
    return rendered["widths"], rendered["errors"]


def render_cards_in_browser(page: Path, screenshot: Path) -> dict:
    """``render_in_browser``'s ``widths`` and ``errors``, plus ``cards``: each card's rendered
    text (what a moderator reads) and how many pictures it holds."""
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
        cards = driver.execute_script("return [...document.querySelectorAll('figure.card')]"
                                      ".map(c => [c.innerText, c.querySelectorAll('img').length])")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return {"widths": widths, "errors": errors, "cards": cards}


@NEEDS_BROWSER
def test_a_browser_renders_every_picture_of_the_report_without_console_errors(scan_run, tmp_path):
    """Every picture renders under the page's Content-Security-Policy (a blocked one is a console
    error); the card of the object swapped since the scan reads as such and shows no picture;
    the key with U+202E reads with its escape, not reversed."""
    from tests.test_explain import patch_model_for_report

    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "50", "--output", str(out),
                 "--model", patch_model_for_report(tmp_path)]) == 0
    rendered = render_cards_in_browser(out / "index.html", tmp_path / "report.png")
    widths, errors = rendered["widths"], rendered["errors"]
    assert len(widths) == 1 + 2 * 12  # the histogram, then a thumbnail and a heatmap for each image as scored
    assert all(w > 0 for _, w in widths), [s for s, w in widths if w == 0]
    assert errors == []
    by_name = {text.rsplit("/", 1)[-1].strip(): (text, pictures) for text, pictures in rendered["cards"]}
    text, pictures = by_name[SWAPPED]
    assert "changed since the scan" in text and pictures == 0
    text, pictures = by_name["gone.png"]
    assert "no longer there" in text and pictures == 0
    text, pictures = by_name[r"report\u202egpj.exe"]
    assert "\u202e" not in text and pictures == 2


def test_the_report_shows_each_cards_claims_and_lists_where_claims_and_scores_disagree(scan_run, tmp_path):
    """Images that declare a generator but scored low, and a capture but were flagged: where a
    moderator looks first. The claims are the uploader's text: escaped like the keys."""
    (path,) = scan_run.glob("dt=*/run_id=r1/scores.parquet")
    rows = pq.read_table(path).to_pylist()
    claims = {"img_01.jpg": ("c2pa", "trainedAlgorithmicMedia", "Example Model <b>1</b>", "trusted"),  # 0.07: low
              "img_03.jpg": ("png-text", "generator-metadata", "ComfyUI", None),  # 0.21: low
              "img_09.jpg": ("xmp", "trainedAlgorithmicMedia", None, None),  # 0.64: flagged, as it says
              "img_08.png": ("c2pa", "digitalCapture", "Example Camera", "mismatched"),  # 0.57: flagged
              "img_02.png": ("exif", None, "Phone 3.2", None)}
    for row in rows:
        name = row["uri"].rsplit("/", 1)[1]
        if name in claims:
            row["provenance"], row["declared_source"], row["declared_by"], row["c2pa_state"] = claims[name]
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), path)
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "6", "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    sheet = cards(page)
    assert "declares trainedAlgorithmicMedia" in sheet["img_09.jpg"] and "(xmp)" in sheet["img_09.jpg"]
    assert "declares digitalCapture, C2PA mismatched, by Example Camera (c2pa)" in sheet["img_08.png"]
    assert sum("declares" in card for card in sheet.values()) == 2  # the other four top cards say nothing
    low, high = page.split("Declare a generator, scored below the threshold: ", 1)[1].split(
        "Declare a capture, flagged as fake: ", 1)
    assert low.startswith("2<") and low.index("img_01.jpg") < low.index("img_03.jpg") and "img_09" not in low
    assert high.startswith("1<") and "img_08.png" in high and "img_01" not in high
    assert "Example Model &lt;b&gt;1&lt;/b&gt;" in low and "<b>1</b>" not in page  # text, not markup
    assert "<th>declares: trainedAlgorithmicMedia</th><td>2</td>" in page


def test_a_run_written_before_the_provenance_columns_still_reports(scan_run, tmp_path):
    (path,) = scan_run.glob("dt=*/run_id=r1/scores.parquet")
    old = pq.read_table(path)
    pq.write_table(old.select([c for c in old.column_names if c not in PROVENANCE_COLUMNS]), path)
    out = tmp_path / "report"
    assert main(["report", "--scores", str(scan_run), "--top", "3", "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "Declare a capture" not in page and "declares" not in page
