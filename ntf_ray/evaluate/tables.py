"""The evaluation's tables: command-line items, the per-generator tables of every perturbation
level, and strict JSON (see the package notes for the score table they read)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ntf_ray.detector.artifact import json_safe
from ntf_ray.evaluate.metrics import per_family_rows, per_generator_table

log = logging.getLogger(__name__)

CLEAN = "none"
#: blur: Gaussian sigma in px; jpeg: quality 1..100; noise: Gaussian sigma in [0, 1]
#: intensity units; scale: down-scaling factor in (0, 1].
PERTURBATIONS = ("blur", "jpeg", "noise", "scale")
UNITS = {"blur": "Gaussian sigma, px", "jpeg": "JPEG quality", "noise": "Gaussian sigma, [0, 1] units",
          "scale": "down-scaling factor"}
# Blur and noise grow stronger as the level rises, JPEG quality and the scale factor as it falls;
# tables list levels from mild to strong and plots put strong on the right.
STRONGER_UP = {"blur": True, "jpeg": False, "noise": True, "scale": False}


# ---------------------------------------------------------------------------------------
# command-line items


def _level(kind: str, text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"perturbation {item!r}: level {text!r} is not a number") from None
    if kind == "jpeg":
        ok, want = value.is_integer() and 1 <= value <= 100, "an integer quality in 1..100"
    elif kind == "scale":
        ok, want = 0 < value <= 1, "a down-scaling factor in (0, 1]"
    elif kind == "noise":
        ok, want = 0 <= value <= 1, "a Gaussian sigma in [0, 1] intensity units"
    else:
        ok, want = 0 <= value < math.inf, "a Gaussian sigma in px, >= 0"
    if not ok:
        raise ValueError(f"perturbation {item!r}: level {text!r} out of range; {kind} takes {want}")
    return value


def parse_perturbations(items: Sequence[str]) -> dict[str, list[float]]:
    """``["blur=0,1,2", "jpeg=100,75"]`` -> ``{"blur": [0.0, 1.0, 2.0], "jpeg": [100.0, 75.0]}``.

    Kinds are :data:`PERTURBATIONS`; levels keep the given order. ValueError (saying what to
    write instead) for an unknown kind, a bad or out-of-range level, a repeated kind or level,
    or an item without levels.
    """
    out: dict[str, list[float]] = {}
    for item in items:
        kind, sep, rest = str(item).partition("=")
        kind = kind.strip()
        if not sep:
            raise ValueError(f"perturbation {item!r}: write KIND=LEVEL,LEVEL,... e.g. blur=0,1,2")
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation kind {kind!r} in {item!r}; choose one of {', '.join(PERTURBATIONS)}")
        if kind in out:
            raise ValueError(f"perturbation {kind!r} given twice; list all its levels in one item")
        texts = [t.strip() for t in rest.split(",")]
        if not any(texts):
            raise ValueError(f"perturbation {item!r} has no levels; e.g. {kind}=" + {
                "blur": "0,1,2", "jpeg": "100,75,50", "noise": "0,0.01", "scale": "1,0.5"}[kind])
        if not all(texts):
            raise ValueError(f"perturbation {item!r} has an empty level")
        levels = [_level(kind, t, item) for t in texts]
        if len(set(levels)) != len(levels):
            raise ValueError(f"perturbation {item!r} repeats a level")
        out[kind] = levels
    return out


def parse_families(items: Sequence[str]) -> dict[str, str]:
    """``["gan=progan,stylegan", "dm=ldm"]`` -> ``{"progan": "gan", "stylegan": "gan", "ldm": "dm"}``.

    ValueError for an item that is not ``FAMILY=GENERATOR,...`` or a generator in two families.
    """
    out: dict[str, str] = {}
    for item in items:
        family, sep, rest = str(item).partition("=")
        family = family.strip()
        names = [n.strip() for n in rest.split(",")]
        if not sep or not family or not all(names):
            raise ValueError(f"family {item!r}: write FAMILY=GENERATOR,GENERATOR,... e.g. gan=progan,stylegan")
        for name in names:
            if out.get(name, family) != family:
                raise ValueError(f"generator {name!r} is in two families, {out[name]!r} and {family!r}")
            out[name] = family
    return out


# ---------------------------------------------------------------------------------------
# metrics


def _floats(scores: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 (N,), nulls as NaN."""
    return pc.fill_null(scores.column(name).cast(pa.float64()), math.nan).to_numpy()


def score_columns(scores: pa.Table) -> dict[str, np.ndarray]:
    """The score table as arrays of length N: label int64, score float64, generator and
    perturbation object, level float64 (NaN when null), scored bool."""
    missing = [c for c in ("label", "generator", "perturbation", "level", "score") if c not in scores.column_names]
    if missing:
        raise ValueError(f"score table lacks column(s) {missing}; it has {scores.column_names}")
    for name in ("label", "generator", "perturbation"):
        if scores.column(name).null_count:
            raise ValueError(f"score table column {name!r} has nulls")
    score = _floats(scores, "score")
    scored = ~np.isnan(score)
    if "error" in scores.column_names:
        scored &= pc.is_null(scores.column("error")).to_numpy(zero_copy_only=False)
    cols = {
        "label": scores.column("label").to_numpy().astype(np.int64),
        "score": score,
        "generator": np.array(scores.column("generator").to_pylist(), dtype=object),
        "perturbation": np.array(scores.column("perturbation").to_pylist(), dtype=object),
        "level": _floats(scores, "level"),
        "scored": scored,
    }
    unknown = sorted(set(cols["perturbation"].tolist()) - {CLEAN, *PERTURBATIONS})
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown} in the score table; expected {CLEAN!r} or one of {PERTURBATIONS}")
    if np.isnan(cols["level"][cols["perturbation"] != CLEAN]).any():
        raise ValueError("score table has perturbed rows without a level")
    return cols


def _families_of(scores: pa.Table) -> dict[str, str]:
    """generator -> family from the table's ``family`` column (non-null values)."""
    if "family" not in scores.column_names:
        return {}
    out: dict[str, str] = {}
    for gen, fam in zip(scores.column("generator").to_pylist(), scores.column("family").to_pylist()):
        if fam is not None and out.setdefault(gen, fam) != fam:
            raise ValueError(f"generator {gen!r} has two families in the score table, {out[gen]!r} and {fam!r}")
    return out


def _section(cols: Mapping[str, np.ndarray], mask: np.ndarray, *, threshold: float, families: Mapping[str, str]) -> dict:
    failed = mask & ~cols["scored"]
    keep = mask & cols["scored"]
    table = per_generator_table(cols["label"][keep], cols["score"][keep], cols["generator"][keep], threshold=threshold)
    return {
        "table": table,
        "families": per_family_rows(table, families),
        "errors": {"total": int(failed.sum()), "by_generator": dict(sorted(Counter(cols["generator"][failed].tolist()).items()))},
    }


def compute_metrics(scores: pa.Table, *, threshold: float, families: Mapping[str, str] | None = None) -> dict:
    """The paper's tables for the clean images and for every perturbation level.

    Returns ``threshold``, ``families`` (generator -> family: the argument, else the table's
    ``family`` column), ``rows`` and ``errors`` (rows not scored, in total), ``clean`` and, per
    kind, ``perturbations[kind]`` = list of ``{"level", "table", "families", "errors"}`` from
    mild to strong, where ``table`` holds ``per_generator_table`` rows (fractions, the last one
    ``average`` with ``map``), ``families`` holds ``per_family_rows`` and ``errors`` =
    ``{"total", "by_generator"}``; and ``robustness[kind]`` = list of ``{"level", "images",
    "ap", "acc", "map"}`` from each level's average row. Undefined metrics are NaN
    (:func:`to_json` writes them as null).
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    cols = score_columns(scores)
    families = dict(families) if families is not None else _families_of(scores)
    pert = cols["perturbation"]
    result: dict = {
        "threshold": float(threshold),
        "families": dict(sorted(families.items())),
        "rows": int(len(pert)),
        "errors": int((~cols["scored"]).sum()),
        "clean": _section(cols, pert == CLEAN, threshold=threshold, families=families),
        "perturbations": {},
        "robustness": {},
    }
    for kind in (k for k in PERTURBATIONS if (pert == k).any()):
        levels = sorted(set(cols["level"][pert == kind].tolist()), reverse=not STRONGER_UP[kind])
        sections = [{"level": level, **_section(cols, (pert == kind) & (cols["level"] == level), threshold=threshold,
                                                families=families)} for level in levels]
        result["perturbations"][kind] = sections
        result["robustness"][kind] = [
            {"level": s["level"], "images": s["table"][-1]["images"],
             **{k: s["table"][-1][k] for k in ("ap", "acc", "map")}} for s in sections]
    log.info("metrics for %d rows (%d not scored), perturbations %s", result["rows"], result["errors"],
             list(result["perturbations"]) or "none")
    return result


def as_float(value: Any) -> float:
    """A metric read back from JSON: null -> NaN."""
    return math.nan if value is None else float(value)


def to_json(metrics: Mapping[str, Any]) -> str:
    """Strict JSON (NaN and infinities become null)."""
    return json.dumps(json_safe(metrics), indent=2, allow_nan=False, default=str)
