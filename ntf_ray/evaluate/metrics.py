"""The paper's metrics: AP, ACC, FPR, FNR per generator, weighted averages and mAP.

Fake is the positive class (label 1, score = P(fake)): FPR = share of real images called
fake, FNR = share of fake images called real; an image is called fake when
``score >= threshold``. Every number comes from scikit-learn (``average_precision_score``,
``confusion_matrix``); this module only adds the paper's conventions: NaN where a metric is
undefined, the image-weighted average over generators, mAP, and family averages.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix

METRIC_KEYS = ("ap", "acc", "fpr", "fnr")


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
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (tied scores form one
    threshold): scikit-learn's ``average_precision_score`` with fake (1) as the positive class.

    NaN when there is no positive (scikit-learn would warn and return 0).
    """
    y, s = _check(labels, scores)
    if not y.any():
        return math.nan
    with warnings.catch_warnings():
        # an all-fake set is well defined (AP = 1); nothing of sklearn's may reach the caller
        warnings.simplefilter("ignore")
        return float(average_precision_score(y, s, pos_label=1))


@dataclass
class Metrics:
    """One set of images: counts, and AP / ACC / FPR / FNR as fractions in [0, 1] (NaN where undefined)."""

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
    """AP, ACC at ``threshold`` (score >= threshold is fake), FPR and FNR (NaN where undefined).

    ``labels`` and ``scores`` are 1-D of length N; ACC, FPR and FNR come from scikit-learn's
    confusion matrix over labels [0, 1].
    """
    y, s = _check(labels, scores)
    if y.size == 0:
        return Metrics(images=0, n_real=0, n_fake=0, ap=math.nan, acc=math.nan, fpr=math.nan, fnr=math.nan)
    pred = (s >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    n_real, n_fake = tn + fp, fn + tp
    return Metrics(
        images=int(y.size),
        n_real=n_real,
        n_fake=n_fake,
        ap=average_precision(y, s),
        acc=(tn + tp) / y.size,
        fpr=fp / n_real if n_real else math.nan,
        fnr=fn / n_fake if n_fake else math.nan,
    )


def _weighted_average(rows: Sequence[Mapping]) -> dict:
    """Summed counts, the image-weighted mean of each metric over the rows where it is defined,
    and ``map`` = the plain mean of the rows' defined APs."""
    out: dict = {key: int(sum(r[key] for r in rows)) for key in ("images", "n_real", "n_fake")}
    for key in METRIC_KEYS:
        pairs = [(r[key], r["images"]) for r in rows if not math.isnan(r[key])]
        weight = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / weight if weight else math.nan
    aps = [r["ap"] for r in rows if not math.isnan(r["ap"])]
    out["map"] = sum(aps) / len(aps) if aps else math.nan
    return out


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
    rows.append({"generator": "average", **_weighted_average(rows)})
    return rows


def per_family_rows(rows: Sequence[Mapping], families: Mapping[str, str]) -> list[dict]:
    """Image-weighted average rows per family, from ``per_generator_table`` rows.

    ``families`` maps generator -> family. Each family present among the rows (sorted by name)
    gets ``family``, its ``generators`` (sorted), summed counts, the image-weighted AP / ACC /
    FPR / FNR over its generators where defined, and ``map`` = the mean of their APs.
    Generators without a family, and the ``average`` row, are left out.
    """
    members: dict[str, list[Mapping]] = {}
    for row in rows:
        family = families.get(row["generator"]) if row["generator"] != "average" else None
        if family is not None:
            members.setdefault(family, []).append(row)
    return [
        {"family": family, "generators": sorted(r["generator"] for r in group), **_weighted_average(group)}
        for family, group in sorted(members.items())
    ]


def _pct(value: float) -> str:
    return f"{100 * value:8.1f}" if not math.isnan(value) else f"{'-':>8}"


def format_table(rows: list[dict], families: list[dict] | None = None) -> str:
    """Plain-text table in percent, as the paper prints it; ``families`` (``per_family_rows``)
    adds one line per family with its mAP."""
    head = f"{'generator':<16}{'images':>8}{'AP':>8}{'ACC':>8}{'FPR':>8}{'FNR':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['generator']:<16}{r['images']:>8}" + "".join(_pct(r[k]) for k in METRIC_KEYS))
    if rows and "map" in rows[-1] and not math.isnan(rows[-1]["map"]):
        lines.append(f"mAP {100 * rows[-1]['map']:.1f}")
    if families:
        head = f"{'family':<16}{'images':>8}{'AP':>8}{'ACC':>8}{'FPR':>8}{'FNR':>8}{'mAP':>8}"
        lines += ["", head, "-" * len(head)]
        for r in families:
            lines.append(f"{r['family']:<16}{r['images']:>8}" + "".join(_pct(r[k]) for k in (*METRIC_KEYS, "map")))
    return "\n".join(lines)
