"""``ntf-ray evaluate`` through Ray Data: metrics equal scikit-learn's, scores equal the
one-process Scorer's, perturbations are reproducible, the report's files are there.

Local Ray, a tiny random detector (with batch-norm statistics that spread its scores),
small synthetic images: these tests are about the numbers and files, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix

from ntf_ray import storage
from ntf_ray.cli import main
from ntf_ray.detector.artifact import save_artifact
from ntf_ray.detector.scorer import Scorer
from ntf_ray.nn.model import Detector
from ntf_ray.synth import make_synthetic
from ntf_ray.training.datasets import manifest_table, read_manifest, select, write_manifest
from tests.conftest import FAKE_SECRET_ACCESS_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PERTURB = ["blur=0,1.5", "jpeg=90,40", "noise=0,0.05", "scale=1,0.5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    records = make_synthetic(root / "data", n_real=40, n_fake=40, size=40, seed=3)
    for r in records:
        r.pop("family", None)
    manifest = str(root / "data" / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    torch.manual_seed(0)
    detector = Detector.build("tiny").train()
    with torch.no_grad():  # batch-norm statistics of real images, so the scores spread out
        crops = torch.stack([torch.from_numpy(np.array(Image.open(r["uri"]).convert("RGB"))).permute(2, 0, 1)[:, :32, :32]
                             for r in records[:64]])
        for m in detector.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        detector(crops)
    model = str(root / "model")
    save_artifact(model, detector.eval(), input_size=32, threshold=0.5)
    return {"root": root, "manifest": manifest, "model": model}


def _run(setup, out: str, *extra: str, endpoint: str | None = None) -> int:
    args = ["evaluate", "--model", setup["model"], "--manifest", setup["manifest"], "--output", out,
            "--perturb", *PERTURB, "--max-actors", "1", *extra]
    if endpoint:
        args += ["--s3-endpoint", endpoint]
    return main(args)


def test_evaluate_metrics_equal_sklearn_and_scores_equal_the_scorer(local_ray, setup, tmp_path, capsys):
    out = tmp_path / "report"
    assert _run(setup, str(out), "--embeddings", "12", "--families", "up=tconv,nnconv") == 0
    printed = capsys.readouterr().out
    assert "average" in printed and "mAP" in printed and "report.md" in printed

    scores = pq.read_table(out / "scores.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    test = select(read_manifest(setup["manifest"]), split="test")
    assert scores.num_rows == test.num_rows * 9  # clean + 8 perturbation levels
    clean = scores.filter(np.array(scores.column("perturbation").to_pylist()) == "none")
    assert clean.num_rows == test.num_rows and clean.column("error").null_count == clean.num_rows
    s = clean.column("score").to_numpy().astype(np.float64)
    y = clean.column("label").to_numpy().astype(np.int64)
    g = np.array(clean.column("generator").to_pylist())
    assert s.std() > 1e-3  # the comparison below is not between constants

    # The Ray path gives the one-process Scorer's scores.
    direct = Scorer.from_artifact(setup["model"], device="cpu").score_bytes(
        [Path(u).read_bytes() for u in clean.column("uri").to_pylist()])
    np.testing.assert_allclose(s, [r.score for r in direct], atol=1e-6)

    # Per generator: AP, ACC, FPR, FNR as scikit-learn computes them at the artifact's threshold.
    rows = {r["generator"]: r for r in metrics["clean"]["table"]}
    assert sorted(rows) == sorted({*g.tolist(), "average"})
    for gen in set(g):
        m = g == gen
        tn, fp, fn, tp = confusion_matrix(y[m], (s[m] >= 0.5).astype(int), labels=[0, 1]).ravel()
        assert rows[gen]["images"] == m.sum()
        assert rows[gen]["ap"] == pytest.approx(average_precision_score(y[m], s[m]), abs=1e-9)
        assert rows[gen]["acc"] == pytest.approx((tp + tn) / m.sum())
        assert rows[gen]["fpr"] == pytest.approx(fp / (fp + tn))
        assert rows[gen]["fnr"] == pytest.approx(fn / (fn + tp))
    gens = sorted(set(g))
    weights = np.array([(g == k).sum() for k in gens])
    assert rows["average"]["ap"] == pytest.approx(np.average([rows[k]["ap"] for k in gens], weights=weights))
    assert rows["average"]["map"] == pytest.approx(np.mean([rows[k]["ap"] for k in gens]))
    family = metrics["clean"]["families"][0]
    assert family["family"] == "up" and family["generators"] == ["nnconv", "tconv"]

    # Identity levels give the clean scores; real perturbations move them.
    by_level = {}
    for row in scores.to_pylist():
        by_level.setdefault((row["perturbation"], row["level"]), {})[row["uri"]] = row["score"]
    base = by_level[("none", None)]
    for key in (("blur", 0.0), ("noise", 0.0), ("scale", 1.0)):
        assert by_level[key] == base, key
    for key in (("blur", 1.5), ("jpeg", 40.0), ("noise", 0.05), ("scale", 0.5)):
        assert max(abs(by_level[key][u] - base[u]) for u in base) > 1e-4, key

    # The files: report.md links every figure, every PNG opens and is not blank.
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"tsne.png", "robustness_blur.png", "robustness_jpeg.png", "robustness_noise.png",
            "robustness_scale.png"} <= set(pngs)
    assert any(n.startswith("pr_") for n in pngs) and any(n.startswith("hist_") for n in pngs)
    for name in pngs:
        assert f"]({name})" in report, name
        pixels = np.asarray(Image.open(out / name).convert("L"), dtype=np.float64)
        assert pixels.std() > 5 and len(np.unique(pixels)) > 10, name
    assert metrics["model"]["model_id"] and metrics["model"]["head"] == "transfer"


def test_perturbed_tables_are_reproducible_and_reports_go_to_s3(local_ray, setup, s3, bucket):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    for run in ("a", "b"):
        assert _run(setup, f"{bucket}/{run}", endpoint=s3.endpoint_url) == 0
    first, second = (json.loads(storage.read_bytes(f"{bucket}/{r}/metrics.json", options)) for r in ("a", "b"))
    assert first["perturbations"] == second["perturbations"] and first["clean"] == second["clean"]
    a, b = (pq.read_table(storage.s3.fsspec_filesystem(options).open(f"{bucket}/{r}/scores.parquet")) for r in ("a", "b"))
    assert a.equals(b)
    assert set(first["robustness"]) == {"blur", "jpeg", "noise", "scale"}
    text = storage.read_bytes(f"{bucket}/a/report.md", options).decode()
    assert "## Robustness" in text and FAKE_SECRET_ACCESS_KEY not in text
    assert s3.endpoint_url not in text and "ntf-ray evaluate --model" in text  # the command, less the endpoint


def test_evaluate_rejects_bad_arguments_before_any_work(setup, tmp_path, capsys):
    assert main(["evaluate", "--model", setup["model"], "--manifest", setup["manifest"], "--output",
                 str(tmp_path / "r"), "--perturb", "sharpen=1"]) == 2
    assert "sharpen" in capsys.readouterr().err
    assert main(["evaluate", "--model", setup["model"], "--manifest", setup["manifest"], "--output",
                 str(tmp_path / "r"), "--embeddings", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_calibrated_threshold_holds_its_false_positive_rate_on_fresh_reals(local_ray, setup, tmp_path, capsys):
    """calibrate at 5% on a val split of the demo's generator, then scan reals it never saw (another seed)."""
    from ntf_ray.detector.artifact import load_artifact

    val = make_synthetic(tmp_path / "val", n_real=120, n_fake=20, size=40, seed=11, splits={"val": 1.0})
    manifest = str(tmp_path / "val" / "manifest.parquet")
    write_manifest(manifest_table(val), manifest)
    calibrated = str(tmp_path / "calibrated")
    assert main(["calibrate", "--model", setup["model"], "--manifest", manifest, "--target-fpr", "0.05",
                 "--output", calibrated, "--max-actors", "1"]) == 0
    printed = capsys.readouterr().out
    art, before = load_artifact(calibrated), load_artifact(setup["model"])
    cal = art.calibration
    assert art.threshold == cal["threshold"] != before.threshold and art.model_id != before.model_id
    assert (cal["split"], cal["reals"], cal["target_fpr"], cal["previous_model_id"]) == ("val", 120, 0.05, before.model_id)
    assert cal["false_positives"] == 6 and cal["fpr"] == 0.05 and 0.05 < cal["fpr_upper95"] < 0.11 and cal["date"]
    assert f"threshold {cal['threshold']:.6g}" in printed and "95% upper bound" in printed
    after_state, before_state = art.detector.state_dict(), before.detector.state_dict()  # the same network
    assert after_state.keys() == before_state.keys() and all(torch.equal(v, before_state[k]) for k, v in after_state.items())

    fresh = make_synthetic(tmp_path / "fresh", n_real=300, n_fake=1, size=40, seed=12, splits={"test": 1.0})
    assert main(["scan", "--input", str(tmp_path / "fresh"), "--glob", "real_*", "--model", calibrated,
                 "--output", str(tmp_path / "scores"), "--run-id", "fresh", "--max-actors", "1"]) == 0
    table = pq.read_table(next((tmp_path / "scores").rglob("scores.parquet")))
    assert table.num_rows == sum(r["label"] == 0 for r in fresh) == 300 and table.column("error").null_count == 300
    observed = float(np.mean(table.column("is_fake").to_pylist()))
    # its sampling error: the calibration's (120 reals) and this scan's (300), 3 sigma each
    allowed = 0.05 + 3 * np.sqrt(0.05 * 0.95 / 120) + 3 * np.sqrt(0.05 * 0.95 / 300)
    print(f"calibrated on 120 val reals at 5%: threshold {cal['threshold']:.4f}; fresh reals flagged {observed:.2%} "
          f"of 300 (allowed up to {allowed:.2%}); the uncalibrated threshold 0.5 flagged "
          f"{float(np.mean(np.asarray(table.column('score').to_pylist()) >= 0.5)):.2%}")
    assert observed <= allowed


def test_calibrate_refuses_a_split_with_too_few_reals(setup, tmp_path, capsys):
    assert main(["calibrate", "--model", setup["model"], "--manifest", setup["manifest"], "--target-fpr", "0.01",
                 "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "needs at least 300" in err and "real images" in err
    assert not (tmp_path / "c").exists()


def test_a_detector_that_scores_nan_stops_calibrate_and_evaluate_with_one_line(local_ray, setup, tmp_path, capsys):
    from tests.conftest import save_nan_detector

    val = make_synthetic(tmp_path / "val", n_real=70, n_fake=4, size=40, seed=13, splits={"val": 1.0})
    manifest = str(tmp_path / "val" / "manifest.parquet")
    write_manifest(manifest_table(val), manifest)
    model = save_nan_detector(str(tmp_path / "nan"))
    assert main(["calibrate", "--model", model, "--manifest", manifest, "--target-fpr", "0.05",
                 "--output", str(tmp_path / "calibrated"), "--max-actors", "1"]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("ntf-ray calibrate: error: detector ")]
    assert "NaN or infinity" in err and not (tmp_path / "calibrated").exists()
    assert main(["evaluate", "--model", model, "--manifest", manifest, "--split", "val", "--output",
                 str(tmp_path / "report"), "--max-actors", "1"]) == 1
    assert "ntf-ray evaluate: error: detector " in capsys.readouterr().err
    assert not (tmp_path / "report" / "metrics.json").exists()
