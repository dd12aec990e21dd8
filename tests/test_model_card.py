"""The model card (ntf_ray.detector.model_card): bound to the model id, and any model.json value renders
as one line of text, whatever its type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ntf_ray.cli import main
from ntf_ray.detector.artifact import load_artifact, model_id_of, save_artifact
from ntf_ray.detector.model_card import render
from ntf_ray.nn.model import Detector

CALIBRATION = {"target_fpr": 0.05, "fpr": 0.04, "fpr_upper95": 0.09, "reals": 100, "split": "val"}
METRICS = {"split": "test", "table": [{"generator": "progan", "images": 40, "ap": 0.71, "acc": 0.6, "fpr": 0.3,
                                       "fnr": 0.5}]}
PASTED = {"target_fpr": 0.001, "fpr": 0.0, "fpr_upper95": 0.000003, "reals": 1_000_000, "split": "val"}


@pytest.fixture
def honest(tmp_path) -> str:
    torch.manual_seed(0)
    uri = str(tmp_path / "m")
    save_artifact(uri, Detector.build("tiny"), input_size=32, threshold=0.6, calibration=CALIBRATION,
                  metrics=METRICS, training={"data": {"images": 80, "generators": ["progan"]}})
    return uri


def _edit(uri: str, **fields) -> dict:
    path = Path(uri, "model.json")
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta))
    return meta


def test_an_honest_card_shows_its_calibration_and_metrics_as_bound_to_its_id(honest, capsys):
    assert main(["score", "--model", honest, "--card"]) == 0
    card = capsys.readouterr().out
    model_id = load_artifact(honest).model_id
    assert f"Everything below is what model `{model_id}` was saved with" in card
    assert "| achieved FPR | 0.04 |" in card and "| real images | 100 |" in card
    assert "| progan | 40 | 0.710 |" in card
    assert "unverified" not in card.lower()


@pytest.mark.parametrize("edit", [{"calibration": PASTED},
                                  {"metrics": {"split": "test", "table": [{"generator": "progan", "ap": 0.999}]}}],
                         ids=["pasted calibration", "pasted metrics"])
def test_a_card_edited_under_the_same_model_id_is_refused_not_shown(honest, edit, capsys):
    _edit(honest, **edit)
    assert main(["score", "--model", honest, "--card"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no card with the pasted values
    (line,) = captured.err.splitlines()
    assert line.startswith("ntf-ray score: error: artifact at ") and "does not match" in line


def test_a_format3_card_shows_its_record_as_unverified(honest, capsys):
    """Format 3's id covers the weights and the contract only: its card still renders, its
    calibration and evaluation headed unverified (they could have been pasted)."""
    weights = Path(honest, "model.safetensors").read_bytes()
    _edit(honest, format_version=3, calibration=PASTED,
          model_id=model_id_of(weights, backbone="tiny", head="transfer", input_size=32, threshold=0.6))
    assert main(["score", "--model", honest, "--card"]) == 0
    card = capsys.readouterr().out
    assert "**Unverified record.**" in card and "Everything below" not in card
    for section in ("Training data", "Calibration", "Evaluation"):
        assert f"## {section} (unverified: not covered by the model id)" in card
    assert "- Its training record, evaluation and calibration are unverified" in card


@pytest.mark.parametrize("training", [
    {"data": {"images": 3, "generators": [1, 2]}},
    {"data": {"generators": [{"name": "progan"}, ["x"]]}},
    {"data": {"generators": "progan", "counts": ["train/real", 3]}},
    {"data": {"generators": 7, "counts": {"train/real": {"n": 3}}}},
    {"data": "all of them", "config": ["ntf"], "workers": {"n": 2}},
    {"config": {"variant": ["ntf"]}, "data": {"images": "many | lots\n| injected | row |"}},
], ids=["numbers", "objects", "a string", "a number", "not objects", "table injection"])
def test_any_json_in_the_record_renders_as_text(tmp_path, training, capsys):
    torch.manual_seed(0)
    uri = str(tmp_path / "m")
    save_artifact(uri, Detector.build("tiny"), input_size=32, training=training)
    assert main(["score", "--model", uri, "--card"]) == 0
    card = capsys.readouterr().out
    rows = [line for line in card.splitlines() if line.startswith("|")]
    assert rows and all(line.count("|") - line.count("\\|") == 3 for line in rows if not line.startswith("| generator"))
    assert "| injected | row |" not in card


def test_control_characters_never_reach_the_terminal():
    card = render({"model_id": "abc", "format_version": 4, "threshold": 0.5,
                   "training": {"data": {"generators": ["pro\x1b[2Jgan", "a\u202egnp.exe"], "images": "1\r\n2"}},
                   "calibration": {"split": "val\x07"}})
    assert not any(ch in card for ch in "\x1b\x07\r\u202e")
    assert "pro\\u001b[2Jgan" in card and "| images | 1\\u000d\\u000a2 |" in card
