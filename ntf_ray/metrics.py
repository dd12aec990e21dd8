"""The paper's metrics: AP, ACC, FPR, FNR per generator, weighted average and mAP.

Fake is the positive class (label 1, score = P(fake)): FPR = share of real images called
fake, FNR = share of fake images called real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 0/1 and scores as float64, both 1-D of one length, else ValueError."""
    raw = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if raw.shape != s.shape or raw.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of the same length, got {raw.shape} and {s.shape}")
    if raw.size and not np.isin(raw, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    return raw.astype(np.int64), s


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n, as scikit-learn defines it.

    Tied scores form one threshold. NaN when there is no positive.
    """
    y, s = _check(labels, scores)
    positives = int(y.sum())
    if positives == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # last index of every distinct score: the precision/recall point of that threshold
    ends = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[ends]
    predicted = ends + 1
    precision = tp / predicted
    recall = tp / positives
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


@dataclass
class Metrics:
    images: int
    n_real: int
    n_fake: int
    ap: float
    acc: float
    fpr: float
    fnr: float

    def as_dict(self) -> dict:
        return asdict(self)


def binary_metrics(labels, scores, threshold: float = 0.5) -> Metrics:
    """AP, ACC at ``threshold`` (score >= threshold is fake), FPR and FNR (NaN where undefined)."""
    y, s = _check(labels, scores)
    pred = s >= threshold
    n_fake = int(y.sum())
    n_real = int(y.size - n_fake)
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return Metrics(
        images=int(y.size),
        n_real=n_real,
        n_fake=n_fake,
        ap=average_precision(y, s) if n_real + n_fake else math.nan,
        acc=float(np.mean(pred == (y == 1))) if y.size else math.nan,
        fpr=fp / n_real if n_real else math.nan,
        fnr=fn / n_fake if n_fake else math.nan,
    )


def per_generator_table(labels, scores, generators, threshold: float = 0.5) -> list[dict]:
    """One row per generator (sorted), then ``average`` (image-weighted mean of each metric over
    generators where it is defined) with ``map`` = the plain mean of the generators' APs."""
    y, s = _check(labels, scores)
    g = np.asarray(list(generators), dtype=object)
    if g.shape != y.shape:
        raise ValueError(f"generators must be 1-D with one entry per label: {g.shape} vs {y.shape}")
    rows = []
    for name in sorted(set(g.tolist())):
        mask = g == name
        rows.append({"generator": name, **binary_metrics(y[mask], s[mask], threshold).as_dict()})
    average: dict = {"generator": "average", "images": int(sum(r["images"] for r in rows)),
                     "n_real": int(sum(r["n_real"] for r in rows)), "n_fake": int(sum(r["n_fake"] for r in rows))}
    for key in ("ap", "acc", "fpr", "fnr"):
        pairs = [(r[key], r["images"]) for r in rows if not math.isnan(r[key])]
        weight = sum(w for _, w in pairs)
        average[key] = sum(v * w for v, w in pairs) / weight if weight else math.nan
    aps = [r["ap"] for r in rows if not math.isnan(r["ap"])]
    average["map"] = sum(aps) / len(aps) if aps else math.nan
    rows.append(average)
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table in percent, as the paper prints it."""
    head = f"{'generator':<16}{'images':>8}{'AP':>8}{'ACC':>8}{'FPR':>8}{'FNR':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = [f"{100 * r[k]:8.1f}" if not math.isnan(r[k]) else f"{'-':>8}" for k in ("ap", "acc", "fpr", "fnr")]
        lines.append(f"{r['generator']:<16}{r['images']:>8}" + "".join(pct))
    if rows and "map" in rows[-1] and not math.isnan(rows[-1]["map"]):
        lines.append(f"mAP {100 * rows[-1]['map']:.1f}")
    return "\n".join(lines)
