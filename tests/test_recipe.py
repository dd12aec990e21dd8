"""Both NTF stages end to end on synthetic data, tiny backbone, CPU (the smoke config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ntf_ray.cli import main
from ntf_ray.detector.artifact import load_artifact
from ntf_ray.detector.scorer import Scorer
from ntf_ray.training.config import load_config
from ntf_ray.training.datasets import read_manifest, select
from ntf_ray.training.recipe import evaluate, train_local

SMOKE = Path(__file__).resolve().parents[1] / "ntf_ray" / "training" / "configs" / "smoke.yaml"


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


def test_local_training_drops_slivers(tmp_path):
    """The local recipe drops a 1 x 1000 image that upscaling to the crop would blow up, as the
    Ray path does, and collates the rest."""
    import numpy as np
    from PIL import Image

    from ntf_ray.training.datasets import collate_drop_none, manifest_table
    from ntf_ray.training.recipe import TrainingImages
    from ntf_ray.training.stages import STAGE1, STAGE2

    rng = np.random.default_rng(0)
    for name, (h, w) in {"ok.png": (40, 40), "thin.png": (1, 1000)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    table = manifest_table([{"uri": str(tmp_path / n), "label": 0, "split": "train"} for n in ("ok.png", "thin.png")])
    cfg = load_config(SMOKE, ["crop_size=32", "scl_crop_size=16", "max_pixels=1000000"])
    for transform, keys in ((STAGE1.transform(cfg), STAGE1.keys), (STAGE2.transform(cfg, 0), STAGE2.keys)):
        data = TrainingImages(table, transform, keys=keys, max_pixels=cfg.max_pixels)
        batch = collate_drop_none([data[0], data[1]])
        assert batch["dropped"] == 1 and batch[keys[0]].shape == (1, 3, 32, 32)
