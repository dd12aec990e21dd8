"""Metrics against scikit-learn: AP, ACC/FPR/FNR, the per-generator table, its text form.

Convention under test (method.md): 0 = real, 1 = fake, score = P(fake); fake is the
positive class; ``score >= threshold`` is called fake (inclusive).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix

from ntf_ray.evaluate.metrics import (
    Metrics,
    average_precision,
    binary_metrics,
    format_table,
    per_family_rows,
    per_generator_table,
)


def _sk_ap(y, s) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(y, s))


def _random_case(rng: np.random.Generator, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.int64)
    if kind == "continuous":
        s = rng.random(n)
    elif kind == "ties":  # few distinct values: many ties, ties across classes
        s = rng.integers(0, rng.integers(1, 6), n) / 5.0
    elif kind == "quantised":  # realistic float32 scores rounded to 2 decimals
        s = np.round(rng.random(n).astype(np.float32), 2)
    elif kind == "constant":  # everything tied
        s = np.full(n, 0.5)
    else:
        raise AssertionError(kind)
    return y, s


# ---------------------------------------------------------------------------------------
# average_precision


@pytest.mark.parametrize("kind", ["continuous", "ties", "quantised", "constant"])
def test_average_precision_matches_sklearn(kind):
    rng = np.random.default_rng({"continuous": 0, "ties": 1, "quantised": 2, "constant": 3}[kind])
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 60))
        y, s = _random_case(rng, n, kind)
        if y.sum() == 0:
            assert math.isnan(average_precision(y, s))
            continue
        assert average_precision(y, s) == pytest.approx(_sk_ap(y, s), abs=1e-12), (y, s)
        checked += 1
    assert checked > 200


def test_average_precision_all_one_class():
    rng = np.random.default_rng(4)
    for n in (1, 2, 7, 50):
        s = rng.random(n)
        # all fake: precision is 1 at every threshold
        assert average_precision(np.ones(n, int), s) == pytest.approx(_sk_ap(np.ones(n, int), s)) == 1.0
        # all real: no positive, AP undefined -> NaN (sklearn warns and returns 0)
        assert math.isnan(average_precision(np.zeros(n, int), s))
    assert math.isnan(average_precision([], []))


def test_average_precision_known_values_and_inputs():
    # perfect ranking, reversed ranking, a hand-computed case
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    # ranks: 1(fake)@0.9 -> P=1 R=.5 ; 0@0.8 ; 1@0.1 -> P=2/3 R=1  => .5*1 + .5*2/3
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # one tie group holding both classes counts as a single threshold
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # order of inputs does not matter; lists, tuples, bools and float32 accepted
    y, s = [1, 0, 1, 1, 0], np.array([0.3, 0.3, 0.7, 0.1, 0.9], np.float32)
    perm = [3, 0, 4, 1, 2]
    assert average_precision(y, s) == pytest.approx(average_precision([y[i] for i in perm], s[perm]))
    assert average_precision(tuple(bool(v) for v in y), s.tolist()) == pytest.approx(_sk_ap(y, s))


# ---------------------------------------------------------------------------------------
# binary_metrics


def _check_against_sklearn(y, s, t):
    m = binary_metrics(y, s, threshold=t)
    pred = (np.asarray(s) >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert isinstance(m, Metrics)
    assert (m.images, m.n_real, m.n_fake) == (len(y), tn + fp, tp + fn)
    assert m.acc == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    if tn + fp:
        assert m.fpr == pytest.approx(fp / (tn + fp), abs=1e-12)
    else:
        assert math.isnan(m.fpr)
    if tp + fn:
        assert m.fnr == pytest.approx(fn / (tp + fn), abs=1e-12)
        assert m.ap == pytest.approx(_sk_ap(y, s), abs=1e-12)
    else:
        assert math.isnan(m.fnr) and math.isnan(m.ap)


def test_binary_metrics_matches_sklearn():
    rng = np.random.default_rng(5)
    for i in range(300):
        n = int(rng.integers(1, 80))
        y, s = _random_case(rng, n, ("continuous", "ties", "quantised")[i % 3])
        if i % 25 == 0:
            y = np.full(n, i % 2)  # single-class cases
        t = float(rng.choice([0.5, 0.2, 0.8, 0.0, 1.0, float(rng.choice(s))]))  # incl. a threshold equal to a score
        _check_against_sklearn(y, s, t)


def test_threshold_is_inclusive_and_fake_is_positive():
    # score == threshold is called fake
    m = binary_metrics([1, 0], [0.5, 0.5], threshold=0.5)
    assert m.fnr == 0.0 and m.fpr == 1.0 and m.acc == 0.5
    # FPR = reals called fake, FNR = fakes called real
    y = [0, 0, 0, 0, 1, 1]
    s = [0.9, 0.1, 0.2, 0.3, 0.4, 0.6]  # one real above, one fake below
    m = binary_metrics(y, s)
    assert m.fpr == pytest.approx(1 / 4) and m.fnr == pytest.approx(1 / 2)
    assert m.acc == pytest.approx(4 / 6)
    assert (m.n_real, m.n_fake, m.images) == (4, 2, 6)
    assert binary_metrics([1], [np.nextafter(0.5, 0)]).fnr == 1.0


def test_binary_metrics_nan_where_undefined():
    reals = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert math.isnan(reals.fnr) and math.isnan(reals.ap)
    assert reals.fpr == pytest.approx(1 / 3) and reals.acc == pytest.approx(2 / 3)
    fakes = binary_metrics([1, 1], [0.1, 0.7])
    assert math.isnan(fakes.fpr) and fakes.fnr == 0.5 and fakes.ap == 1.0
    empty = binary_metrics([], [])
    assert empty.images == 0 and all(math.isnan(v) for v in (empty.ap, empty.acc, empty.fpr, empty.fnr))
    d = fakes.as_dict()
    assert set(d) == {"images", "n_real", "n_fake", "ap", "acc", "fpr", "fnr"}


# ---------------------------------------------------------------------------------------
# per_generator_table / format_table


def _hand_table(y, s, g, t):
    """The table computed independently with sklearn."""
    rows = {}
    for name in sorted(set(g)):
        idx = [i for i, v in enumerate(g) if v == name]
        yy, ss = np.asarray(y)[idx], np.asarray(s)[idx]
        pred = (ss >= t).astype(int)
        tn, fp, fn, tp = confusion_matrix(yy, pred, labels=[0, 1]).ravel()
        rows[name] = {
            "images": len(idx),
            "n_real": int(tn + fp),
            "n_fake": int(tp + fn),
            "ap": _sk_ap(yy, ss) if tp + fn else math.nan,
            "acc": accuracy_score(yy, pred),
            "fpr": fp / (tn + fp) if tn + fp else math.nan,
            "fnr": fn / (tp + fn) if tp + fn else math.nan,
        }
    return rows


def _weighted(rows, key):
    pairs = [(r[key], r["images"]) for r in rows.values() if not math.isnan(r[key])]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else math.nan


def _approx_or_nan(a, b):
    if math.isnan(b):
        return math.isnan(a)
    return a == pytest.approx(b, abs=1e-12)


def test_per_generator_table_against_sklearn():
    rng = np.random.default_rng(6)
    sizes = {"progan": 40, "stylegan": 25, "biggan": 10, "cyclegan": 3}
    y, s, g = [], [], []
    for name, n in sizes.items():
        yy = rng.integers(0, 2, n)
        yy[0], yy[1] = 0, 1  # both classes present
        y += yy.tolist()
        s += np.round(rng.random(n), 1).tolist()  # ties
        g += [name] * n
    order = rng.permutation(len(y))  # interleave the generators
    y, s, g = [y[i] for i in order], [s[i] for i in order], [g[i] for i in order]

    for t in (0.5, 0.3):
        table = per_generator_table(y, s, g, threshold=t)
        hand = _hand_table(y, s, g, t)
        assert [r["generator"] for r in table] == sorted(sizes) + ["average"]
        for row in table[:-1]:
            want = hand[row["generator"]]
            for key in ("images", "n_real", "n_fake"):
                assert row[key] == want[key]
            for key in ("ap", "acc", "fpr", "fnr"):
                assert _approx_or_nan(row[key], want[key]), (row["generator"], key)
        avg = table[-1]
        assert avg["images"] == len(y)
        assert avg["n_real"] == sum(v == 0 for v in y) and avg["n_fake"] == sum(v == 1 for v in y)
        for key in ("ap", "acc", "fpr", "fnr"):  # weights = images per generator
            assert _approx_or_nan(avg[key], _weighted(hand, key)), key
        assert avg["map"] == pytest.approx(np.mean([r["ap"] for r in hand.values()]), abs=1e-12)
        # the image-weighted average really differs from the plain mean here
        assert avg["ap"] != pytest.approx(avg["map"], abs=1e-6)


def test_per_generator_table_weighted_average_by_hand():
    # generator a: 4 images, AP 1, ACC 1 ; generator b: 1 image (fake, missed), AP 1, ACC 0
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.8, 0.9, 0.3]
    g = ["a", "a", "a", "a", "b"]
    table = per_generator_table(y, s, g)
    a, b, avg = table
    assert (a["generator"], b["generator"], avg["generator"]) == ("a", "b", "average")
    assert a["acc"] == 1.0 and b["acc"] == 0.0
    assert avg["acc"] == pytest.approx(4 / 5)  # (4 * 1 + 1 * 0) / 5
    assert avg["fnr"] == pytest.approx(1 / 5)  # (4 * 0 + 1 * 1) / 5
    assert math.isnan(b["fpr"])  # b has no reals: left out of the weighted FPR
    assert avg["fpr"] == 0.0
    assert avg["map"] == 1.0


def test_per_generator_table_generator_without_fakes():
    y = [0, 0, 1, 0, 1]
    s = [0.2, 0.6, 0.7, 0.1, 0.4]
    g = ["real", "real", "x", "x", "x"]
    table = per_generator_table(y, s, g)
    real = table[0]
    assert real["generator"] == "real" and math.isnan(real["ap"]) and math.isnan(real["fnr"])
    avg = table[-1]
    x_ap = _sk_ap([1, 0, 1], [0.7, 0.1, 0.4])
    assert avg["map"] == pytest.approx(x_ap)  # mean over generators with an AP
    assert avg["ap"] == pytest.approx(x_ap)  # weighted over those only


def test_format_table_prints_percentages():
    y = [0, 0, 1, 0, 1, 1, 0, 1]
    s = [0.2, 0.6, 0.7, 0.1, 0.4, 0.9, 0.3, 0.8]
    g = ["progan", "progan", "progan", "progan", "sd", "sd", "sd", "sd"]
    table = per_generator_table(y, s, g)
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["generator", "images", "AP", "ACC", "FPR", "FNR"]
    body = {ln.split()[0]: ln.split()[1:] for ln in lines[2:] if not ln.startswith("mAP")}
    assert set(body) == {"progan", "sd", "average"}
    for row in table:
        cells = body[row["generator"]]
        assert int(cells[0]) == row["images"]
        for cell, key in zip(cells[1:], ("ap", "acc", "fpr", "fnr")):
            assert float(cell) == pytest.approx(100 * row[key], abs=0.05)
    assert lines[-1] == f"mAP {100 * table[-1]['map']:.1f}"
    assert float(lines[-1].split()[1]) > 1  # percent, not a fraction

    # undefined values print as "-", not "nan"
    text = format_table(per_generator_table([0, 0], [0.2, 0.7], ["real", "real"]))
    assert "nan" not in text.lower()
    assert "-" in text.splitlines()[2].split()
    assert not any(ln.startswith("mAP") for ln in text.splitlines())


# ---------------------------------------------------------------------------------------
# per_family_rows


def _family_case():
    rng = np.random.default_rng(7)
    sizes = {"progan": 30, "stylegan": 12, "ddpm": 20, "ldm": 9, "other": 15}
    y, s, g = [], [], []
    for name, n in sizes.items():
        yy = rng.integers(0, 2, n)
        yy[0], yy[1] = 0, 1
        y += yy.tolist()
        s += np.round(rng.random(n), 2).tolist()
        g += [name] * n
    return y, s, g


def test_per_family_rows_weighted_by_hand():
    y, s, g = _family_case()
    families = {"progan": "gan", "stylegan": "gan", "ddpm": "dm", "ldm": "dm", "absent": "dm"}
    table = per_generator_table(y, s, g, threshold=0.4)
    hand = _hand_table(y, s, g, 0.4)
    rows = per_family_rows(table, families)
    assert [r["family"] for r in rows] == ["dm", "gan"]  # sorted; "other" has no family
    for row in rows:
        names = sorted(n for n, f in families.items() if f == row["family"] and n in hand)
        assert row["generators"] == names
        w = np.array([hand[n]["images"] for n in names], dtype=float)
        assert row["images"] == int(w.sum())
        assert row["n_real"] == sum(hand[n]["n_real"] for n in names)
        assert row["n_fake"] == sum(hand[n]["n_fake"] for n in names)
        for key in ("ap", "acc", "fpr", "fnr"):  # every value is defined: both classes present
            v = np.array([hand[n][key] for n in names])
            assert row[key] == pytest.approx(float(np.dot(v, w) / w.sum()), abs=1e-12), key
        assert row["map"] == pytest.approx(float(np.mean([hand[n]["ap"] for n in names])), abs=1e-12)
    # two generators of different sizes: the weighted mean is not the plain mean
    gan = rows[1]
    assert gan["ap"] != pytest.approx(gan["map"], abs=1e-6)


def test_per_family_rows_small_case_and_edge_cases():
    # a: 4 images, ACC 1 ; b: 1 fake missed, ACC 0, no reals (FPR undefined)
    table = per_generator_table([0, 0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9, 0.3], ["a", "a", "a", "a", "b"])
    (fam,) = per_family_rows(table, {"a": "f", "b": "f", "average": "f"})  # "average" is never a member
    assert fam["generators"] == ["a", "b"] and fam["images"] == 5
    assert fam["acc"] == pytest.approx(4 / 5) and fam["fnr"] == pytest.approx(1 / 5)
    assert fam["fpr"] == 0.0  # b left out of the FPR mean
    assert fam["map"] == 1.0
    assert per_family_rows(table, {}) == []
    # a family whose generators have no fakes: AP and mAP undefined
    (real,) = per_family_rows(per_generator_table([0, 0], [0.1, 0.9], ["r", "r"]), {"r": "reals"})
    assert math.isnan(real["ap"]) and math.isnan(real["map"]) and real["fpr"] == 0.5


def test_format_table_prints_families():
    y, s, g = _family_case()
    table = per_generator_table(y, s, g)
    fams = per_family_rows(table, {"progan": "gan", "stylegan": "gan", "ddpm": "dm", "ldm": "dm"})
    lines = format_table(table, families=fams).splitlines()
    assert format_table(table).splitlines() == lines[: len(table) + 3]  # generator part unchanged
    i = lines.index("") + 1
    assert lines[i].split() == ["family", "images", "AP", "ACC", "FPR", "FNR", "mAP"]
    body = {ln.split()[0]: ln.split()[1:] for ln in lines[i + 2 :]}
    assert set(body) == {"gan", "dm"}
    for row in fams:
        cells = body[row["family"]]
        assert int(cells[0]) == row["images"]
        for cell, key in zip(cells[1:], ("ap", "acc", "fpr", "fnr", "map")):
            assert float(cell) == pytest.approx(100 * row[key], abs=0.05)


def test_average_precision_leaks_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
        assert average_precision([1, 1], [0.1, 0.2]) == 1.0
        assert math.isnan(binary_metrics([0, 0], [0.3, 0.6]).ap)
        assert binary_metrics([1], [0.3]).ap == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: average_precision([0, 2, 1], [0.1, 0.2, 0.3]),
        lambda: average_precision([0, 1], [0.1, 0.2, 0.3]),
        lambda: average_precision([[0, 1]], [[0.1, 0.2]]),
        lambda: binary_metrics([0, 2, 1], [0.1, 0.2, 0.3]),
        lambda: binary_metrics([0, -1], [0.1, 0.2]),
        lambda: binary_metrics([0, 0.5], [0.1, 0.2]),
        lambda: binary_metrics([0, 1, 1], [0.1, 0.2]),
        lambda: binary_metrics([[0, 1]], [[0.1, 0.2]]),
        lambda: per_generator_table([0, 2], [0.1, 0.2], ["a", "a"]),
        lambda: per_generator_table([0, 1], [0.1], ["a", "a"]),
        lambda: per_generator_table([0, 1], [0.1, 0.2], ["a"]),
        lambda: per_generator_table([0, 1], [0.1, 0.2], ["a", "b", "c"]),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
