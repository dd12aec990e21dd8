"""The distance to the natural traces (ntf_ray.nn.traces) and the variants that decide by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntf_ray.nn.model import Detector
from ntf_ray.nn.traces import NaturalTraces
from ntf_ray.nn.variants import get_variant


def test_the_distance_is_mahalanobis_under_the_reals_shrunk_covariance():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    cov = np.diag([4.0, 1.0, 0.25])
    reals = rng.multivariate_normal([1.0, -2.0, 0.5], cov, size=2000)
    held = rng.multivariate_normal([1.0, -2.0, 0.5], cov, size=1000)
    traces = NaturalTraces.fit(reals, held, with_classifier=False)
    lw = LedoitWolf().fit(reals)
    probe = np.array([[1.0, -2.0, 0.5], [11.0, -2.0, 0.5], [1.0, -2.0, 3.0]])
    d = probe - lw.location_
    want = np.log(np.einsum("ni,ij,nj->n", d, lw.precision_, d).clip(1e-12))
    assert np.allclose(traces.log_distance(torch.tensor(probe)).numpy(), want, rtol=1e-4, atol=1e-4)
    # Calibrated on the held-out reals: 1% of them beyond the edge (0), the median 4 units below it.
    logits = traces(torch.tensor(held, dtype=torch.float32)).numpy()
    assert (logits > 0).mean() == pytest.approx(0.01, abs=0.002) and np.median(logits) == pytest.approx(-4.0, abs=0.05)
    # 5 sd out on the first axis or on the third (squared distance 25, beyond the 99th
    # percentile of a 3-d chi-square, 11.3): far from the reals either way.
    assert (traces(torch.tensor(probe[1:], dtype=torch.float32)) > 0).all()


def test_with_the_classifier_the_decision_is_the_most_alarming_of_three_readings():
    rng = np.random.default_rng(1)
    reals, held = rng.normal(size=(500, 4)), rng.normal(size=(400, 4))
    held_logits = rng.normal(-2.0, 1.0, size=400)
    traces = NaturalTraces.fit(reals, held, held_logits)
    low = np.quantile(held_logits, 0.01)
    assert float(traces.low_edge) == pytest.approx(low, rel=1e-5)
    assert float(traces.low_width) == pytest.approx((np.median(held_logits) - low) / 4, rel=1e-5)
    e = torch.zeros((4, 4))  # at the reals' centre: the distance says real
    e[3] = 40.0  # far beyond every real's features
    classifier = torch.tensor([-2.0, 6.0, -12.0, -2.0])
    logit = traces.combine(classifier, e)
    distance, beyond = traces(e), (traces.low_edge - classifier) / traces.low_width
    assert torch.allclose(logit, torch.maximum(torch.maximum(classifier, distance), beyond))
    assert logit[0] == pytest.approx(-2.0)  # within the reals on every count: the classifier's score
    assert logit[1] == pytest.approx(6.0)  # the classifier says fake: fake
    assert logit[2] > 0  # more real than 99% of the held-out reals, by far: far from the reals
    assert logit[3] > 0  # features far beyond the reals': far from the reals
    with pytest.raises(ValueError, match="logits"):
        NaturalTraces.fit(reals, held)
    alone = NaturalTraces.fit(reals, held, with_classifier=False)
    assert torch.equal(alone.combine(classifier, e), alone(e))  # traces-only: the distance decides


def test_fit_refuses_too_few_reals():
    with pytest.raises(ValueError, match="real images"):
        NaturalTraces.fit(np.zeros((1, 3)), np.zeros((5, 3)), with_classifier=False)


def test_the_variants_and_a_detector_with_traces_round_trip_through_the_artifact(tmp_path):
    from ntf_ray.detector.artifact import load_artifact, save_artifact

    assert get_variant("ntf-proximity").traces == "combined" and get_variant("traces-only").traces == "only"
    assert get_variant("ntf").traces == ""
    torch.manual_seed(0)
    detector = Detector.build("tiny", "transfer", traces=True).eval()
    rng = np.random.default_rng(2)
    detector.traces = NaturalTraces.fit(rng.normal(size=(300, 128)), rng.normal(size=(200, 128)),
                                        rng.normal(size=200))
    detector.traces.edge.fill_(-1e3)  # every image far from these made-up reals: the traces decide
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = detector(x)
        plain = Detector(detector.encoder, detector.classifier, detector.transfer)(x)
        assert torch.allclose(want, detector.traces.combine(plain, detector.encoder(x)))
    assert (want > plain).all()  # the traces take part in the decision
    art = save_artifact(str(tmp_path / "det"), detector, input_size=32)
    loaded = load_artifact(str(tmp_path / "det"))
    assert loaded.detector.traces is not None and loaded.model_id == art.model_id
    with torch.no_grad():
        assert torch.allclose(loaded.detector(x), want)
    plain_art = save_artifact(str(tmp_path / "plain"), Detector.build("tiny"), input_size=32)
    assert load_artifact(str(tmp_path / "plain")).detector.traces is None and plain_art.model_id


def test_fitting_reads_real_images_only_and_holds_out_other_reals(tmp_path, monkeypatch):
    from ntf_ray import storage
    from ntf_ray.synth import make_synthetic
    from ntf_ray.training import natural_traces
    from ntf_ray.training.config import load_config
    from ntf_ray.training.datasets import manifest_table

    records = make_synthetic(tmp_path / "data", n_real=60, n_fake=60, size=40, seed=3)
    table = manifest_table(records)
    cfg = load_config("ntf_ray/training/configs/smoke.yaml", ["variant=ntf-proximity", "crop_size=32"])
    read: list[str] = []
    real_read_many = storage.read_many

    def spy(uris, options=None):
        read.extend(uris)
        return real_read_many(uris, options)

    monkeypatch.setattr(natural_traces.storage, "read_many", spy)
    torch.manual_seed(0)
    detector = natural_traces.fit_natural_traces_for(Detector.build("tiny").eval(), table, cfg)
    labels = {r["uri"]: r["label"] for r in records}
    splits = {r["uri"]: r["split"] for r in records}
    assert read and all(labels[u] == 0 for u in read)  # never a fake
    assert {splits[u] for u in read} == {"train"}  # 6 val reals < MIN_HELD_OUT: half the train reals held out
    assert len(read) == len(set(read)) == sum(1 for r in records if r["label"] == 0 and r["split"] == "train")
    assert detector.traces is not None and bool(detector.traces.with_classifier)
    plain = load_config("ntf_ray/training/configs/smoke.yaml", ["variant=ntf"])
    assert natural_traces.fit_natural_traces_for(Detector.build("tiny"), table, plain).traces is None


def test_the_model_card_says_what_a_trace_variant_flags():
    from ntf_ray.detector.model_card import limits

    meta = {"training": {"config": {"variant": "ntf-proximity"},
                         "data": {"generators": ["tconv", "fingerprint", "sharpened"]}}, "format_version": 4}
    text = " ".join(limits(meta))
    assert "beyond the paper" in text and "Calibrate on your own real images" in text
    assert "synthetic data only" in text and "cannot show accuracy on real generators" in text
    meta["training"]["config"]["variant"] = "ntf"
    assert "beyond the paper" not in " ".join(limits(meta))
