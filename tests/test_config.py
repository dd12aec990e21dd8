from __future__ import annotations

from pathlib import Path

import pytest

from ntf_ray.training.config import TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "ntf_ray" / "training" / "configs"


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.1, 0.9, 1e-3)
    assert (cfg.lam, cfg.eta, cfg.gamma, cfg.temperature) == (0.1, 0.5, 0.5, 0.1)
    assert (cfg.epochs_stage1, cfg.epochs_stage2, cfg.proj_dim) == (200, 10, 128)
    assert (cfg.crop_size, cfg.scl_crop_size, cfg.backbone) == (224, 32, "resnet50")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: tiny\nlr: 0.5\nvariant: no-orth\namp: false\n")
    cfg = load_config(path, ["lr=0.25", "epochs_stage1=3", "amp=yes", "variant=no-scl", "blur_sigma=[0, 1.5]",
                             "train_generators=[progan, tconv]", "lr_stage2=0.01"])
    assert cfg.backbone == "tiny" and cfg.lr == 0.25 and cfg.epochs_stage1 == 3
    assert cfg.amp is True and cfg.variant == "no-scl"
    assert cfg.blur_sigma == (0.0, 1.5) and cfg.train_generators == ["progan", "tconv"] and cfg.lr_stage2 == 0.01
    assert TrainConfig(**{**cfg.to_dict(), "blur_sigma": tuple(cfg.blur_sigma),
                          "jpeg_quality": tuple(cfg.jpeg_quality),
                          "stage1_crop_scale": tuple(cfg.stage1_crop_scale)}) == cfg


@pytest.mark.parametrize("override,match", [
    (["nope=1"], "unknown config keys"),
    (["lr"], "key=value"),
    (["epochs_stage1=1.5"], "integer"),
    (["lr=fast"], "number"),
    (["amp=maybe"], "true/false"),
    (["variant=wang"], "unknown variant 'wang'; choose one of ntf, no-orth, no-het-orth, no-scl, linear-probe, bce"),
    (["use_scl=false"], "replaced by the variant switch: use variant=no-scl"),
    (["use_orth=false"], "variant=no-orth"),
    (["train_encoder_stage2=true"], "variant=bce"),
    (["backbone=vit"], "backbone"),
    (["scl_crop_size=300"], "scl_crop_size"),
    (["blur_prob=2"], "blur_prob"),
])
def test_bad_values_fail_with_a_message(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


@pytest.mark.parametrize("name", ["smoke.yaml", "paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.backbone in ("tiny", "resnet50")


def test_resume_conflicts_are_the_fields_that_change_the_maths():
    from ntf_ray.training.config import RESUMABLE, resume_conflicts

    stored = load_config(CONFIGS / "smoke.yaml").to_dict()
    same = load_config(CONFIGS / "smoke.yaml", ["device=cuda", "channels_last=false", "num_workers=8",
                                                "cache_bytes=false", "threshold=0.9", "fail_at_epoch=1"])
    assert resume_conflicts(stored, same) == {}
    changed = load_config(CONFIGS / "smoke.yaml", ["lr=0.1", "batch_size=64", "variant=no-orth", "seed=1",
                                                   "train_generators=[progan]", "epochs_stage2=20"])
    assert resume_conflicts(stored, changed) == {
        "lr": (0.005, 0.1), "batch_size": (16, 64), "variant": ("ntf-proximity", "no-orth"), "seed": (0, 1),
        "train_generators": (None, ["progan"]), "epochs_stage2": (10, 20)}  # cosine: epochs set the curve
    step = load_config(CONFIGS / "smoke.yaml", ["schedule=step"])
    assert resume_conflicts(step.to_dict(), load_config(CONFIGS / "smoke.yaml", ["schedule=step",
                                                                                "epochs_stage2=20"])) == {}
    assert set(resume_conflicts(stored, step)) == {"schedule"}
    # A field the stored config lacks (an older version's) counts as its default.
    older = {k: v for k, v in stored.items() if k != "jpeg_prob"}
    assert resume_conflicts(older, same) == {}
    assert resume_conflicts(older, load_config(CONFIGS / "smoke.yaml", ["jpeg_prob=0.5"])) == {"jpeg_prob": (0.1, 0.5)}
    assert RESUMABLE <= set(stored)


@pytest.mark.timeout(60)
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="config file .* not a regular file"):
        load_config(tmp_path / "config.yaml")
    (tmp_path / "big.yaml").write_text("a: 1\n" * 300_000)
    with pytest.raises(ValueError, match="larger than"):
        load_config(tmp_path / "big.yaml")
