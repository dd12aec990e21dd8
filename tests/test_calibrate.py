"""Threshold calibration against brute force and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from ntf_ray.detector.calibrate import TooFewReals, calibrate, choose_threshold, fpr_upper_bound, min_reals


def _best_flagged(scores: np.ndarray, k: int) -> int:
    """Brute force: the most reals any threshold flags without flagging more than k."""
    candidates = np.concatenate([scores, [np.nextafter(scores.max(), np.inf)]])
    return max(int((scores >= t).sum()) for t in candidates if (scores >= t).sum() <= k)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.01, 0.05, 0.2, 0.5])
def test_the_threshold_flags_as_many_reals_as_the_target_allows_and_no_more(seed, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    scores = rng.beta(2, 5, n).astype(np.float32).astype(np.float64)
    scores[rng.integers(0, n, n // 5)] = scores[0]  # ties
    threshold, fp = choose_threshold(scores, target)
    k = math.floor(target * n)
    assert fp == int((scores >= threshold).sum()) <= k
    assert fp == _best_flagged(scores, k)  # no lower threshold stays within the target
    assert 0.0 <= threshold <= 1.0


def test_scores_compared_as_the_scorer_compares_them():
    scores = np.asarray([0.9, 0.8, 0.8, 0.7] + [0.1] * 96, dtype=np.float32)
    threshold, fp = choose_threshold(scores, 0.02)  # 2 of 100 allowed, but 0.8 is tied: only 0.9
    assert fp == 1 and threshold > float(np.float32(0.8)) and float(np.float32(0.9)) >= threshold
    assert [float(s) >= threshold for s in scores[:4]] == [True, False, False, False]


def test_the_upper_bound_is_clopper_pearsons():
    for n in (60, 300, 1000):
        assert fpr_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)  # closed form at 0
        for fp in (1, 3, n // 20):
            p = fpr_upper_bound(fp, n)
            assert binom.cdf(fp, n, p) == pytest.approx(0.05, abs=1e-6)  # P(X <= fp | p) = 5% at the bound
    assert fpr_upper_bound(5, 5) == 1.0


def test_too_few_reals_are_refused_with_what_would_do():
    assert (min_reals(0.01), min_reals(0.05)) == (300, 60)
    with pytest.raises(TooFewReals, match="needs at least 60 reals"):
        calibrate(np.linspace(0, 1, 59), 0.05, split="val")
    cal = calibrate(np.linspace(0, 1, 60), 0.05, split="val", previous_threshold=0.5, previous_model_id="m")
    assert (cal.reals, cal.false_positives, cal.fpr) == (60, 3, 0.05)
    assert cal.as_dict()["split"] == "val" and cal.date.endswith("Z")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            choose_threshold(np.linspace(0, 1, 500), bad)


def test_reals_that_all_score_one_cannot_be_calibrated():
    with pytest.raises(ValueError, match="score 1.0"):
        choose_threshold(np.ones(100), 0.05)
