"""A scan run as a static page a moderator opens in a browser: the run's summary, a score
histogram, then a contact sheet of the top-scored images (thumbnail, Grad-CAM++ overlay when
a detector is given, score, uri, size).

Every picture is read from the bucket when the report is made and written into the report's
folder as a small JPEG or PNG: the page holds no credentials and no presigned URLs, and it
keeps working after access to the bucket is gone. Thumbnails load lazily, so a sheet of
hundreds opens at once. Object keys are text from uploaders: everything the page shows is
HTML-escaped.
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
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)

THUMB = 256  # longest side of a thumbnail, px
PAGE = "index.html"


@dataclass
class ReportResult:
    page: str
    run_id: str
    shown: int
    unreadable: int


def _run(scores: str, run_id: str | None, options: StorageOptions) -> tuple[str, str]:
    from ntf_ray.ray_scan.table import ROWS, _run_dirs, completed_runs

    runs = dict(_run_dirs(scores, options))
    done = set(completed_runs(scores, options))
    if run_id is not None:
        if runs.get(run_id) not in done:
            raise FileNotFoundError(f"no completed run {run_id!r} under {storage.redact(scores)} "
                                    f"(completed: {', '.join(sorted(r for r, d in runs.items() if d in done)) or 'none'})")
        return run_id, storage.join(runs[run_id], ROWS)
    if not done:
        raise FileNotFoundError(f"no completed scan run under {storage.redact(scores)}")
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
                 options: StorageOptions | None = None) -> ReportResult:
    """Write ``output/index.html`` (and its pictures) for one completed run under ``scores``."""
    import pyarrow.parquet as pq

    from ntf_ray.decode import decode

    options = options or StorageOptions()
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    rid, rows_uri = _run(scores, run_id, options)
    fs, path = storage.arrow_filesystem(rows_uri, options) if storage.is_s3(rows_uri) else (None, rows_uri)
    table = pq.read_table(path, filesystem=fs)
    summary_uri = rows_uri.rsplit("/", 1)[0] + "/_summary.json"
    try:
        summary = json.loads(storage.read_bytes(summary_uri, options))
    except FileNotFoundError:
        summary = {}
    scored = table.filter(pc.is_valid(table.column("score")))
    threshold = float(table.column("threshold")[0].as_py()) if table.num_rows else 0.5
    errors: dict[str, int] = {}
    for e in table.column("error").drop_null().to_pylist():
        kind = e.split(":", 1)[0]
        errors[kind] = errors.get(kind, 0) + 1
    order = pc.sort_indices(scored, sort_keys=[("score", "descending"), ("uri", "ascending")])
    best = scored.take(order[:top])
    uris = best.column("uri").to_pylist()

    storage.write_bytes(storage.join(output, "histogram.png"),
                        _histogram_png(scored.column("score").to_numpy(), threshold), options)
    blobs = storage.read_many(uris, options)
    frames, names, unreadable = {}, {}, 0
    for k, (uri, blob) in enumerate(zip(uris, blobs)):
        if isinstance(blob, Exception):
            unreadable += 1
            log.warning("report: cannot read %s: %s", uri, storage.read_error(blob))
            continue
        decoded = decode(blob)
        if not decoded.ok:
            unreadable += 1
            continue
        names[k] = f"thumbs/{k:05d}.jpg"
        storage.write_bytes(storage.join(output, names[k]), _thumbnail(decoded.image), options)
        frames[k] = blob
    heatmaps: dict[int, str] = {}
    if model is not None and frames:
        heatmaps = _heatmaps(model, frames, output, options)
    cards = []
    for k, row in enumerate(best.to_pylist()):
        if k not in names:
            picture = '<div class="missing">not readable now</div>'
        else:
            picture = (f'<img src="{names[k]}" loading="lazy" alt="thumbnail {k + 1}">'
                       + (f'<img src="{heatmaps[k]}" loading="lazy" alt="heatmap {k + 1}">' if k in heatmaps else ""))
        size = f"{row['width']}x{row['height']}" if row.get("width") else ""
        cards.append(f'<figure class="card">{picture}<figcaption><b>{row["score"]:.4f}</b> '
                     f'{"flagged" if row["is_fake"] else ""} {html.escape(size)}<br>'
                     f'<code>{html.escape(row["uri"])}</code></figcaption></figure>')
    facts = [("run", rid), ("model", table.column("model_id")[0].as_py() if table.num_rows else ""),
             ("rows", table.num_rows), ("scored", scored.num_rows),
             ("flagged", int(pc.sum(pc.cast(table.column("is_fake").fill_null(False), pa.int64())).as_py() or 0)),
             ("threshold", f"{threshold:g}"), ("errors", sum(errors.values()))]
    facts += [(f"errors: {kind}", n) for kind, n in sorted(errors.items())]
    if summary.get("listed") is not None:
        facts.insert(2, ("listed", summary["listed"]))
    rows_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ntf-ray report: run {html.escape(rid)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ margin: 0; width: 524px; border: 1px solid #ddd; padding: 6px; }}
.card img {{ width: 256px; height: 256px; object-fit: contain; background: #f4f4f4; }}
.missing {{ width: 256px; height: 256px; background: #eee; display: flex; align-items: center; justify-content: center; }}
code {{ word-break: break-all; font-size: 12px; }}
</style></head><body>
<h1>Scan run {html.escape(rid)}</h1>
<table>{rows_html}</table>
<h2>Scores</h2><img src="histogram.png" alt="score histogram">
<h2>Top {len(cards)} by score</h2>
<p>Pictures were read from the bucket when this report was made ({unreadable} could not be read).
{"Left: a thumbnail of the image; right: the Grad-CAM++ map of the fake logit over the crop it scored." if heatmaps else
 "No heatmaps: make the report with --model to add them."} A score is evidence for review, not proof.</p>
<div class="sheet">{"".join(cards)}</div>
</body></html>
"""
    target = storage.join(output, PAGE)
    storage.write_bytes(target, page.encode(), options)
    return ReportResult(page=target, run_id=rid, shown=len(cards), unreadable=unreadable)


def _heatmaps(model: str, frames: dict[int, bytes], output: str, options: StorageOptions) -> dict[int, str]:
    import torch

    from ntf_ray.artifact import load_artifact
    from ntf_ray.explain import cam_maps, overlay_png
    from ntf_ray.scoring import Scorer

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
