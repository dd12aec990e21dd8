"""The evaluation report: ``report.md``, ``metrics.json``, ``scores.parquet`` and the figures,
and the summary the command line prints."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ntf_ray import storage
from ntf_ray.evaluate.figures import pr_curves, robustness_curves, score_histograms, tsne
from ntf_ray.evaluate.metrics import format_table
from ntf_ray.evaluate.tables import UNITS, as_float, compute_metrics, to_json
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)


def _pct(value: Any) -> str:
    value = as_float(value)
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, text_columns: int = 1) -> list[str]:
    align = [":--"] * text_columns + ["--:"] * (len(head) - text_columns)
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|", *body, ""]


def _section_md(section: Mapping[str, Any]) -> list[str]:
    rows = [[f"**{r['generator']}**" if r is section["table"][-1] else r["generator"], r["images"],
             *(_pct(r[k]) for k in ("ap", "acc", "fpr", "fnr"))] for r in section["table"]]
    lines = _md_table(["generator", "images", "AP", "ACC", "FPR", "FNR"], rows)
    lines += [f"mAP: **{_pct(section['table'][-1]['map'])}**", ""]
    if section["families"]:
        rows = [[r["family"], ", ".join(r["generators"]), r["images"],
                 *(_pct(r[k]) for k in ("ap", "acc", "fpr", "fnr", "map"))] for r in section["families"]]
        lines += _md_table(["family", "generators", "images", "AP", "ACC", "FPR", "FNR", "mAP"], rows, text_columns=2)
    return lines


def _markdown(report: Mapping[str, Any]) -> str:
    lines = ["# ntf-ray evaluation report", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in report["model"].items()]
    lines += [f"- **threshold**: {report['threshold']:g} (an image is called fake when score >= threshold)"]
    if report.get("command"):
        lines += [f"- **command**: `{report['command']}`"]
    lines += ["", "## Clean images", "",
              "AP, ACC, FPR (reals called fake) and FNR (fakes called real) in percent; the average is "
              "image-weighted over generators, mAP is the mean of the generators' APs.", ""]
    lines += _section_md(report["clean"])
    if report["perturbations"]:
        lines += ["## Robustness", ""]
    for kind, sections in report["perturbations"].items():
        lines += [f"### {kind} ({UNITS[kind]})", ""]
        lines += _md_table(["level", "images", "AP", "ACC", "mAP"],
                           [[f"{r['level']:g}", r["images"], _pct(r["ap"]), _pct(r["acc"]), _pct(r["map"])]
                            for r in report["robustness"][kind]])
        for section in sections:
            lines += [f"#### {kind} = {section['level']:g}", "", *_section_md(section)]
    titles = {"pr": "Precision-recall curves", "histogram": "Score histograms", "robustness": "Robustness curves",
              "tsne": "t-SNE of the embeddings"}
    if any(report["figures"].values()):
        lines += ["## Figures", ""]
    for key, names in report["figures"].items():
        if names:
            lines += [f"### {titles[key]}", "", *(f"![{titles[key]}: {n[:-4]}]({n})" for n in names), ""]
    if report.get("provenance"):
        lines += ["## What the images declare", "",
                  "What each image says of its origin (C2PA, XMP, PNG text chunks), clean images: the uploader's "
                  "word, beside the detector's. `called fake`: scored at or above the threshold.", ""]
        lines += _md_table(["declared source", "reals", "fakes", "called fake"],
                           [[r["declared_source"], r["reals"], r["fakes"], r["called_fake"]]
                            for r in report["provenance"]])
    lines += ["## Errors", ""]
    if report["errors"]:
        by_gen = Counter()
        for section in [report["clean"], *(s for ss in report["perturbations"].values() for s in ss)]:
            by_gen.update(section["errors"]["by_generator"])
        detail = ", ".join(f"{g} {n}" for g, n in sorted(by_gen.items()))
        lines += [f"{report['errors']} of {report['rows']} rows could not be scored and are left out "
                  f"({report['clean']['errors']['total']} clean); by generator: {detail}.", ""]
    else:
        lines += [f"None: all {report['rows']} rows were scored.", ""]
    return "\n".join(lines)


def write_report(scores: pa.Table, *, output: str, threshold: float, model: Mapping[str, Any],
                 families: Mapping[str, str] | None = None, embeddings: np.ndarray | None = None,
                 embedding_rows: pa.Table | None = None, options: StorageOptions | None = None,
                 command: str | None = None) -> dict:
    """Write ``scores.parquet``, ``metrics.json``, the PNG figures and ``report.md`` into
    ``output`` (a folder or ``s3://bucket/prefix``).

    ``embeddings`` (N, d) with ``embedding_rows`` (N rows of ``uri``, ``label``, ``generator``)
    add the t-SNE map. Returns ``compute_metrics``' result plus ``model``, ``command`` and
    ``figures`` (file names by kind: ``pr``, ``histogram``, ``robustness``, ``tsne``), as in
    ``metrics.json`` but with NaN where that file has null.
    """
    result = compute_metrics(scores, threshold=threshold, families=families)
    if (embeddings is None) != (embedding_rows is None):
        raise ValueError("give embeddings and embedding_rows together (one row of uri, label, generator per embedding)")
    if embeddings is not None and len(embeddings) != embedding_rows.num_rows:
        raise ValueError(f"{len(embeddings)} embeddings but {embedding_rows.num_rows} embedding_rows")
    if embeddings is not None and len(embeddings) < 2:
        # After the scoring: a map of one point is no reason to lose the report.
        log.warning("no t-SNE map: %d embedding(s) could be computed, it needs at least 2", len(embeddings))
        embeddings = embedding_rows = None
    figures = {
        "pr": pr_curves(scores, output=output, threshold=threshold, options=options),
        "histogram": score_histograms(scores, output=output, threshold=threshold, options=options),
        "robustness": robustness_curves(result, output=output, options=options),
        "tsne": [] if embeddings is None else tsne(
            embeddings, labels=embedding_rows.column("label").to_numpy(),
            generators=embedding_rows.column("generator").to_pylist(), output=output, options=options),
    }
    report = {**result, "model": dict(model), "command": command, "figures": figures,
              "provenance": _declared(scores, threshold)}
    sink = pa.BufferOutputStream()
    pq.write_table(scores, sink)
    storage.write_bytes(storage.join(output, "scores.parquet"), sink.getvalue().to_pybytes(), options)
    storage.write_bytes(storage.join(output, "metrics.json"), to_json(report).encode(), options)
    storage.write_bytes(storage.join(output, "report.md"), _markdown(report).encode(), options)
    log.info("report written to %s (%d figures)", output, sum(len(v) for v in figures.values()))
    return report


def _declared(scores: pa.Table, threshold: float) -> list[dict]:
    """Clean images by the source they declare (none: ``-``): reals, fakes, and how many the
    detector called fake. Empty when no image declares anything, or the table has no such column."""
    from ntf_ray.evaluate.tables import CLEAN

    if "declared_source" not in scores.column_names:
        return []
    clean = scores.filter(pc.equal(scores.column("perturbation"), CLEAN))
    sources = clean.column("declared_source").to_pylist()
    if not any(sources):
        return []
    out: dict[str, dict] = {}
    for source, label, score in zip(sources, clean.column("label").to_pylist(), clean.column("score").to_pylist()):
        row = out.setdefault(source or "-", {"declared_source": source or "-", "reals": 0, "fakes": 0,
                                              "called_fake": 0})
        row["fakes" if label else "reals"] += 1
        row["called_fake"] += int(score is not None and score >= threshold)
    return sorted(out.values(), key=lambda r: (r["declared_source"] == "-", r["declared_source"]))


def _nan_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]


def format_summary(metrics: Mapping[str, Any]) -> str:
    """What the CLI prints: the clean table and family averages in percent, then one line per
    perturbation level with average AP / ACC and mAP, then the error count. Takes
    ``compute_metrics``' result or the same read back from ``metrics.json``."""
    clean = metrics["clean"]
    lines = [format_table(_nan_rows(clean["table"]), families=_nan_rows(clean["families"]) or None)]
    if metrics["robustness"]:
        lines += ["", "robustness (average over generators, percent)"]
    for kind, levels in metrics["robustness"].items():
        for r in levels:
            lines.append(f"{kind:<6}{r['level']:>8g}  AP {_pct(r['ap']):>5}  ACC {_pct(r['acc']):>5}  "
                         f"mAP {_pct(r['map']):>5}  ({r['images']} images)")
    lines += ["", f"{metrics['errors']} of {metrics['rows']} rows not scored (left out)"]
    return "\n".join(lines)
