"""A detector's threshold chosen for a false positive rate on real images, with its provenance.

A score is P(fake) and an image is flagged when ``score >= threshold``. The trained
threshold (0.5) says nothing about how many real photos a platform will wrongly flag; a
moderation team states that rate instead, and the threshold follows from the scores of real
images the detector did not train on (a manifest's ``val`` split):

- with ``n`` reals and a target rate ``a``, at most ``k = floor(a * n)`` of them may score at or
  above the threshold; the threshold is the midpoint between the ``(k+1)``-th and the ``k``-th
  highest real score (just above the highest when ``k = 0``), so exactly the ``k`` highest
  (fewer on ties) are flagged;
- the rate achieved on those reals comes with its one-sided 95% Clopper-Pearson upper bound:
  what the rate on new reals from the same source can be, given how few were counted;
- too few reals to say anything is refused: with no false positive among ``n`` reals the
  upper bound is about ``3 / n`` (the rule of three), so a target ``a`` needs at least
  ``ceil(3 / a)`` reals (300 for 1%, 60 for 5%).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass

import numpy as np

#: One-sided confidence of the stated upper bound on the false positive rate.
CONFIDENCE = 0.95


class TooFewReals(ValueError):
    """The split has too few real images for the target rate to mean anything."""


def min_reals(target_fpr: float) -> int:
    """Reals needed before a ``target_fpr`` can be told apart from 0 (the rule of three)."""
    return math.ceil(3.0 / target_fpr)


def fpr_upper_bound(false_positives: int, reals: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``false_positives / reals``."""
    from scipy.stats import beta

    if false_positives >= reals:
        return 1.0
    return float(beta.ppf(confidence, false_positives + 1, reals - false_positives))


@dataclass(frozen=True)
class Calibration:
    """A threshold and where it came from (written to ``model.json`` as ``calibration``)."""

    threshold: float
    target_fpr: float
    reals: int
    false_positives: int
    fpr: float
    fpr_upper95: float
    split: str | None = None
    manifest: str | None = None
    previous_threshold: float | None = None
    previous_model_id: str | None = None
    date: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def choose_threshold(real_scores: np.ndarray, target_fpr: float) -> tuple[float, int]:
    """``(threshold, false positives)``: the lowest threshold that flags at most
    ``floor(target_fpr * n)`` of ``real_scores`` (see the module docstring)."""
    scores = np.sort(np.asarray(real_scores, dtype=np.float64))[::-1]
    n = len(scores)
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"the target false positive rate must be in (0, 1), got {target_fpr}")
    if n == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs the finite scores of at least one real image")
    k = int(math.floor(target_fpr * n + 1e-9))  # < n, as target_fpr < 1
    below = scores[k]  # the (k+1)-th highest: must not be flagged
    threshold = (below + scores[k - 1]) / 2.0 if k > 0 else float(np.nextafter(below, np.inf))
    if threshold <= below:  # ties, or neighbours too close to split in float64
        threshold = float(np.nextafter(below, np.inf))
    if threshold > 1.0:
        raise ValueError(f"more than {k} of {n} reals score 1.0: no threshold in [0, 1] flags at most "
                         f"{target_fpr:.2%} of them")
    return float(threshold), int((scores >= threshold).sum())


def calibrate(real_scores: np.ndarray, target_fpr: float, *, split: str | None = None, manifest: str | None = None,
              previous_threshold: float | None = None, previous_model_id: str | None = None) -> Calibration:
    """The threshold for ``target_fpr`` on ``real_scores``; ``TooFewReals`` when they cannot say."""
    n = len(real_scores)
    need = min_reals(target_fpr) if 0.0 < target_fpr < 1.0 else 0
    if n < need:
        raise TooFewReals(
            f"{n} real images{f' in split {split!r}' if split else ''} cannot calibrate a false positive rate of "
            f"{target_fpr:.2%}: with no false positive at all among n reals the 95% upper bound is about 3/n, so "
            f"{target_fpr:.2%} needs at least {need} reals; add reals to the split or aim for a higher rate")
    threshold, fp = choose_threshold(real_scores, target_fpr)
    return Calibration(threshold=threshold, target_fpr=float(target_fpr), reals=n, false_positives=fp, fpr=fp / n,
                       fpr_upper95=fpr_upper_bound(fp, n), split=split, manifest=manifest,
                       previous_threshold=previous_threshold, previous_model_id=previous_model_id,
                       date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
