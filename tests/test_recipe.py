"""Both NTF stages end to end on synthetic data, tiny backbone, CPU (the smoke config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ntf_ray.artifact import load_artifact
from ntf_ray.cli import main
from ntf_ray.config import load_config
from ntf_ray.datasets import read_manifest, select
from ntf_ray.recipe import evaluate, train_local
from ntf_ray.scoring import Scorer

SMOKE = Path(__file__).resolve().parents[1] / "ntf_ray" / "configs" / "smoke.yaml"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_both_stages_reach_ap_on_held_out_synthetic_split(tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["synth", str(data), "--n-real", "1000", "--n-fake", "1000", "--size", "64", "--seed", "7"]) == 0
    assert "test data, not a benchmark" in capsys.readouterr().out
    manifest = str(data / "manifest.parquet")
    cfg = load_config(SMOKE)

    artifact = train_local(manifest, str(tmp_path / "out"), cfg)

    average = artifact.metrics["table"][-1]
    assert artifact.metrics["split"] == "test" and average["generator"] == "average"
    assert average["images"] == 600
    assert average["ap"] >= 0.9, artifact.metrics["table"]
    assert (tmp_path / "out" / "config.json").is_file()
    # The saved artifact scores the held-out split the same way.
    scorer = Scorer.from_artifact(str(tmp_path / "out" / "detector"), device="cpu")
    rows = evaluate(scorer, select(read_manifest(manifest), split="test"))
    assert rows[-1]["ap"] == pytest.approx(average["ap"], abs=1e-6)
    loaded = load_artifact(str(tmp_path / "out" / "detector"))
    assert loaded.training["config"]["backbone"] == "tiny" and loaded.input_size == 48
    assert loaded.training["data"]["counts"]["train/real"] == 600
