"""A scan run as a static page a moderator opens in a browser: the run's summary, a score
histogram, then a contact sheet of the top-scored images (thumbnail, Grad-CAM++ overlay when
a detector is given, score, uri, size).

Every picture is read from the bucket when the report is made and written into the report's
folder (local or ``s3://``) as a small JPEG or PNG: the page holds no credentials and no
presigned URLs, and it keeps working after access to the bucket is gone. Thumbnails load
lazily, so a sheet of hundreds opens at once.

A picture shows what was scored, not what the bucket holds today: each object is read as the
scan read it (``reading``: only while its etag is the row's, ``If-Match`` on S3, and never more
than the scan's ``max_bytes``). An object replaced, grown or deleted since the scan gets a card
that says so and no picture, so a harmless image swapped in before review cannot sit beside
the old score. Keys are text from uploaders: everything the page shows is made visible
(``untrusted_text``: control and bidi characters as escapes) and HTML-escaped, and the page's
Content-Security-Policy allows its own images and inline style only, no script.
"""

from __future__ import annotations

import html
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray import storage
from ntf_ray.errors import READ
from ntf_ray.errors import kind as error_kind
from ntf_ray.scan.reading import _read_with_retries as read_with_retries  # the scan's own reads
from ntf_ray.storage import DEFAULT_MAX_BYTES, ObjectChanged, ObjectTooLarge, StorageOptions
from ntf_ray.untrusted_text import html_text, visible

log = logging.getLogger(__name__)

THUMB = 256  # longest side of a thumbnail, px
PAGE = "index.html"
#: Only the page's own pictures and its inline style: no script, no frame, no request elsewhere.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"

#: Why a card shows no picture: the kind (a ReportResult count) and what the card says.
CHANGED, MISSING, TOO_LARGE, UNREADABLE = "changed", "missing", "too_large", "unreadable"
NOTICES = {
    CHANGED: "changed since the scan: not the bytes that were scored, so not shown",
    MISSING: "no longer there (deleted since the scan)",
    TOO_LARGE: "larger than {max_bytes} bytes: not read",
    UNREADABLE: "not readable now",
}


@dataclass
class ReportResult:
    page: str
    run_id: str
    shown: int
    unreadable: int
    changed: int = 0  # replaced since the scan (another etag): no picture
    missing: int = 0  # deleted since the scan: no picture
    too_large: int = 0  # larger than max_bytes: not read, no picture
    max_bytes: int = DEFAULT_MAX_BYTES


class ReportStorageError(Exception):
    """The scores, the bucket or the report's folder could not be reached: one line, no endpoint."""


def _storage_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    return isinstance(exc, (BotoCoreError, ClientError))  # an unreachable endpoint, no credentials


def _run(scores: str, run_id: str | None, options: StorageOptions) -> tuple[str, str]:
    from ntf_ray.scan.table import ROWS, completed_runs, run_dirs

    runs = dict(run_dirs(scores, options))
    done = set(completed_runs(scores, options))
    if run_id is not None:
        if runs.get(run_id) not in done:
            completed = ", ".join(sorted(visible(r) for r, d in runs.items() if d in done)) or "none"
            raise FileNotFoundError(f"no completed run {run_id!r} under {visible(storage.redact(scores))} "
                                    f"(completed: {completed})")
        return run_id, storage.join(runs[run_id], ROWS)
    if not done:
        raise FileNotFoundError(f"no completed scan run under {visible(storage.redact(scores))}")
    # the latest: folders are dt=DAY/run_id=ID, so the last in order is the newest day's
    folder = sorted(done)[-1]
    rid = next(r for r, d in runs.items() if d == folder)
    return rid, storage.join(folder, ROWS)


def _histogram_png(scores: np.ndarray, threshold: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=100)
    ax.hist(scores, bins=np.linspace(0, 1, 41), color="#4a6fa5")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("score P(fake)")
    ax.set_ylabel("images")
    ax.legend(loc="upper center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _thumbnail(image: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(image)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build_report(scores: str, output: str, *, run_id: str | None = None, top: int = 200, model: str | None = None,
                 max_bytes: int | None = None, options: StorageOptions | None = None) -> ReportResult:
    """Write ``output/index.html`` (and its pictures) for one completed run under ``scores``.

    ``max_bytes``: read no object larger than this (default: the scan's ``max_bytes`` from the
    run's summary, else ``DEFAULT_MAX_BYTES``). Raises ``ReportStorageError`` when the scores,
    the bucket or ``output`` cannot be reached or written (an unreachable endpoint, a file
    where a folder should be), ``FileNotFoundError`` when there is no such run.
    """
    options = options or StorageOptions()
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"--max-bytes must be at least 1, got {max_bytes}")
    try:
        return _build(scores, output, run_id=run_id, top=top, model=model, max_bytes=max_bytes, options=options)
    except FileNotFoundError:  # no such run, or a scores folder that is not there: said as such
        raise
    except Exception as exc:
        if not _storage_failure(exc):
            raise
        # read_error: one line, no secret, and no endpoint URL (it may name internal hosts)
        raise ReportStorageError(storage.read_error(exc).removeprefix(f"{READ}: ")) from exc


def _scan_max_bytes(summary: dict) -> int:
    """The scan's ``max_bytes`` as its summary records it (None there: no cap, so the default)."""
    value = (summary.get("config") or {}).get("max_bytes") if isinstance(summary, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_MAX_BYTES


def _read_scored(rows: list[dict], max_bytes: int, options: StorageOptions) -> list[bytes | Exception]:
    """Each row's object as the scan scored it, or why not: ``ObjectChanged`` (its etag is no
    longer the row's), ``FileNotFoundError``, ``ObjectTooLarge`` (listed larger than
    ``max_bytes``: not read at all; or grown past it: the read stopped one byte after it)."""
    out: list[bytes | Exception] = [b""] * len(rows)
    todo = []
    for k, row in enumerate(rows):
        size = row.get("size_bytes")
        if size is not None and size > max_bytes:
            out[k] = ObjectTooLarge(f"{size} bytes > limit {max_bytes}")
        else:
            todo.append(k)
    values = read_with_retries([rows[k]["uri"] for k in todo], options, etags=[rows[k].get("etag") for k in todo],
                               max_bytes=max_bytes)
    for k, value in zip(todo, values):
        out[k] = value
    return out


def _why_not(exc: Exception) -> str:
    if isinstance(exc, ObjectChanged):
        return CHANGED
    if isinstance(exc, FileNotFoundError):
        return MISSING
    if isinstance(exc, ObjectTooLarge):
        return TOO_LARGE
    return UNREADABLE


def _build(scores: str, output: str, *, run_id: str | None, top: int, model: str | None, max_bytes: int | None,
           options: StorageOptions) -> ReportResult:
    import pyarrow.parquet as pq

    from ntf_ray.images.decode import decode
    from ntf_ray.scan.table import SUMMARY

    rid, rows_uri = _run(scores, run_id, options)
    fs, path = storage.arrow_filesystem(rows_uri, options)
    table = pq.read_table(path, filesystem=fs)
    summary_uri = storage.join(rows_uri.rsplit("/", 1)[0], SUMMARY)
    try:
        summary = json.loads(storage.read_bytes(summary_uri, options))
    except FileNotFoundError:
        summary = {}
    cap = max_bytes if max_bytes is not None else _scan_max_bytes(summary)
    scored = table.filter(pc.is_valid(table.column("score")))
    threshold = float(table.column("threshold")[0].as_py()) if table.num_rows else 0.5
    errors: dict[str, int] = {}
    for e in table.column("error").drop_null().to_pylist():
        kind = error_kind(e)
        errors[kind] = errors.get(kind, 0) + 1
    order = pc.sort_indices(scored, sort_keys=[("score", "descending"), ("uri", "ascending")])
    best = scored.take(order[:top]).to_pylist()

    storage.write_bytes(storage.join(output, "histogram.png"),
                        _histogram_png(scored.column("score").to_numpy(), threshold), options)
    blobs = _read_scored(best, cap, options)
    frames, names, why = {}, {}, {}
    for k, (row, blob) in enumerate(zip(best, blobs)):
        if isinstance(blob, Exception):
            why[k] = _why_not(blob)
            log.warning("report: no picture of %s: %s", visible(row["uri"]), storage.read_error(blob))
            continue
        decoded = decode(blob)
        if not decoded.ok:
            why[k] = UNREADABLE
            continue
        names[k] = f"thumbs/{k:05d}.jpg"
        storage.write_bytes(storage.join(output, names[k]), _thumbnail(decoded.image), options)
        frames[k] = blob
    heatmaps: dict[int, str] = {}
    if model is not None and frames:
        heatmaps = _heatmaps(model, frames, output, options)
    count = {kind: sum(1 for w in why.values() if w == kind) for kind in NOTICES}
    cards = []
    for k, row in enumerate(best):
        if k not in names:
            picture = f'<div class="missing">{html.escape(NOTICES[why[k]].format(max_bytes=cap))}</div>'
        else:
            picture = (f'<img src="{names[k]}" loading="lazy" alt="thumbnail {k + 1}">'
                       + (f'<img src="{heatmaps[k]}" loading="lazy" alt="heatmap {k + 1}">' if k in heatmaps else ""))
            if not row.get("etag"):
                picture += '<div class="note">the scan recorded no version of this object: as read now</div>'
        size = f"{row['width']}x{row['height']}" if row.get("width") else ""
        cards.append(f'<figure class="card">{picture}<figcaption><b>{row["score"]:.4f}</b> '
                     f'{"flagged" if row["is_fake"] else ""} {html_text(size)}<br>{_claims(row)}'
                     f'<code>{html_text(row["uri"])}</code></figcaption></figure>')
    facts = [("run", rid), ("model", table.column("model_id")[0].as_py() if table.num_rows else ""),
             ("rows", table.num_rows), ("scored", scored.num_rows),
             ("flagged", int(pc.sum(pc.cast(table.column("is_fake").fill_null(False), pa.int64())).as_py() or 0)),
             ("threshold", f"{threshold:g}"), ("errors", sum(errors.values()))]
    facts += [(f"errors: {kind}", n) for kind, n in sorted(errors.items())]
    declared = _counts(table, "declared_source")
    facts += [(f"declares: {source}", n) for source, n in sorted(declared.items())]
    disagree = _disagreeing(scored, top)
    if summary.get("listed") is not None:
        facts.insert(2, ("listed", summary["listed"]))
    rows_html = "".join(f"<tr><th>{html_text(k)}</th><td>{html_text(v)}</td></tr>" for k, v in facts)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>ntf-ray report: run {html_text(rid)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ margin: 0; width: 524px; border: 1px solid #ddd; padding: 6px; }}
.card img {{ width: 256px; height: 256px; object-fit: contain; background: #f4f4f4; }}
.missing {{ width: 256px; height: 256px; background: #eee; display: flex; align-items: center; justify-content: center;
            text-align: center; color: #8a1c10; }}
.note {{ font-size: 12px; color: #8a1c10; }}
.claims {{ font-size: 12px; color: #1c4a8a; }}
code {{ word-break: break-all; font-size: 12px; }}
</style></head><body>
<h1>Scan run {html_text(rid)}</h1>
<table>{rows_html}</table>
<h2>Scores</h2><img src="histogram.png" alt="score histogram">
<h2>Top {len(cards)} by score</h2>
<p>Pictures were read from the bucket when this report was made, each only while it still was the version the
scan scored (its etag) and at most {cap} bytes: {count[CHANGED]} changed since the scan, {count[MISSING]} no longer
there, {count[TOO_LARGE]} larger than that, {count[UNREADABLE]} could not be read. Their cards show no picture.
{"Left: a thumbnail of the image; right: the Grad-CAM++ map of the fake logit over the crop it scored." if heatmaps else
 "No heatmaps: make the report with --model to add them."} A score is evidence for review, not proof.</p>
<div class="sheet">{"".join(cards)}</div>
{disagree}
</body></html>
"""
    target = storage.join(output, PAGE)
    storage.write_bytes(target, page.encode(), options)
    return ReportResult(page=target, run_id=rid, shown=len(cards), unreadable=count[UNREADABLE],
                        changed=count[CHANGED], missing=count[MISSING], too_large=count[TOO_LARGE], max_bytes=cap)


def _claims(row: dict) -> str:
    """A card's line on what the image says of itself (``images.provenance``), or nothing."""
    source, state, by = row.get("declared_source"), row.get("c2pa_state"), row.get("declared_by")
    if not (source or state or by):
        return ""
    parts = [f"declares {html_text(source)}" if source else "declares no source"]
    if state:
        parts.append(f"C2PA {html_text(state)}")
    if by:
        parts.append(f"by {html_text(by)}")
    return f'<span class="claims">{", ".join(parts)} ({html_text(row.get("provenance") or "")})</span><br>'


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names:  # a run written before the column was added
        return {}
    out: dict[str, int] = {}
    for value in table.column(column).drop_null().to_pylist():
        out[value] = out.get(value, 0) + 1
    return out


def _disagreeing(scored: pa.Table, top: int) -> str:
    """The images whose claims and score disagree, where a moderator should look first: those
    that declare a generator but scored below the threshold (lowest first), and those that
    declare a capture but were flagged (highest first), ``top`` of each at most."""
    from ntf_ray.images.provenance import DECLARED_CAPTURE, DECLARED_GENERATED

    if "declared_source" not in scored.column_names:
        return ""
    rows = [r for r in scored.select(["uri", "score", "is_fake", "declared_source", "c2pa_state", "declared_by",
                                      "provenance"]).to_pylist() if r["declared_source"]]
    low = sorted((r for r in rows if r["declared_source"] in DECLARED_GENERATED and not r["is_fake"]),
                 key=lambda r: (r["score"], r["uri"]))[:top]
    high = sorted((r for r in rows if r["declared_source"] in DECLARED_CAPTURE and r["is_fake"]),
                  key=lambda r: (-r["score"], r["uri"]))[:top]
    parts = []
    for title, found in (("Declare a generator, scored below the threshold", low),
                         ("Declare a capture, flagged as fake", high)):
        lines = "".join(f"<tr><td>{r['score']:.4f}</td><td>{_claims(r)}</td><td><code>{html_text(r['uri'])}</code>"
                        "</td></tr>" for r in found)
        parts.append(f'<h2>{title}: {len(found)}</h2><table class="disagree">{lines}</table>' if found
                     else f"<h2>{title}: none</h2>")
    return ('<p>What an image says of itself is the uploader\'s word: a credential is worth what its C2PA state says '
            "(trusted only for a signer on your trust list).</p>" + "".join(parts))


def _heatmaps(model: str, frames: dict[int, bytes], output: str, options: StorageOptions) -> dict[int, str]:
    import torch

    from ntf_ray.detector.artifact import load_artifact
    from ntf_ray.detector.explain import cam_maps, overlay_png
    from ntf_ray.detector.scorer import Scorer

    art = load_artifact(model, options=options)
    scorer = Scorer(art.detector, input_size=art.input_size, device="cpu", decoder="pil")
    out = {}
    keys, crops = [], []
    for k, blob in frames.items():
        crop, _ = scorer.preprocess(blob)
        if crop is not None:
            keys.append(k)
            crops.append(crop)
    for start in range(0, len(crops), 32):
        batch = torch.stack(crops[start : start + 32])
        scores, maps = cam_maps(art.detector, batch)
        for j, k in enumerate(keys[start : start + 32]):
            name = f"heatmaps/{k:05d}.png"
            png = overlay_png(batch[j], maps[j], float(scores[j]))
            from PIL import Image

            pair = Image.open(io.BytesIO(png))
            w, h = pair.size
            buf = io.BytesIO()
            pair.crop((w // 2, 0, w, h)).save(buf, format="PNG")  # the map half; the thumbnail is beside it
            storage.write_bytes(storage.join(output, name), buf.getvalue(), options)
            out[k] = name
    return out
