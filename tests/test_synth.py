"""Tests for ntf_ray.synth: procedural real/fake image sets (test data, not a benchmark)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntf_ray import synth
from ntf_ray.synth import (
    ALL_GENERATORS,
    FAMILY_KIND,
    FULL_RES_GENERATORS,
    GENERATORS,
    make_synthetic,
)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)
    }


def _luma(path: str) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return a @ np.array([0.299, 0.587, 0.114])


def test_generators_are_distinct_families():
    assert len(GENERATORS) >= 2
    assert len(set(GENERATORS)) == len(GENERATORS)
    assert {"tconv", "nnconv"} <= set(GENERATORS)


def test_layout_counts_and_records(tmp_path):
    out = tmp_path / "ds"
    recs = make_synthetic(out, n_real=30, n_fake=30, size=(41, 23), seed=1)
    assert len(recs) == 60
    # default splits 0.6 / 0.1 / 0.3
    per = Counter((r["split"], r["label"]) for r in recs)
    assert per == {
        ("train", 0): 18, ("train", 1): 18,
        ("val", 0): 3, ("val", 1): 3,
        ("test", 0): 9, ("test", 1): 9,
    }
    # records are exactly the files on disk, in CNNDetection layout
    assert sorted(Path(r["uri"]) for r in recs) == _files(out.resolve())
    for r in recs:
        p = Path(r["uri"])
        assert p.is_absolute() and p.suffix == ".png"
        assert set(r) == {"uri", "label", "generator", "split", "source", "family"}
        assert p.parent.name == ("0_real" if r["label"] == 0 else "1_fake")
        assert p.parent.parent.name == r["generator"] in GENERATORS
        assert p.parent.parent.parent.name == r["split"]
        assert p.parent.parent.parent.parent == out.resolve()
        assert r["source"] == ("real" if r["label"] == 0 else r["generator"])
        assert r["family"] == FAMILY_KIND[r["generator"]]
        with Image.open(p) as im:
            assert im.size == (41, 23)  # (width, height), odd on purpose
            assert im.mode == "RGB"
            im.load()
    # reals spread evenly over the generator folders: matched reals and fakes per folder
    folder = Counter((r["split"], r["generator"], r["label"]) for r in recs)
    for split in ("train", "val", "test"):
        for g in GENERATORS:
            assert folder[(split, g, 0)] == folder[(split, g, 1)]
    test_counts = [folder[("test", g, 1)] for g in GENERATORS]
    assert max(test_counts) - min(test_counts) <= 1
    # deterministic order: split order, then generator folder, label, index
    keys = [
        (["train", "val", "test"].index(r["split"]), GENERATORS.index(r["generator"]),
         r["label"], r["uri"])
        for r in recs
    ]
    assert keys == sorted(keys)


def test_square_size_and_families_with_two_fakes(tmp_path):
    recs = make_synthetic(tmp_path, n_real=0, n_fake=2, size=16, seed=0)
    assert len(recs) == 2 and all(r["label"] == 1 for r in recs)
    assert {r["source"] for r in recs} == {"tconv", "nnconv"}
    for r in recs:
        with Image.open(r["uri"]) as im:
            assert im.size == (16, 16)
    # n = 0 everywhere is allowed and writes nothing
    assert make_synthetic(tmp_path / "empty", n_real=0, n_fake=0) == []


def test_generator_subset_and_custom_splits(tmp_path):
    recs = make_synthetic(
        tmp_path, n_real=5, n_fake=7, size=8, splits={"a": 0.5, "b": 0.5}, generators=["nnconv"]
    )
    assert {r["generator"] for r in recs} == {"nnconv"}
    assert {r["source"] for r in recs if r["label"] == 1} == {"nnconv"}
    # largest-remainder rounding, ties to the earlier split
    per = Counter((r["split"], r["label"]) for r in recs)
    assert per == {("a", 0): 3, ("b", 0): 2, ("a", 1): 4, ("b", 1): 3}


def test_deterministic_by_seed(tmp_path):
    kw = dict(n_real=6, n_fake=6, size=(48, 32), splits={"train": 0.5, "test": 0.5})
    a = make_synthetic(tmp_path / "a", seed=7, workers=1, **kw)
    b = make_synthetic(tmp_path / "b", seed=7, workers=3, **kw)
    c = make_synthetic(tmp_path / "c", seed=8, **kw)
    da, db, dc = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert len(da) == 12
    assert da == db  # byte-identical, whatever the number of threads
    assert [(r["label"], r["generator"], r["split"]) for r in a] == [
        (r["label"], r["generator"], r["split"]) for r in b
    ]
    assert set(da) == set(dc)  # same names ...
    assert all(da[k] != dc[k] for k in da)  # ... different pixels
    # every image in a set is different
    assert len(set(da.values())) == len(da)
    assert [Path(r["uri"]).name for r in a] == [Path(r["uri"]).name for r in c]


def test_jpeg(tmp_path):
    recs = make_synthetic(
        tmp_path, n_real=3, n_fake=3, size=(64, 48), image_format="jpeg", jpeg_quality=80
    )
    assert len(recs) == 6
    for r in recs:
        assert r["uri"].endswith(".jpg")
        with Image.open(r["uri"]) as im:
            assert im.format == "JPEG" and im.size == (64, 48) and im.mode == "RGB"
            assert not im.info.get("exif")
    again = make_synthetic(
        tmp_path / "again", n_real=3, n_fake=3, size=(64, 48), image_format="JPEG",
        jpeg_quality=80,
    )
    assert [Path(r["uri"]).read_bytes() for r in recs] == [
        Path(r["uri"]).read_bytes() for r in again
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"n_real": -1},
        {"n_fake": -2},
        {"n_real": 1.5},
        {"size": 7},
        {"size": (64, 4)},
        {"size": (64, 64, 3)},
        {"size": "64"},
        {"seed": -1},
        {"image_format": "gif"},
        {"jpeg_quality": 0},
        {"jpeg_quality": 101},
        {"splits": {"train": 0.5, "test": 0.4}},
        {"splits": {"train": 1.0, "test": 0.0}},
        {"splits": {"train": 1.2, "test": -0.2}},
        {"splits": {}},
        {"splits": {"a/b": 1.0}},
        {"generators": ["tconv", "gan9000"]},
        {"generators": []},
        {"generators": "tconv"},
        {"generators": ["tconv", "tconv"]},
        {"generators": ["fingerprint", "fingerprint"]},
        {"generators": ["noise_shape", "full_res"]},
        {"workers": 0},
    ],
)
def test_bad_args(tmp_path, kw):
    args = {"n_real": 2, "n_fake": 2, **kw}
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, **args)
    assert not any(tmp_path.iterdir())  # validated before anything is written


def test_polyphase_upsamplers_match_torch():
    """The numpy generators are the torch layers they stand for (away from borders)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.random((3, 10, 12), dtype=np.float32)
    xt = torch.from_numpy(x)[None]
    for ks in (3, 4):
        k = rng.standard_normal((3, ks, ks)).astype(np.float32)
        ours = synth._poly_up2(x, "zeros", k, transposed=True)
        ref = F.conv_transpose2d(
            xt, torch.from_numpy(k)[:, None], stride=2, padding=1, output_padding=4 - ks, groups=3
        )[0].numpy()
        assert ours.shape == ref.shape == (3, 20, 24)
        np.testing.assert_allclose(ours[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)
    k = rng.standard_normal((3, 3, 3)).astype(np.float32)
    for up, extra in (("nearest", {}), ("bilinear", {"align_corners": False})):
        ours = synth._poly_up2(x, up, k, transposed=False)
        ref = F.conv2d(
            F.interpolate(xt, scale_factor=2, mode=up, **extra),
            torch.from_numpy(k)[:, None], padding=1, groups=3,
        )[0].numpy()
        np.testing.assert_allclose(ours[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5)


@pytest.fixture(scope="module")
def signal_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("signal")
    n = 20 * len(GENERATORS)  # >= 20 fakes per family, as many reals
    return make_synthetic(out, n_real=n, n_fake=n, size=64, seed=11, splits={"all": 1.0})


def test_fakes_match_global_intensity_stats(signal_set):
    """Global brightness/contrast does not give the fakes away."""
    stats = {0: [], 1: []}
    for r in signal_set:
        y = _luma(r["uri"])
        stats[r["label"]].append((y.mean(), y.std()))
    real, fake = np.mean(stats[0], axis=0), np.mean(stats[1], axis=0)
    assert abs(real[0] - fake[0]) < 8.0  # mean luminance, 8-bit levels
    assert abs(real[1] - fake[1]) / real[1] < 0.1  # contrast


def _periodic_peak(path: str) -> float:
    """Luminance power at the 2-periodic spectral positions (N/2, 0), (0, N/2), (N/2, N/2)
    relative to the mean power of the high-frequency band (max |f| > 1/4 cycles/px)."""
    y = _luma(path)
    y = y - y.mean()
    p = np.abs(np.fft.fft2(y)) ** 2
    h, w = y.shape
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.abs(np.fft.fftfreq(w))[None, :]
    band = p[np.maximum(fy, fx) > 0.25].mean()
    return float((p[h // 2, 0] + p[0, w // 2] + p[h // 2, w // 2]) / 3.0 / band)


def test_fakes_carry_periodic_upsampling_traces(signal_set):
    """An independent signal check: x2 upsampling leaves energy at the 2-periodic
    spectral positions that the full-resolution 'real' images do not have."""
    logs: dict[str, list[float]] = {}
    for r in signal_set:
        logs.setdefault(r["source"], []).append(np.log(_periodic_peak(r["uri"])))
    assert set(logs) == {"real", *GENERATORS}
    real = np.mean(logs["real"])
    for fam in GENERATORS:
        assert len(logs[fam]) >= 20
        # on average at least 3x the reals' level (observed: ~10x to ~200x)
        assert np.mean(logs[fam]) > real + np.log(3.0), (fam, np.mean(logs[fam]), real)


# ------------------------------------------------------- full-resolution families


def test_family_tuples_and_kinds():
    # the default set is the three upsamplers, unchanged
    assert GENERATORS == ("tconv", "nnconv", "bilinear_conv")
    assert len(FULL_RES_GENERATORS) >= 2
    assert ALL_GENERATORS == GENERATORS + FULL_RES_GENERATORS
    assert len(set(ALL_GENERATORS)) == len(ALL_GENERATORS)
    assert set(FAMILY_KIND) == set(synth.KNOWN_GENERATORS) == set(ALL_GENERATORS) | set(synth.HEADROOM_GENERATORS)
    assert {FAMILY_KIND[g] for g in GENERATORS} == {"upsampling"}
    assert {FAMILY_KIND[g] for g in FULL_RES_GENERATORS} == {"full_res"}
    assert {FAMILY_KIND[g] for g in synth.HEADROOM_GENERATORS} == {"headroom"}
    assert not set(synth.HEADROOM_GENERATORS) & set(ALL_GENERATORS)  # "all" stays the five training families
    with pytest.raises(ValueError):
        synth.render_fake(np.random.default_rng(0), 16, 16, "gan9000")


def test_default_generators_are_the_upsamplers(tmp_path):
    recs = make_synthetic(tmp_path, n_real=0, n_fake=9, size=8, seed=0)
    assert {r["source"] for r in recs} == set(GENERATORS)


def test_full_res_families_deterministic(tmp_path):
    kw = {"n_real": 2, "n_fake": 2 * len(ALL_GENERATORS), "size": (40, 24),
          "splits": {"all": 1.0}, "generators": list(reversed(ALL_GENERATORS))}
    a = make_synthetic(tmp_path / "a", seed=3, workers=1, **kw)
    make_synthetic(tmp_path / "b", seed=3, workers=3, **kw)
    make_synthetic(tmp_path / "c", seed=4, **kw)
    assert {r["source"] for r in a if r["label"] == 1} == set(ALL_GENERATORS)
    da, db, dc = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da)
    assert len(set(da.values())) == len(da)
    for fam in FULL_RES_GENERATORS:
        x = synth.render_fake(synth._image_rng(5, "s", 1, 0), 33, 17, fam)
        y = synth.render_fake(synth._image_rng(5, "s", 1, 0), 33, 17, fam)
        assert x.shape == (17, 33, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def family_set(tmp_path_factory):
    """50 fakes of every family and 100 reals, 64 px."""
    out = tmp_path_factory.mktemp("families")
    recs = make_synthetic(out, n_real=100, n_fake=50 * len(ALL_GENERATORS), size=64, seed=11,
                          splits={"all": 1.0}, generators=ALL_GENERATORS)
    imgs: dict[str, list[np.ndarray]] = {}
    for r in recs:
        a = np.asarray(Image.open(r["uri"]).convert("RGB"), dtype=np.float64)
        imgs.setdefault(r["source"], []).append(a)
    return imgs


def _auc(neg, pos) -> float:
    """P(a positive scores above a negative), ties count half."""
    neg, pos = np.asarray(neg)[None, :], np.asarray(pos)[:, None]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _hp(y: np.ndarray) -> np.ndarray:
    """High-pass residual: each pixel minus the mean of its 4 neighbours."""
    return y[1:-1, 1:-1] - 0.25 * (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:])


def _log_top_band(a: np.ndarray) -> float:
    """log share of the luminance power (DC excluded) in the top band, max |f| > 3/8."""
    y = a @ np.array([0.299, 0.587, 0.114])
    p = np.abs(np.fft.fft2(y - y.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(y.shape[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(y.shape[1]))[None, :]
    return float(np.log(p[np.maximum(fy, fx) > 0.375].sum() / p.sum()))


def _periodicity(a: np.ndarray) -> float:
    """Strongest periodic correlation of the luminance residual: max over periods (py, px)
    in 4..16 of the mean normalised autocorrelation at lags (py, 0), (0, px), (py, px)."""
    r = _hp(a @ np.array([0.299, 0.587, 0.114]))
    r = r - r.mean()
    h, w = r.shape
    v = (r * r).mean()

    def ac(dy: int, dx: int) -> float:
        return float((r[dy:, dx:] * r[: h - dy, : w - dx]).mean() / v)

    lags = range(4, 17)
    acy, acx = {d: ac(d, 0) for d in lags}, {d: ac(0, d) for d in lags}
    return max((acy[py] + acx[px] + ac(py, px)) / 3.0 for py in lags for px in lags)


def _chroma_share(a: np.ndarray) -> float:
    """log variance of the red-green residual relative to the luminance residual: the
    reals' fine detail and camera noise are strongly correlated across channels."""
    return float(np.log(_hp(a[..., 0] - a[..., 1]).var() / _hp(a @ [0.299, 0.587, 0.114]).var()))


def test_full_res_families_keep_full_resolution_detail(family_set):
    """The shortcut of the upsampling families (little power in the top frequency band)
    does not tell the full-resolution families from the reals."""
    top = {f: [_log_top_band(a) for a in imgs] for f, imgs in family_set.items()}
    assert set(top) == {"real", *ALL_GENERATORS}
    real = np.mean(top["real"])
    for fam in GENERATORS:  # observed: 7x to 15x less than the reals
        assert np.mean(top[fam]) < real - np.log(3.0), (fam, np.mean(top[fam]), real)
        assert _auc(top[fam], top["real"]) > 0.95
    for fam in FULL_RES_GENERATORS:  # observed: 1.0x to 1.2x the reals, AUC 0.5-0.6
        assert abs(np.mean(top[fam]) - real) < np.log(2.0), (fam, np.mean(top[fam]), real)
        assert 0.25 < _auc(top["real"], top[fam]) < 0.8
        # nor does global brightness / contrast
        y = [a @ np.array([0.299, 0.587, 0.114]) for a in family_set[fam]]
        yr = [a @ np.array([0.299, 0.587, 0.114]) for a in family_set["real"]]
        assert abs(np.mean([v.mean() for v in y]) - np.mean([v.mean() for v in yr])) < 8.0
        assert abs(np.mean([v.std() for v in y]) / np.mean([v.std() for v in yr]) - 1) < 0.1


def test_full_res_families_carry_their_own_traces(family_set):
    """Each full-resolution family departs from the reals by its own trace, and the traces
    differ: a periodic residual marks the fingerprint and not noise_shape; noise_shape's
    decorrelated noise raises the chroma share of the fine detail (so does the
    fingerprint's partly decorrelated tile: that statistic is not specific)."""
    per = {f: [_periodicity(a) for a in family_set[f]] for f in ("real", *FULL_RES_GENERATORS)}
    chroma = {f: [_chroma_share(a) for a in family_set[f]] for f in ("real", "noise_shape")}
    # observed: AUC 0.92 (fingerprint), 0.52 (noise_shape)
    assert _auc(per["real"], per["fingerprint"]) > 0.85
    assert np.mean(per["fingerprint"]) > np.mean(per["real"]) + 0.04
    assert _auc(per["real"], per["noise_shape"]) < 0.7
    # observed: AUC 0.92, 2.9x the reals' chroma share
    assert _auc(chroma["real"], chroma["noise_shape"]) > 0.75
    assert np.mean(chroma["noise_shape"]) > np.mean(chroma["real"]) + np.log(1.5)


def test_cli_generators_groups_and_manifest_family(tmp_path, capsys):
    from ntf_ray.cli import main
    from ntf_ray.training.datasets import read_manifest

    assert main(["synth", str(tmp_path / "d"), "--n-real", "5", "--n-fake", "5", "--size", "16",
                 "--generators", "full_res,tconv"]) == 0
    table = read_manifest(str(tmp_path / "d" / "manifest.parquet"))
    pairs = set(zip(table.column("generator").to_pylist(), table.column("family").to_pylist()))
    assert pairs == {("fingerprint", "full_res"), ("noise_shape", "full_res"), ("tconv", "upsampling")}
    assert main(["synth", str(tmp_path / "e"), "--generators", "nope"]) == 2
    assert "unknown generators ['nope']" in capsys.readouterr().err


def test_headroom_families_render_and_depart_as_described(tmp_path):
    from ntf_ray.synth.scene import _LUMA

    def batch(family, n=12, size=48):
        render = synth.render_real if family == "real" else (lambda rng, w, h: synth.render_fake(rng, w, h, family))
        return np.stack([render(np.random.default_rng(1000 + i), size, size) for i in range(n)]).astype(np.float32)

    def hf(x):  # mean absolute horizontal first difference of the luma: high-frequency energy
        luma = x @ _LUMA
        return float(np.abs(np.diff(luma, axis=2)).mean())

    def chroma(x):
        return float(np.abs(x - (x @ _LUMA)[..., None]).mean())

    real = batch("real")
    for family in synth.HEADROOM_GENERATORS:
        fake = batch(family)
        assert fake.shape == real.shape and fake.min() >= 0 and fake.max() <= 255
    assert hf(batch("sharpened")) > 1.3 * hf(real)  # after re-toning to the same luma spread
    assert chroma(batch("saturated")) > 2 * chroma(real)
    assert np.mean((batch("clipped") == 0) | (batch("clipped") == 255)) > 0.1 > np.mean((real == 0) | (real == 255))
    recs = make_synthetic(tmp_path, n_real=2, n_fake=2, size=16, seed=0, generators=["sharpened", "tconv"])
    assert {r["family"] for r in recs if r["generator"] == "sharpened"} == {"headroom"}
